"""Optimizer parameter groups: learning rate and weight decay per tower, and layer-wise lr decay.

Every parameter belongs to the image tower, the text tower, or neither (logit scale / bias), and has a
depth counted from the top of its tower: the head (final norm, projection) and the last block are depth 0,
each block below adds 1, the embeddings are lowest (depth = number of blocks). With layer decay d, a
parameter's lr is its tower's lr x d^depth (BEiT / ELECTRA style, as open_clip 4.x). Weight decay goes to
matrices only (see `is_decayed`). Parameters with the same lr and weight decay share one group, so
without per-tower settings there are exactly the two usual groups.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch

# Blocks of open_clip's own towers (transformer.resblocks.N), timm trunks (trunk.blocks.N, trunk.stages.N)
# and Hugging Face text towers (encoder.layer.N, layers.N).
_BLOCK = re.compile(r"\.(?:resblocks|blocks|stages|layer|layers)\.(\d+)\.")
_EMBEDDING_PARTS = (
    "conv1", "class_embedding", "positional_embedding", "ln_pre", "patch_embed", "cls_token", "pos_embed",
    "reg_token", "token_embedding", "embeddings", "cls_emb",
)  # fmt: skip
# A CLIP (not CustomTextCLIP) keeps its text tower's parts at the top level.
_TEXT_TOP_LEVEL = (
    "token_embedding",
    "positional_embedding",
    "transformer.",
    "ln_final",
    "text_projection",
    "cls_emb",
)
_NO_DECAY_SUFFIXES = ("positional_embedding", "pos_embed", "class_embedding", "cls_token")


@dataclass(frozen=True, kw_only=True)
class TowerOptim:
    """lr, weight decay and layer decay of one tower (None: the base value / no layer decay)."""

    lr: float
    weight_decay: float
    layer_decay: float | None = None


def is_decayed(name: str, param: torch.Tensor) -> bool:
    """Weight decay applies to matrices (linear, conv, token embedding), not to biases, norms,
    position embeddings or the logit scale / bias."""
    if param.ndim < 2 or name.startswith("logit_"):
        return False
    return not name.endswith(_NO_DECAY_SUFFIXES)


def tower_of(name: str) -> str:
    """'image', 'text' or 'shared' (logit scale and bias)."""
    if name.startswith("visual."):
        return "image"
    if name.startswith("text.") or name.startswith(_TEXT_TOP_LEVEL):
        return "text"
    return "shared"


def layer_depths(names: Iterable[str]) -> dict[str, int]:
    """Depth from the top of its tower for each parameter name (0 for the shared ones)."""
    names = list(names)
    blocks: dict[str, int] = {}
    for name in names:
        match = _BLOCK.search("." + name)
        if match:
            tower = tower_of(name)
            blocks[tower] = max(blocks.get(tower, 0), int(match.group(1)) + 1)
    depths = {}
    for name in names:
        tower = tower_of(name)
        match = _BLOCK.search("." + name)
        if tower == "shared":
            depths[name] = 0
        elif match:
            depths[name] = blocks[tower] - 1 - int(match.group(1))
        elif any(part in name.split(".") for part in _EMBEDDING_PARTS):
            depths[name] = blocks.get(tower, 0)
        else:  # final norms and projections sit above the last block
            depths[name] = 0
    return depths


def build_param_groups(
    model: torch.nn.Module, *, base: TowerOptim, image: TowerOptim, text: TowerOptim
) -> list[dict]:
    """AdamW groups of the trainable parameters, each with its lr and weight_decay, highest lr first."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    depths = layer_depths(n for n, _ in named)
    towers = {"image": image, "text": text, "shared": base}
    groups: dict[tuple[float, float], dict] = {}
    for name, param in named:
        tower = towers[tower_of(name)]
        lr = tower.lr * (tower.layer_decay ** depths[name] if tower.layer_decay is not None else 1.0)
        weight_decay = tower.weight_decay if is_decayed(name, param) else 0.0
        group = groups.setdefault(
            (lr, weight_decay), {"params": [], "names": [], "lr": lr, "weight_decay": weight_decay}
        )
        group["params"].append(param)
        group["names"].append(name)
    return [groups[key] for key in sorted(groups, key=lambda k: (-k[0], -k[1]))]
