"""What both contrastive losses hold: the logit parameters' start and clamp, and the process layout."""

from __future__ import annotations

import math

import torch

from clipkit.errors import ClipkitError
from clipkit.losses.distributed import ProcessGroup, process_layout

AUTO = "auto"  # init_logit_bias resolved from the global contrastive batch


def auto_init_logit_bias(global_batch: int) -> float:
    """SigLIP's logit bias start for a global contrastive batch of N pairs: -log(N).

    With the logits near zero at the start, a bias of -log N makes sigmoid(bias) ~ 1/N, the share of
    positives in a row, so the N - 1 negatives do not swamp the one positive (the paper's -10 suits
    N ~ 32k; at N = 64 it starts far off, cf. open_clip #650).
    """
    if global_batch < 1:
        raise ClipkitError(f"global_batch={global_batch} must be at least 1 to derive init_logit_bias=auto")
    return -math.log(global_batch)


class ContrastiveLoss(torch.nn.Module):
    """Base of ClipLoss and SigLipLoss: state only, the math lives in pure functions.

    `init_logit_scale`, `init_logit_bias` and `max_logit_scale` are for the training loop: they are
    the model's starting log-scale and bias and the log-scale's clamp (the `conf/loss/*.yaml` keys).
    The loss itself takes the exponentiated scale and the bias as forward arguments, so, as open_clip's
    losses, it needs no arguments: unset, the start values are the loss family's published ones
    (`DEFAULT_INIT_LOGIT_SCALE`, `DEFAULT_INIT_LOGIT_BIAS`) and the scale is not clamped.

    `label_smoothing` (softmax losses only: CLIP) spreads that share of each row's target evenly over its
    logits, as torch's `cross_entropy(label_smoothing=)`.

    `init_logit_bias="auto"` (losses whose value depends on a bias: SigLIP) is `auto_init_logit_bias` of
    `global_batch`, the pairs one loss call sees over all processes and accumulated micro-batches (the
    trainer passes it; `global_batch` is used for nothing else).

    `rank` / `world_size` / `group` place this process among the data-parallel processes; unset, they
    are read from torch.distributed at each call (0 and 1 when it is not initialised).
    """

    # The start the loss family was published with; subclasses set their own.
    DEFAULT_INIT_LOGIT_SCALE: float = 0.0
    DEFAULT_INIT_LOGIT_BIAS: float | None = None
    # Whether init_logit_bias=auto means anything: softmax ignores a constant shift of a row's logits.
    ACCEPTS_AUTO_LOGIT_BIAS: bool = False
    # Whether label_smoothing means anything: it smooths a softmax's target over its row.
    ACCEPTS_LABEL_SMOOTHING: bool = False

    def __init__(
        self,
        *,
        init_logit_scale: float | None = None,
        init_logit_bias: float | str | None = None,
        max_logit_scale: float | None = None,
        global_batch: int | None = None,
        label_smoothing: float = 0.0,
        rank: int | None = None,
        world_size: int | None = None,
        group: ProcessGroup | None = None,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        if isinstance(init_logit_bias, str):
            init_logit_bias = self._auto_logit_bias(init_logit_bias, global_batch)
        if init_logit_scale is None:
            init_logit_scale = self.DEFAULT_INIT_LOGIT_SCALE
            init_logit_bias = self.DEFAULT_INIT_LOGIT_BIAS if init_logit_bias is None else init_logit_bias
        if max_logit_scale is not None and init_logit_scale > max_logit_scale:
            raise ClipkitError(
                f"{name}: init_logit_scale={init_logit_scale} exceeds max_logit_scale={max_logit_scale} "
                "(both are logs of the scale): lower loss.init_logit_scale or raise loss.max_logit_scale"
            )
        if not 0.0 <= label_smoothing < 1.0:
            raise ClipkitError(f"{name}: label_smoothing={label_smoothing} must be in [0, 1), e.g. 0.1")
        if label_smoothing and not self.ACCEPTS_LABEL_SMOOTHING:
            raise ClipkitError(
                f"{name}: label_smoothing={label_smoothing} is for the softmax loss: use loss=clip or set "
                "loss.label_smoothing=0"
            )
        if world_size is not None and world_size < 1:
            raise ClipkitError(f"{name}: world_size={world_size} must be at least 1")
        if rank is not None and world_size is not None and not 0 <= rank < world_size:
            raise ClipkitError(f"{name}: rank={rank} must be in [0, world_size={world_size})")
        self.init_logit_scale = float(init_logit_scale)
        self.init_logit_bias = None if init_logit_bias is None else float(init_logit_bias)
        self.max_logit_scale = None if max_logit_scale is None else float(max_logit_scale)
        self.label_smoothing = float(label_smoothing)
        self.rank = rank
        self.world_size = world_size
        self.group = group

    def _auto_logit_bias(self, setting: str, global_batch: int | None) -> float:
        name = type(self).__name__
        if setting != AUTO:
            raise ClipkitError(f"{name}: init_logit_bias={setting!r} must be a number, null or 'auto'")
        if not self.ACCEPTS_AUTO_LOGIT_BIAS:
            raise ClipkitError(
                f"{name}: init_logit_bias=auto is for the sigmoid loss (softmax ignores a constant bias): "
                "set loss.init_logit_bias=null"
            )
        if global_batch is None:
            raise ClipkitError(
                f"{name}: init_logit_bias=auto needs global_batch (the pairs one loss call sees over all "
                "processes; the trainer passes it): pass global_batch= or a number"
            )
        return auto_init_logit_bias(global_batch)

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
            f"max_logit_scale={self.max_logit_scale}, label_smoothing={self.label_smoothing}, "
            f"rank={self.rank}, world_size={self.world_size}"
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
