"""Run under `accelerate launch`: build the training run, draw one patch-dropout mask per process the way a
training step does, and write every process's kept token indices to OUT (JSON). Used by
test_train_distributed.py to check that processes draw different masks.

    accelerate launch --config_file conf/accelerate/cpu-2proc.yaml tests/draw_patch_dropout_masks.py OUT [overrides]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from accelerate.utils import gather_object

from clipkit.train import Trainer
from clipkit.train.schema import compose_config


def main() -> None:
    out, overrides = Path(sys.argv[1]), sys.argv[2:]
    cfg = compose_config(*overrides)
    trainer = Trainer(cfg)
    patch_dropout = trainer.unwrapped.visual.patch_dropout
    patch_dropout.train()
    tokens = 1 + trainer.unwrapped.visual.grid_size[0] * trainer.unwrapped.visual.grid_size[1]
    # Token i holds the value i, so what comes out names the kept tokens.
    x = torch.arange(tokens, dtype=torch.float32).reshape(1, tokens, 1).expand(2, tokens, 4).contiguous()
    kept = patch_dropout(x)[:, :, 0].long().tolist()  # (2, kept tokens)
    masks = gather_object([kept])
    if trainer.accelerator.is_main_process:
        out.write_text(json.dumps(masks))
    trainer.close()


if __name__ == "__main__":
    main()
