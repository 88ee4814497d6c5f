"""Weight-space interpolation of two models of one architecture (WiSE-FT, Wortsman et al. 2022).

merged = (1 - alpha) * A + alpha * B per tensor: alpha 0 is A and alpha 1 is B, exactly (torch.lerp is
exact at both ends), 0.5 the average. `merge_models` writes the result into A's model. Non-float tensors (integer buffers) must agree and are copied.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from clipkit.errors import ClipkitError
from clipkit.models.factory import ModelBundle


def interpolate_state_dicts(
    a: Mapping[str, torch.Tensor],
    b: Mapping[str, torch.Tensor],
    alpha: float,
    *,
    names: tuple[str, str] = ("A", "B"),
) -> dict[str, torch.Tensor]:
    if not 0.0 <= alpha <= 1.0:
        raise ClipkitError(f"alpha={alpha} must be in [0, 1] (0: {names[0]}, 1: {names[1]})")
    if a.keys() != b.keys():
        only_a, only_b = sorted(set(a) - set(b))[:3], sorted(set(b) - set(a))[:3]
        raise ClipkitError(
            f"{names[0]} and {names[1]} have different parameters (only in {names[0]}: {only_a}, "
            f"only in {names[1]}: {only_b}); merge models of one architecture"
        )
    merged = {}
    for key, ta in a.items():
        tb = b[key]
        if ta.shape != tb.shape:
            raise ClipkitError(
                f"{key} has shape {tuple(ta.shape)} in {names[0]} but {tuple(tb.shape)} in {names[1]}"
            )
        if ta.is_floating_point():
            # In float64, then rounded once: the average of two float32 weights comes out correctly rounded.
            merged[key] = torch.lerp(ta.double(), tb.double(), alpha).to(ta.dtype)
        elif torch.equal(ta, tb):
            merged[key] = ta.clone()
        else:
            raise ClipkitError(f"{key} (a {ta.dtype} buffer) differs between {names[0]} and {names[1]}")
    return merged


def merge_models(a: ModelBundle, b: ModelBundle, alpha: float) -> ModelBundle:
    """A's bundle (architecture, preprocessing, tokenizer) with the interpolated weights."""
    if a.model_cfg != b.model_cfg:
        raise ClipkitError(
            f"models '{a.name}' and '{b.name}' have different architectures (open_clip model_cfg); "
            "WiSE-FT interpolates a model with a fine-tuned copy of itself"
        )
    merged = interpolate_state_dicts(
        a.model.state_dict(), b.model.state_dict(), alpha, names=(a.name, b.name)
    )
    a.model.load_state_dict(merged, strict=True)
    return ModelBundle(
        **{
            **vars(a),
            "name": f"{a.name}-{b.name}-wise-ft-{alpha:g}",
            "weights_source": f"merge({a.weights_source}, {b.weights_source}, alpha={alpha:g})",
        }
    )
