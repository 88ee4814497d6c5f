"""CLIP's softmax contrastive loss, exact across data-parallel processes."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from clipkit.losses.base import ContrastiveLoss
from clipkit.losses.distributed import all_gather_with_grad
from clipkit.losses.precision import matmul_transposed


def clip_loss_local(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    all_image_features: torch.Tensor,
    all_text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor | None = None,
    *,
    first_label: int = 0,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Symmetric cross-entropy over the local rows of the global logit matrix.

    image_features, text_features: (b, D), this process's pairs; they are rows
    [first_label, first_label + b) of all_image_features, all_text_features: (N, D), every process's.
    Returns the mean over the b local pairs of (image->text CE + text->image CE) / 2; with one
    process (N = b, first_label = 0) that is CLIP's loss. Computes 2 x (b, N) logits, never (N, N).
    `label_smoothing` eps: each row's target is 1 - eps on its pair plus eps / N on each of its N logits;
    every row holds all N global logits, so the smoothing is exact across processes too.
    """
    b = image_features.shape[0]
    labels = torch.arange(first_label, first_label + b, device=image_features.device)  # (b,)
    # Scale the (b, D) side before the product: one fewer (b, N) temporary. IEEE float32 even where the
    # process has TF32 on.
    logits_per_image = matmul_transposed(logit_scale * image_features, all_text_features)  # (b, N)
    logits_per_text = matmul_transposed(logit_scale * text_features, all_image_features)  # (b, N)
    if logit_bias is not None:
        logits_per_image = logits_per_image + logit_bias
        logits_per_text = logits_per_text + logit_bias
    image_to_text = F.cross_entropy(logits_per_image, labels, label_smoothing=label_smoothing)
    text_to_image = F.cross_entropy(logits_per_text, labels, label_smoothing=label_smoothing)
    return (image_to_text + text_to_image) / 2


class ClipLoss(ContrastiveLoss):
    """CLIP's softmax loss (InfoNCE both ways) over the global batch of all processes.

    forward(image_features (b, D), text_features (b, D), logit_scale, logit_bias=None) -> scalar,
    with `logit_scale` already exponentiated (`model.logit_scale.exp()`, as open_clip's models return
    it). Features are expected L2-normalised; any float dtype, gathered in that dtype (bf16 on the
    wire under bf16), the math runs in float32 and their gradients come back in their dtype.

    Across W processes, each passing its own b pairs (b equal on all ranks): every image is scored
    against the texts of all W*b pairs and vice versa. Features are gathered from all ranks with
    gradient and each rank computes only its b rows of the logits in both directions (b x W*b each,
    labels offset by rank*b), so:
      (a) the mean over ranks of the returned values equals the loss of one process on the
          concatenated W*b batch (log the all-reduced mean);
      (b) the gradient w.r.t. a rank's features holds every rank's loss terms (the gather's backward
          sums them), i.e. W x the one-process gradient for those rows, and the gradients w.r.t.
          logit_scale / logit_bias are this rank's; after data-parallel averaging of parameter
          gradients (DDP, Accelerate) all parameter gradients equal the one-process ones.
    This is open_clip's ClipLoss(local_loss=True, gather_with_grad=True): there, local_loss without
    gather_with_grad drops the other ranks' terms from the feature gradients and is not exact.
    `label_smoothing` (loss.label_smoothing) smooths each row's target over its W*b logits (exact too).
    """

    DEFAULT_INIT_LOGIT_SCALE = math.log(1 / 0.07)  # CLIP's temperature 0.07
    DEFAULT_INIT_LOGIT_BIAS = None
    ACCEPTS_LABEL_SMOOTHING = True

    def loss_on_this_rank(self, image_features, text_features, logit_scale, logit_bias, *, rank, world_size):
        dtype = logit_scale.dtype  # the math dtype: float32, or float64 for float64 features
        b = image_features.shape[0]
        if world_size == 1:
            image, text = image_features.to(dtype), text_features.to(dtype)
            all_image, all_text = image, text
        else:  # (W*b, D) each, rank r's rows at [r*b, (r+1)*b); gathered in the features' own dtype
            all_image = all_gather_with_grad(
                image_features, group=self.group, world_size=world_size, dtype=dtype
            )
            all_text = all_gather_with_grad(
                text_features, group=self.group, world_size=world_size, dtype=dtype
            )
            # Our rows taken from the gathered copy (equal, the gather is exact): the gradients of the
            # local and the gathered use then add up in float32 before their one rounding.
            image, text = all_image[rank * b : (rank + 1) * b], all_text[rank * b : (rank + 1) * b]
        return clip_loss_local(
            image,
            text,
            all_image,
            all_text,
            logit_scale,
            logit_bias,
            first_label=rank * b,
            label_smoothing=self.label_smoothing,
        )
