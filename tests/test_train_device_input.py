"""uint8 images to the device, normalised there: the same pixels as the model's float32 transform."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from clipkit.models import build_model
from clipkit.train.device_input import split_normalisation


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA"])
def test_uint8_images_normalised_on_the_device_equal_the_float_transform(mode):
    transform = build_model("tiny").train_transform
    host, normalise = split_normalisation(transform)
    rng = np.random.default_rng(0)
    channels = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
    pixels = rng.integers(0, 256, (40, 48, channels), dtype=np.uint8).squeeze()
    images = [Image.fromarray(pixels, mode=mode) for _ in range(3)]

    torch.manual_seed(1)  # the same random crops on both paths
    expected = torch.stack([transform(image) for image in images])  # float32 (3, 3, 32, 32)
    torch.manual_seed(1)
    batch = torch.stack([host(image) for image in images])
    assert batch.dtype == torch.uint8 and batch.shape == expected.shape
    assert torch.equal(normalise(batch), expected)


def test_a_transform_without_to_tensor_and_normalize_keeps_float_images():
    assert split_normalisation(lambda image: image) is None
