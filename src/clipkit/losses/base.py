"""What both contrastive losses hold: the logit parameters' start and clamp, and the process layout."""

from __future__ import annotations

import torch

from clipkit.errors import ClipkitError
from clipkit.losses.distributed import ProcessGroup, process_layout


class ContrastiveLoss(torch.nn.Module):
    """Base of ClipLoss and SigLipLoss: state only, the math lives in pure functions.

    `init_logit_scale`, `init_logit_bias` and `max_logit_scale` are for the training loop: they are
    the model's starting log-scale and bias and the log-scale's clamp (the `conf/loss/*.yaml` keys).
    The loss itself takes the exponentiated scale and the bias as forward arguments.

    `rank` / `world_size` / `group` place this process among the data-parallel processes; unset, they
    are read from torch.distributed at each call (0 and 1 when it is not initialised).
    """

    def __init__(
        self,
        *,
        init_logit_scale: float,
        init_logit_bias: float | None = None,
        max_logit_scale: float | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        group: ProcessGroup | None = None,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        if max_logit_scale is not None and init_logit_scale > max_logit_scale:
            raise ClipkitError(
                f"{name}: init_logit_scale={init_logit_scale} exceeds max_logit_scale={max_logit_scale} "
                "(both are logs of the scale): lower loss.init_logit_scale or raise loss.max_logit_scale"
            )
        if world_size is not None and world_size < 1:
            raise ClipkitError(f"{name}: world_size={world_size} must be at least 1")
        if rank is not None and world_size is not None and not 0 <= rank < world_size:
            raise ClipkitError(f"{name}: rank={rank} must be in [0, world_size={world_size})")
        self.init_logit_scale = float(init_logit_scale)
        self.init_logit_bias = None if init_logit_bias is None else float(init_logit_bias)
        self.max_logit_scale = None if max_logit_scale is None else float(max_logit_scale)
        self.rank = rank
        self.world_size = world_size
        self.group = group

    def process_layout(self) -> tuple[int, int]:
        """(rank, world_size) for this call."""
        return process_layout(self.group, self.rank, self.world_size, loss_name=type(self).__name__)

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor | float,
        logit_bias: torch.Tensor | float | None = None,
    ) -> torch.Tensor:
        """This rank's loss on its (b, D) features; `logit_scale` already exponentiated."""
        rank, world_size = self.process_layout()
        image, text, scale, bias = prepare_inputs(image_features, text_features, logit_scale, logit_bias)
        # Autocast would send the matmuls back to bf16/fp16: the loss keeps its own precision.
        with torch.autocast(image.device.type, enabled=False):
            return self.loss_on_this_rank(image, text, scale, bias, rank=rank, world_size=world_size)

    def loss_on_this_rank(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None,
        *,
        rank: int,
        world_size: int,
    ) -> torch.Tensor:
        """The loss on (b, D) features in their own (wire) dtype and scalars in the math dtype.

        Features cross processes in their own dtype (bf16 features travel as bf16: half the bytes of
        float32, and exact) and are upcast to the scalars' dtype on arrival; gradients w.r.t. them are
        summed in that dtype and rounded to the features' dtype once, on the way out.
        """
        raise NotImplementedError

    def extra_repr(self) -> str:
        return (
            f"init_logit_scale={self.init_logit_scale}, init_logit_bias={self.init_logit_bias}, "
            f"max_logit_scale={self.max_logit_scale}, rank={self.rank}, world_size={self.world_size}"
        )


def math_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the loss computes in for features of `dtype`: float32 at least, float64 stays."""
    return torch.promote_types(dtype, torch.float32)


def prepare_inputs(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
    logit_bias: torch.Tensor | float | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Check shapes; features in one shared dtype (their own), scale and bias in the math dtype.

    Features may arrive in bf16/fp16: they stay so until they have crossed processes, and the math
    then runs in float32 (`math_dtype`). The casts are differentiable, so gradients flow back in the
    callers' dtypes.
    """
    if image_features.ndim != 2 or image_features.shape != text_features.shape:
        raise ValueError(
            "image_features and text_features must both be (batch, dim), got "
            f"{tuple(image_features.shape)} and {tuple(text_features.shape)}"
        )
    wire = torch.promote_types(image_features.dtype, text_features.dtype)
    if not wire.is_floating_point:
        raise ValueError(f"image_features and text_features must be floating point, got {wire}")
    dtype = math_dtype(wire)
    device = image_features.device

    def scalar(value):
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise ValueError(
                    f"logit_scale and logit_bias must be scalars, got shape {tuple(value.shape)}"
                )
            return value.to(device=device, dtype=dtype)
        return torch.tensor(float(value), dtype=dtype, device=device)

    return (
        image_features.to(wire),
        text_features.to(wire),
        scalar(logit_scale),
        None if logit_bias is None else scalar(logit_bias),
    )
