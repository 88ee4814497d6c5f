"""SigLIP's sigmoid loss across processes in a ring, with memory that does not grow with their number.

With W processes each holding b pairs, rank r's loss is the sum of W chunks: its b images against
the b texts of each rank, positives only on the diagonal of its own chunk. Text features travel
around the ring (rank r receives from r - 1 and sends to r + 1), one (b, D) block at a time. A custom
autograd function keeps only the local features for backward, recomputes each chunk's (b, b) logits
there, and sends the text-feature gradients around the ring behind the texts, as the SigLIP paper's
chunked implementation does; so forward and backward hold one chunk's logits at a time, whatever W.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from clipkit.losses.base import ContrastiveLoss
from clipkit.losses.distributed import Ring
from clipkit.losses.precision import ieee_float32_matmuls


def _signed_logits(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor | None,
    *,
    with_positives: bool,
) -> torch.Tensor:
    """-label * logits for one chunk: (b, b), labels -1 except +1 on the diagonal `with_positives`.

    Scales the (b, D) side and works in place, so a chunk costs one (b, b) buffer.
    """
    signed = (logit_scale * image_features) @ text_features.T  # (b, b) logits
    if logit_bias is not None:
        signed.add_(logit_bias)
    if with_positives:
        signed.diagonal().neg_()  # label +1 on the diagonal; -label * logit = logit elsewhere
    return signed


def siglip_chunk_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor | None,
    *,
    with_positives: bool,
) -> torch.Tensor:
    """Sum over a chunk's (b, b) pairs of -log sigmoid(label * logit); positives on the diagonal.

    image_features: (b, D); text_features: (b', D); with_positives: whether pair i is (image i, text i).
    -log sigmoid(x) = softplus(-x). Not divided by b.
    """
    signed = _signed_logits(
        image_features, text_features, logit_scale, logit_bias, with_positives=with_positives
    )
    # softplus a quarter of the rows at a time: a quarter-chunk temporary rather than a second chunk
    return sum(F.softplus(rows).sum() for rows in signed.chunk(4))


def accumulate_siglip_chunk_grads(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor | None,
    *,
    with_positives: bool,
    grad_weight: torch.Tensor,
    grad_image: torch.Tensor,
    grad_text: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Backward of `grad_weight * siglip_chunk_loss(...)`, recomputing the chunk's logits.

    Adds the gradients w.r.t. image_features into grad_image (b, D) and w.r.t. text_features into
    grad_text (b', D), in place so that a chunk's backward holds one (b, b') and one (b, D)
    temporary; returns the gradients w.r.t. logit_scale and logit_bias (None without a bias).
    With z = s * I T^T + bias: d softplus(-y z) / dz = -y sigmoid(-y z).
    """
    grad_logits = torch.sigmoid_(
        _signed_logits(image_features, text_features, logit_scale, logit_bias, with_positives=with_positives)
    )  # (b, b') = sigmoid(-y z)
    if with_positives:
        grad_logits.diagonal().neg_()  # times -y: -1 on the diagonal, +1 elsewhere
    grad_logits.mul_(grad_weight)  # dL/dz
    grad_bias = None if logit_bias is None else grad_logits.sum()
    grad_logits_text = grad_logits @ text_features  # (b, D): dL/d(s * I)
    grad_scale = torch.dot(grad_logits_text.flatten(), image_features.flatten())  # sum_ij dL/dz_ij <I_i, T_j>
    grad_image.addcmul_(grad_logits_text, logit_scale)
    del grad_logits_text
    grad_text.addmm_(grad_logits.mul_(logit_scale).T, image_features)  # (b', D): s * (dL/dz)^T I
    return grad_scale, grad_bias


class _SigLipRingLoss(torch.autograd.Function):
    """The ring loss with recomputation; saves only this rank's (b, D) features and the scalars."""

    @staticmethod
    def forward(ctx, image_features, text_features, logit_scale, logit_bias, ring: Ring):
        with ieee_float32_matmuls(image_features.device):  # float32 math even where TF32 is on
            return _SigLipRingLoss._forward(ctx, image_features, text_features, logit_scale, logit_bias, ring)

    @staticmethod
    def _forward(ctx, image_features, text_features, logit_scale, logit_bias, ring: Ring):
        # Features arrive in their own dtype and texts travel in it (bf16 stays bf16 on the wire);
        # each chunk is upcast to the scalars' (math) dtype on arrival.
        ctx.ring = ring
        ctx.save_for_backward(image_features, text_features, logit_scale, logit_bias)
        dtype = logit_scale.dtype
        image = image_features.to(dtype)  # (b, D)
        loss = image.new_zeros(())
        texts = text_features  # step k holds the texts of rank - k
        for step in range(ring.world_size):
            last = step == ring.world_size - 1
            # Post the next shift before computing, so the transfer overlaps the chunk's matmul.
            pending = None if last else ring.start_shift(texts)
            loss += siglip_chunk_loss(
                image, texts.to(dtype), logit_scale, logit_bias, with_positives=step == 0
            )
            if pending is not None:
                (texts,) = pending.wait()
        return loss / image_features.shape[0]

    @staticmethod
    def backward(ctx, grad_loss):
        # backward() may be called inside an autocast region, or with TF32 on; the recomputation stays in
        # float32.
        with torch.autocast(grad_loss.device.type, enabled=False), ieee_float32_matmuls(grad_loss.device):
            return _SigLipRingLoss._backward(ctx, grad_loss)

    @staticmethod
    def _backward(ctx, grad_loss):
        image_features, text_features, logit_scale, logit_bias = ctx.saved_tensors
        ring: Ring = ctx.ring
        # This rank's loss is divided by b and scaled by grad_loss: weight its terms before their
        # gradients leave for other ranks.
        grad_weight = grad_loss / image_features.shape[0]
        dtype = logit_scale.dtype  # gradients add up in the math dtype and are rounded once, at the end
        image = image_features.to(dtype)  # (b, D)
        grad_image = torch.zeros_like(image)  # (b, D)
        grad_scale = torch.zeros_like(logit_scale)
        grad_bias = None if logit_bias is None else torch.zeros_like(logit_bias)
        texts = text_features  # step k holds the texts of rank - k (in their own dtype) ...
        grad_texts = torch.zeros_like(image)  # ... and their gradient from the ranks they visited
        for step in range(ring.world_size):
            chunk_scale, chunk_bias = accumulate_siglip_chunk_grads(
                image,
                texts.to(dtype),
                logit_scale,
                logit_bias,
                with_positives=step == 0,
                grad_weight=grad_weight,
                grad_image=grad_image,
                grad_text=grad_texts,
            )
            grad_scale += chunk_scale.reshape(grad_scale.shape)
            if grad_bias is not None:
                grad_bias += chunk_bias.reshape(grad_bias.shape)
            if ring.world_size == 1:
                break
            # The gradient follows its texts to the right. Unlike the forward, the transfer does not
            # overlap the matmuls: that would hold two more (b, D) blocks beside the (b, b) chunk.
            if step < ring.world_size - 1:
                texts, grad_texts = ring.start_shift(texts, grad_texts).wait()
            else:
                # The block we hold belongs to our right neighbour and has been through every rank.
                (grad_texts,) = ring.start_shift(grad_texts).wait()
        grad_image, grad_texts = grad_image.to(image_features.dtype), grad_texts.to(text_features.dtype)
        return grad_image, grad_texts, grad_scale, grad_bias, None


def siglip_loss_ring(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor | None,
    *,
    ring: Ring,
) -> torch.Tensor:
    """This rank's SigLIP loss: sum over all W*b texts of its b images' terms, divided by b.

    (b, D) features in any float dtype, which is the one they travel in; scalar tensors in the math
    dtype (float32, or float64), which the chunks are computed and the gradients summed in; the
    features' gradients are rounded to their dtype once. See SigLipLoss for the distributed semantics.
    """
    return _SigLipRingLoss.apply(image_features, text_features, logit_scale, logit_bias, ring)


class SigLipLoss(ContrastiveLoss):
    """SigLIP's sigmoid loss over the global batch of all processes, memory flat in their number.

    forward(image_features (b, D), text_features (b, D), logit_scale, logit_bias=None) -> scalar,
    with `logit_scale` already exponentiated (`model.logit_scale.exp()`) and `logit_bias` as the model
    returns it. Features are expected L2-normalised; any float dtype, sent around the ring in that dtype
    (bf16 on the wire under bf16), the math runs in float32 and their gradients come back in their
    dtype. The
    value is sum over pairs of -log sigmoid(label * logit) divided by b, as in open_clip and big_vision.

    Across W processes, each passing its own b pairs (b equal on all ranks): every image is scored
    against the texts of all W*b pairs, texts moving around a ring of point-to-point exchanges, so:
      (a) the mean over ranks of the returned values equals the loss of one process on the
          concatenated W*b batch (log the all-reduced mean);
      (b) the gradient w.r.t. a rank's text features holds every rank's terms for those texts (sent
          back around the ring), i.e. W x the one-process gradient for those rows, as does the
          gradient w.r.t. its image features; the gradients w.r.t. logit_scale / logit_bias are this
          rank's. After data-parallel averaging of parameter gradients all parameter gradients equal
          the one-process ones.
    Peak memory, forward and backward, is a few (b, b) and (b, D) buffers for any W: each chunk's
    logits are recomputed in backward rather than kept. Every rank must call forward and backward
    (the backward pass communicates too).
    """

    DEFAULT_INIT_LOGIT_SCALE = math.log(10)  # the SigLIP paper's start: scale 10, bias -10
    DEFAULT_INIT_LOGIT_BIAS = -10.0
    ACCEPTS_AUTO_LOGIT_BIAS = True

    def loss_on_this_rank(self, image_features, text_features, logit_scale, logit_bias, *, rank, world_size):
        ring = Ring(rank=rank, world_size=world_size, group=self.group)
        return siglip_loss_ring(
            image_features.contiguous(), text_features.contiguous(), logit_scale, logit_bias, ring=ring
        )
