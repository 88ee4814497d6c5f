"""One optimizer step's forward and backward, with exact gradient accumulation.

With k micro-batches the loss must see the negatives of all k (a batch of k*b), not k separate pools of b.
As in GradCache and open_clip's `--accum-freq`: embed every micro-batch without graph, compute the loss
and its gradients w.r.t. the embeddings on the whole set, then re-run each micro-batch with graph and
back-propagate its slice of those gradients. Random state is replayed so the second forward equals the
first (dropout, patch dropout).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch


def forward_towers(model, images: torch.Tensor, tokens: torch.Tensor):
    """(image_features (B, D), text_features (B, D), logit_scale (exp'd), logit_bias or None)."""
    out = model(images, tokens)
    # Under FSDP the logit parameters are 1-element vectors (parallel.shard_model); the loss takes scalars.
    logit_bias = out[3].reshape(()) if len(out) > 3 and out[3] is not None else None
    return out[0], out[1], out[2].reshape(()), logit_bias


def _rng_state(device: torch.device):
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def _set_rng_state(state, device: torch.device) -> None:
    cpu_state, cuda_state = state
    torch.set_rng_state(cpu_state)
    if cuda_state is not None:
        torch.cuda.set_rng_state(cuda_state, device)


def contrastive_backward(
    model,
    loss_fn,
    micro_batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    accelerator,
    *,
    no_sync: Callable | None = None,
):
    """Accumulate into `.grad` the gradient of the loss over all micro-batches; return the loss (detached).

    `no_sync(model)` is the context that holds back gradient reduction (DDP's by default; FSDP passes its
    own): gradients are reduced once, on the last micro-batch's backward.
    """
    no_sync = no_sync or accelerator.no_sync
    if len(micro_batches) == 1:
        images, tokens = micro_batches[0]
        image_features, text_features, logit_scale, logit_bias = forward_towers(model, images, tokens)
        loss = loss_fn(image_features, text_features, logit_scale, logit_bias)
        accelerator.backward(loss)
        return loss.detach()

    device = micro_batches[0][0].device
    rng_states, image_chunks, text_chunks = [], [], []
    with torch.no_grad():
        for images, tokens in micro_batches:
            rng_states.append(_rng_state(device))
            image_features, text_features, logit_scale, logit_bias = forward_towers(model, images, tokens)
            image_chunks.append(image_features)
            text_chunks.append(text_features)

    # Leaves standing in for the towers' outputs and the logit parameters: the loss's backward fills
    # their .grad without touching the model (and, in DDP, without its gradient hooks). The features keep
    # the towers' dtype (bf16 under autocast), as without accumulation: they cross the loss's exchange at
    # that width, and their gradients come back in it, as autograd would hand them to the towers.
    image_all = torch.cat(image_chunks).requires_grad_()  # (k*b, D)
    text_all = torch.cat(text_chunks).requires_grad_()  # (k*b, D)
    scale = logit_scale.detach().float().requires_grad_()
    bias = logit_bias.detach().float().requires_grad_() if logit_bias is not None else None
    loss = loss_fn(image_all, text_all, scale, bias)
    loss.backward()

    sizes = [images.shape[0] for images, _ in micro_batches]
    image_grads, text_grads = image_all.grad.split(sizes), text_all.grad.split(sizes)
    k = len(micro_batches)
    for i, (images, tokens) in enumerate(micro_batches):
        _set_rng_state(rng_states[i], device)
        # Gradients are all-reduced once, on the last micro-batch.
        sync = no_sync(model) if i < k - 1 else contextlib.nullcontext()
        with sync:
            image_features, text_features, logit_scale, logit_bias = forward_towers(model, images, tokens)
            # d(surrogate)/d(features) = the cached gradients; the logit parameters' share is split evenly.
            surrogate = (image_features.float() * image_grads[i]).sum() + (
                text_features.float() * text_grads[i]
            ).sum()
            surrogate = surrogate + logit_scale * (scale.grad / k)
            if logit_bias is not None:
                surrogate = surrogate + logit_bias * (bias.grad / k)
            accelerator.backward(surrogate)
    return loss.detach()
