"""Peak memory and time of loss forward + backward, clipkit against open_clip, W gloo processes on CPU.

    python scripts/bench_loss.py                # b in {1024, 4096}, W in {1, 2, 4}, embed dim 512

For each (local batch b, world size W) it starts W processes (gloo, CPU) that each hold b random
L2-normalised (b, 512) pairs and run, interleaved, clipkit's ClipLoss and SigLipLoss and open_clip's
ClipLoss(local_loss=True, gather_with_grad=True) and SigLipLoss() (its default bidirectional neighbour
exchange). Features, scale and bias are leaf tensors, as in gradient caching.

Memory: torch's profiler (profile_memory=True) records every allocation and free of the CPU
allocator during one forward + backward; the peak of the running sum is the most bytes the loss held
at once beyond its inputs: saved activations (whatever keeps them), the transient logits, gathered or
received features, communication buffers and the input gradients. Exact byte counts, so no allocator
noise; reported per rank, the maximum over ranks. Also reported: bytes autograd saved for backward
(`saved_tensors_hooks`, beyond the inputs), which excludes transients.
Time: median over repeats of the wall time between two barriers around forward + backward on rank 0
(so the slowest rank's), with each process on cores // W threads.

Prints one JSON object: the settings, one row per (loss, b, W), and a summary of ratios.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

LOGIT_SCALE = {"clip": 1 / 0.07, "siglip": 10.0}
LOGIT_BIAS = {"clip": None, "siglip": -10.0}
IMPLEMENTATIONS = ("clipkit", "open_clip")
KINDS = ("clip", "siglip")
SPAWN_DEADLINE_S = 900


def build_losses(rank: int, world_size: int) -> dict[tuple[str, str], torch.nn.Module]:
    import open_clip.loss

    from clipkit.losses import ClipLoss, SigLipLoss

    return {
        ("clip", "clipkit"): ClipLoss(init_logit_scale=0.0),
        ("clip", "open_clip"): open_clip.loss.ClipLoss(
            local_loss=True, gather_with_grad=True, rank=rank, world_size=world_size
        ),
        ("siglip", "clipkit"): SigLipLoss(init_logit_scale=0.0),
        ("siglip", "open_clip"): open_clip.loss.SigLipLoss(rank=rank, world_size=world_size),
    }


def forward_backward(loss_fn, kind: str, image: torch.Tensor, text: torch.Tensor) -> None:
    image = image.detach().requires_grad_()
    text = text.detach().requires_grad_()
    scale = torch.tensor(LOGIT_SCALE[kind], requires_grad=True)
    bias = None if LOGIT_BIAS[kind] is None else torch.tensor(LOGIT_BIAS[kind], requires_grad=True)
    loss_fn(image, text, scale, bias).backward()


def measure_memory(step, inputs: list[torch.Tensor]) -> tuple[int, int]:
    """(peak bytes held at once, bytes saved for backward) during `step()`, beyond the inputs.

    Peak: the running sum of the profiler's allocation (+bytes) and free (-bytes) events of the CPU
    allocator. Saved: distinct storages autograd saved for backward (saved_tensors_hooks).
    """
    from torch.profiler import ProfilerActivity, profile

    input_storages = {tensor.untyped_storage().data_ptr() for tensor in inputs}
    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in input_storages:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            step()
    events = sorted(
        (event.start_ns(), event.nbytes())
        for event in prof.profiler.kineto_results.events()
        if event.name() == "[memory]"
    )
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak, sum(saved.values())


def worker(rank: int, world_size: int, args: argparse.Namespace, store: str, out_dir: str) -> None:
    warnings.filterwarnings("ignore", category=FutureWarning)  # open_clip's deprecated all_gather
    torch.set_num_threads(max(1, args.cores // world_size))
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        generator = torch.Generator().manual_seed(rank)
        image = F.normalize(torch.randn(args.local_batch, args.dim, generator=generator), dim=-1)
        text = F.normalize(image + torch.randn(args.local_batch, args.dim, generator=generator), dim=-1)
        losses = build_losses(rank, world_size)
        results = {}
        # One untimed pass per loss measures memory (and warms up).
        for (kind, impl), loss_fn in losses.items():
            step = functools.partial(forward_backward, loss_fn, kind, image, text)
            peak, saved = measure_memory(step, [image, text])
            results[f"{kind}/{impl}"] = {"peak_bytes": peak, "saved_bytes": saved, "times_s": []}
        # Timed passes, clipkit and open_clip interleaved, the order rotating with the repeat.
        order = list(losses.items())
        for repeat in range(args.repeats):
            shift = repeat % len(order)
            for (kind, impl), loss_fn in order[shift:] + order[:shift]:
                dist.barrier()
                start = time.perf_counter()
                forward_backward(loss_fn, kind, image, text)
                dist.barrier()
                results[f"{kind}/{impl}"]["times_s"].append(time.perf_counter() - start)
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


def run_world(args: argparse.Namespace, world_size: int) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="bench_loss_") as tmp:
        context = mp.start_processes(
            worker,
            args=(world_size, args, str(Path(tmp) / "store"), tmp),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + SPAWN_DEADLINE_S
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                for process in context.processes:
                    process.kill()
                raise SystemExit(f"bench_loss: W={world_size} did not finish in {SPAWN_DEADLINE_S} s")
        return [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in range(world_size)]


def summarise(rows: list[dict], world_sizes: list[int]) -> dict:
    """Peak memory relative to the smallest W, and clipkit's time relative to open_clip's."""
    by_key = {(r["kind"], r["impl"], r["local_batch"], r["world_size"]): r for r in rows}
    smallest = min(world_sizes)
    peak_ratio: dict[str, dict[str, float]] = {}
    time_ratio: dict[str, float] = {}
    for kind, impl, b, w in sorted(by_key):
        row = by_key[kind, impl, b, w]
        peak_ratio.setdefault(f"{kind}/{impl}/b{b}", {})[f"w{w}"] = round(
            row["peak_mib"] / by_key[kind, impl, b, smallest]["peak_mib"], 3
        )
        if impl == "clipkit":
            time_ratio[f"{kind}/b{b}/w{w}"] = round(
                row["time_s"] / by_key[kind, "open_clip", b, w]["time_s"], 3
            )
    return {f"peak_over_w{smallest}": peak_ratio, "time_clipkit_over_open_clip": time_ratio}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1024, 4096], help="local batch b")
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2, 4], help="processes W")
    parser.add_argument("--dim", type=int, default=512, help="embedding dimension D")
    parser.add_argument("--repeats", type=int, default=2, help="timed forward + backward passes per loss")
    parser.add_argument(
        "--cores", type=int, default=os.cpu_count() or 1, help="threads shared by the W processes"
    )
    args = parser.parse_args()

    started = time.perf_counter()
    rows = []
    for local_batch in args.batch_sizes:
        for world_size in args.world_sizes:
            args.local_batch = local_batch
            print(f"bench_loss: b={local_batch} W={world_size}", file=sys.stderr, flush=True)
            ranks = run_world(args, world_size)
            for key in ranks[0]:
                kind, impl = key.split("/")
                times = ranks[0][key]["times_s"]  # between barriers: the slowest rank's
                rows.append(
                    {
                        "kind": kind,
                        "impl": impl,
                        "local_batch": local_batch,
                        "world_size": world_size,
                        "peak_mib": round(max(r[key]["peak_bytes"] for r in ranks) / 2**20, 2),
                        "saved_mib": round(max(r[key]["saved_bytes"] for r in ranks) / 2**20, 2),
                        "time_s": round(statistics.median(times), 4),
                        "times_s": [round(t, 4) for t in times],
                    }
                )
    import open_clip

    result = {
        "benchmark": "loss forward + backward",
        "embed_dim": args.dim,
        "repeats": args.repeats,
        "cores": args.cores,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "memory": "peak of live CPU-allocator bytes during forward+backward (torch profiler), max over ranks",
        "time": "median over repeats, rank 0 between barriers",
        "rows": rows,
        "summary": summarise(rows, args.world_sizes),
        "wall_s": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
