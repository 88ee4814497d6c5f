"""Contrastive losses, exact across data-parallel processes: CLIP (softmax) and SigLIP (sigmoid).

`ClipLoss` and `SigLipLoss` are modules holding state (logit parameters' start, process layout); the
math lives in the pure functions beside them. Nothing here imports Accelerate or Hydra.
"""

from clipkit.losses.base import ContrastiveLoss, auto_init_logit_bias
from clipkit.losses.clip import ClipLoss, clip_loss_local
from clipkit.losses.siglip import (
    SigLipLoss,
    accumulate_siglip_chunk_grads,
    siglip_chunk_loss,
    siglip_loss_ring,
)

__all__ = [
    "ClipLoss",
    "ContrastiveLoss",
    "SigLipLoss",
    "clip_loss_local",
    "accumulate_siglip_chunk_grads",
    "auto_init_logit_bias",
    "siglip_chunk_loss",
    "siglip_loss_ring",
]
