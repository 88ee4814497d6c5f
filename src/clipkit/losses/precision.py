"""Float32 matmuls that stay float32 when the process has TF32 on (as training on Ampere+ GPUs does).

TF32 keeps 10 of float32's 23 mantissa bits: fine for the towers, but the losses promise float32 math
on the features they are given, so their own matmuls, forward and backward, run in IEEE float32.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def ieee_float32_matmuls(device: torch.device) -> Iterator[None]:
    """CUDA float32 matmuls in IEEE float32 inside the block; the process's setting is restored after.

    Uses the API family torch has: `fp32_precision` (torch >= 2.9, which reads a setting made with either
    API; mixing the two in writes makes torch refuse to read it back), else the older `allow_tf32`.
    CPU matmuls are float32 already.
    """
    if device.type != "cuda":
        yield
        return
    matmul = torch.backends.cuda.matmul
    key, ieee = ("fp32_precision", "ieee") if hasattr(matmul, "fp32_precision") else ("allow_tf32", False)
    previous = getattr(matmul, key)
    if previous == ieee:
        yield
        return
    setattr(matmul, key, ieee)
    try:
        yield
    finally:
        setattr(matmul, key, previous)


class _Float32MatmulTransposed(torch.autograd.Function):
    """a @ b.T with the forward and both backward products in IEEE float32."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(a, b)
        with ieee_float32_matmuls(a.device):
            return a @ b.T

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        a, b = ctx.saved_tensors
        # backward() may run inside an autocast region, which would lower these products to bf16/fp16.
        with torch.autocast(grad.device.type, enabled=False), ieee_float32_matmuls(grad.device):
            grad_a = grad @ b if ctx.needs_input_grad[0] else None
            grad_b = grad.T @ a if ctx.needs_input_grad[1] else None
        return grad_a, grad_b


def matmul_transposed(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(m, D), (n, D) -> (m, n) = a @ b.T, differentiable, in IEEE float32 (or float64) on any device."""
    return _Float32MatmulTransposed.apply(a, b)
