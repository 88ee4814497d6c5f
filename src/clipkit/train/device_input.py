"""Images travel to the device as uint8 and are normalised there: a quarter of the bytes of float32 through
the data workers' queues and the host-to-device copy, and the (cheap) normalisation runs on the GPU.

The model's training transform ends in `ToTensor` + `Normalize` (open_clip's layout). `split_normalisation`
cuts those two off: the data stream's transform stops at a uint8 (3, H, W) tensor, and `DeviceNormalise`
applies the same arithmetic as torchvision's `to_tensor` + `Normalize` (divide by 255, subtract the mean,
divide by the std, in float32) to the batch on the device, so the pixels the model sees are identical.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torchvision import transforms

log = logging.getLogger(__name__)


class ToUint8Tensor:
    """PIL image (or a uint8 tensor) -> uint8 (C, H, W) tensor; picklable for data workers."""

    def __call__(self, image) -> torch.Tensor:
        if isinstance(image, torch.Tensor):
            if image.dtype != torch.uint8:
                raise TypeError(f"expected a PIL image or a uint8 tensor, got a {image.dtype} tensor")
            return image
        if getattr(image, "mode", None) not in ("RGB", "L"):  # other modes are not 8 bits per channel
            raise TypeError(f"expected an RGB or L image, got mode {getattr(image, 'mode', type(image))}")
        array = np.asarray(image, dtype=np.uint8)  # (H, W, C) or (H, W)
        if array.ndim == 2:
            array = array[:, :, None]
        return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()  # (C, H, W)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class DeviceNormalise:
    """uint8 (B, C, H, W) on the device -> float32 normalised images, as to_tensor + Normalize would give."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)  # (1, C, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:  # already normalised on the host
            return images
        if self.mean.device != images.device:
            self.mean, self.std = self.mean.to(images.device), self.std.to(images.device)
        return images.float().div_(255).sub_(self.mean).div_(self.std)


def split_normalisation(transform: Callable) -> tuple[Callable, DeviceNormalise] | None:
    """(host transform ending in a uint8 tensor, device normalisation), or None when the transform does not
    end in ToTensor + Normalize (then images travel as float32, as the transform makes them)."""
    steps = getattr(transform, "transforms", None)
    if not steps or len(steps) < 2:
        return None
    to_tensor, normalize = steps[-2], steps[-1]
    # open_clip's MaybeToTensor is a ToTensor; MaybeConvertMode before it makes the image RGB.
    if not isinstance(normalize, transforms.Normalize) or not isinstance(to_tensor, transforms.ToTensor):
        log.info(
            "train.uint8_images: the transform does not end in ToTensor + Normalize; images stay float32"
        )
        return None
    host = transforms.Compose([*steps[:-2], ToUint8Tensor()])
    return host, DeviceNormalise(normalize.mean, normalize.std)
