"""The parallelism matrix, run under one 2-process launch: several short Trainers one after another in the
same processes (DDP, FSDP2 FULL_SHARD, FSDP2 SHARD_GRAD_OP) x (fp32, bf16) x (CLIP, SigLIP) x accumulation
(1, 2), with patch dropout and an EMA on. Each run writes its own output_dir (metrics.jsonl, model/,
model-raw/); OUT/matrix.json lists the rows and the plan each Trainer chose. test_train_matrix.py compares
every sharded row with the DDP row of the same settings.

    torchrun --nproc_per_node 2 tests/train_matrix.py OUT [overrides for every row]

FULL_SHARD rows ask with `train.sharding=auto` and a launch environment that carries the FSDP keys
`accelerate launch --config_file conf/accelerate/cpu-fsdp.yaml` would set; DDP rows with `auto` and this
process's own environment (a plain 2-process launch). So each Trainer builds its plan from what it is
handed, whatever the Trainer before it in the same process chose.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from clipkit.train import Trainer, loop
from clipkit.train.schema import compose_config

# The launch environment of `accelerate launch --config_file conf/accelerate/cpu-fsdp.yaml`.
FSDP_LAUNCH = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_RESHARD_AFTER_FORWARD": "true"}
PLANS = {  # name -> (train.sharding, extra launch environment, the plan the Trainer must choose)
    "ddp": ("auto", {}, "DDP"),
    "full": ("auto", FSDP_LAUNCH, "FSDP2 FULL_SHARD"),
    "grad_op": ("grad_op", {}, "FSDP2 SHARD_GRAD_OP"),
}
# Settings some groups carry on all three plans (so the DDP reference has them too): gradient
# checkpointing with clipping (a global norm over shards) and an evaluation in the middle of training
# (gathered from the shards), and LiT's frozen image tower.
GROUP_EXTRA = {
    ("bf16", "siglip", 2): (
        "train.grad_checkpointing=true",
        "optim.grad_clip_norm=1.0",
        "train.eval_every=2",
    ),
    ("fp32", "clip", 1): ("train.lock_image=true", "train.lock_image_unlocked_groups=1"),
}


def rows() -> list[dict]:
    found = []
    for precision in ("fp32", "bf16"):
        for loss in ("clip", "siglip"):
            for accum in (1, 2):
                for plan in PLANS:  # DDP first: the reference of its group
                    extra = GROUP_EXTRA.get((precision, loss, accum), ())
                    name = f"{plan}-{precision}-{loss}-accum{accum}"
                    found.append(
                        {"name": name, "plan": plan, "precision": precision, "loss": loss, "accum": accum,
                         "group": f"{precision}-{loss}-accum{accum}", "extra": list(extra)}
                    )  # fmt: skip
    return found


def main() -> None:
    out, common = Path(sys.argv[1]), sys.argv[2:]
    # The end-of-run report (pictures for a person) is not what the matrix compares, and drawing it took a
    # third of each row's time: the summary stays, the pictures are skipped.
    loop.write_run_report = lambda **_: "(report skipped by tests/train_matrix.py)"
    groups = os.environ.get("MATRIX_GROUPS")  # e.g. bf16-siglip-accum2: only these groups (debugging)
    results = []
    for row in rows():
        if groups and row["group"] not in groups.split(","):
            continue
        sharding, launch_extra, expected = PLANS[row["plan"]]
        overrides = [
            *common,
            f"loss={row['loss']}",
            f"train.precision={row['precision']}",
            f"train.accum_steps={row['accum']}",
            f"train.sharding={sharding}",
            *row["extra"],
            f"output_dir={out / row['name']}",
        ]
        cfg = compose_config(*overrides)
        started = time.perf_counter()
        trainer = Trainer(cfg, launch_env={**os.environ, **launch_extra})
        try:
            trainer.fit()
        finally:
            trainer.close(keep_process_group=True)  # the next row runs in this process group
        results.append({**row, "expected_plan": expected, "chosen_plan": trainer.plan.name,
                        "seconds": time.perf_counter() - started})  # fmt: skip
        if trainer.accelerator.is_main_process:
            print(f"{row['name']}: {trainer.plan.name}, {results[-1]['seconds']:.1f} s", flush=True)
    if trainer.accelerator.is_main_process:
        (out / "matrix.json").write_text(json.dumps(results, indent=1))
    trainer.accelerator.end_training()


if __name__ == "__main__":
    main()
