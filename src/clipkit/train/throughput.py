"""Training throughput in model FLOPs: samples/s, TFLOP/s and MFU beside the loss (nanoGPT's estimate_mfu).

FLOPs per sample are counted once, at the start, by torch's FlopCounterMode on one sample's forward and
backward through a copy of the model whose tensors live on the meta device: shapes only, so no arithmetic,
no memory and no draw from the run's random generators. Forward + backward is counted rather than 3 x the
forward because the backward is not always twice the forward: a frozen tower (train.lock_image) computes no
weight gradients, and the patch embedding no gradient for the images. Recomputation by grad checkpointing
is not counted (model FLOPs, as PaLM defines MFU, not hardware FLOPs), nor is the loss (O(B^2 D), small).
"""

from __future__ import annotations

import copy
import logging
import re
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from clipkit.models import ModelBundle

log = logging.getLogger("clipkit.train")

# Dense (no sparsity) peak FLOP/s of one GPU from NVIDIA's data sheets, matched against
# torch.cuda.get_device_name() in order (first match): pattern, then bf16 (also fp16: the same tensor-core
# rate), tf32 (float32 matmuls with train.tf32 on Ampere and newer) and fp32 (no tensor cores).
# Not listed, so MFU is null: GPUs without a data sheet figure (A10G), and CPUs.
PEAK_FLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    (r"H200 NVL", {"bf16": 835.5e12, "tf32": 417.5e12, "fp32": 60.0e12}),
    (r"H200", {"bf16": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12}),  # SXM
    (r"H100 NVL", {"bf16": 835.5e12, "tf32": 417.5e12, "fp32": 60.0e12}),
    (r"H100 PCIe", {"bf16": 756.5e12, "tf32": 378.0e12, "fp32": 51.2e12}),
    (r"H100", {"bf16": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12}),  # SXM ("H100 80GB HBM3")
    (r"A100", {"bf16": 312.0e12, "tf32": 156.0e12, "fp32": 19.5e12}),  # SXM and PCIe, 40 and 80 GB
    (r"L40S", {"bf16": 362.05e12, "tf32": 183.0e12, "fp32": 91.6e12}),
    (r"\bL4\b", {"bf16": 121.0e12, "tf32": 60.0e12, "fp32": 30.3e12}),
    (r"\bA10\b", {"bf16": 125.0e12, "tf32": 62.5e12, "fp32": 31.2e12}),  # not A10G, not A100
)


def peak_flops(device_name: str | None, precision: str, *, tf32: bool = True) -> float | None:
    """The dense peak FLOP/s of one `device_name` GPU at `precision` (fp32 | bf16 | fp16); None if unknown."""
    if not device_name:
        return None
    column = {"bf16": "bf16", "fp16": "bf16", "fp32": "tf32" if tf32 else "fp32"}.get(precision)
    for pattern, peaks in PEAK_FLOPS:
        if re.search(pattern, device_name):
            return peaks[column] if column else None
    return None


def device_name(device: torch.device) -> str | None:
    """The GPU's name as the peak table knows it; None on a CPU (no table: MFU is null)."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else None


def training_flops_per_sample(model: torch.nn.Module, images: torch.Tensor, tokens: torch.Tensor) -> int:
    """Model FLOPs of one training forward + backward of `model(images, tokens)`, per sample.

    `images` (B, 3, H, W) and `tokens` (B, L) only give shapes and dtypes. Parameters that do not require
    gradients get none, as in training; the model itself is not run, changed or moved.
    """
    shadow = _meta_copy(model).train()
    if hasattr(shadow, "set_grad_checkpointing"):  # the copy only: recomputation is not model FLOPs
        shadow.set_grad_checkpointing(False)
    images, tokens = images.to("meta"), tokens.to("meta")
    counter = FlopCounterMode(display=False)
    # open_clip's patch dropout draws its mask on the CPU even for meta inputs: leave the run's generator be.
    with torch.random.fork_rng(devices=[]), counter:
        outputs = shadow(images, tokens)
        outputs = outputs.values() if isinstance(outputs, dict) else outputs
        # Any scalar of both features has a gradient reaching every trainable parameter of both towers.
        loss = sum(o.float().sum() for o in outputs if isinstance(o, torch.Tensor) and o.ndim == 2)
        loss.backward()
    return counter.get_total_flops() // images.shape[0]


def _meta_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of `model` whose parameters and buffers are meta tensors of the same shapes (no memory)."""
    memo = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        meta = torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")
        if isinstance(tensor, torch.nn.Parameter):
            meta = torch.nn.Parameter(meta, requires_grad=tensor.requires_grad)
        memo[id(tensor)] = meta  # deepcopy reuses these instead of copying the real tensors
    return copy.deepcopy(model, memo)


@dataclass(frozen=True, kw_only=True)
class Throughput:
    """Turns a measured samples/s into the logged fields; built once per run."""

    flops_per_sample: int | None  # model FLOPs of one sample's forward + backward
    peak_flops: float | None  # one device's dense peak at the run's precision; None where unknown
    processes: int  # devices the samples/s is summed over

    def metrics(self, samples_per_s: float) -> dict[str, float | None]:
        """samples_per_s (all processes), tflops (achieved model TFLOP/s per device) and mfu (its share of
        the device's peak; None where the peak is unknown, e.g. on a CPU)."""
        if self.flops_per_sample is None:
            return {"samples_per_s": samples_per_s, "tflops": None, "mfu": None}
        flops_per_s = self.flops_per_sample * samples_per_s / self.processes  # per device
        return {
            "samples_per_s": samples_per_s,
            "tflops": flops_per_s / 1e12,
            "mfu": None if self.peak_flops is None else flops_per_s / self.peak_flops,
        }


def example_inputs(bundle: ModelBundle) -> tuple[torch.Tensor, torch.Tensor]:
    """One sample as the model takes it: images (1, 3, H, W) at the model's size, tokens (1, L) from its tokenizer."""
    size = bundle.preprocess_cfg["size"]
    height, width = (size, size) if isinstance(size, int) else size
    return torch.zeros(1, 3, height, width), bundle.tokenizer(["a photo"])


def measure_throughput(
    model: torch.nn.Module,
    bundle: ModelBundle,
    *,
    device: torch.device,
    precision: str,
    tf32: bool,
    processes: int,
) -> Throughput:
    """Count `model`'s FLOPs per sample (as configured for training: frozen towers, patch dropout) on one
    sample of `bundle`'s size, and look up the device's peak; both are logged once."""
    try:
        flops = training_flops_per_sample(model, *example_inputs(bundle))
    except (RuntimeError, NotImplementedError) as e:  # an operator without a meta kernel
        log.warning("tflops and mfu are not logged: the model's FLOPs could not be counted (%s)", e)
        flops = None
    name = device_name(device)
    peak = peak_flops(name, precision, tf32=tf32)
    if flops is not None:
        where = (
            f"{name} peak {peak / 1e12:.1f} TFLOP/s ({precision})"
            if peak
            else f"no known peak for {name or device.type}: mfu is null"
        )
        log.info("model FLOPs per sample (forward + backward): %.3g GFLOP; %s", flops / 1e9, where)
    return Throughput(flops_per_sample=flops, peak_flops=peak, processes=processes)
