"""Query embeddings: equal to open_clip's own `encode_text` / `encode_image`, with or without cutting the padding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clipkit.models import build_model
from clipkit.retrieval.encoder import Encoder, model_fingerprint, trims_text_padding
from test_eval_datasets import SMALL_MODEL, make_images

TEXTS = ["a red square", "x", "a photo of the number three on a long and winding road, " * 20, ""]


def non_causal_model() -> dict:
    """SigLIP-like text pooling: full attention, features from the last token (padding matters here)."""
    text_cfg = {**SMALL_MODEL["text_cfg"], "no_causal_mask": True, "pool_type": "last"}
    return {**SMALL_MODEL, "name": "non-causal", "text_cfg": text_cfg}


@pytest.mark.parametrize("source", ["tiny", "small", "non-causal"])
def test_text_embeddings_equal_open_clips_encode_text(source):
    torch.manual_seed(0)
    config = {"tiny": "tiny", "small": SMALL_MODEL, "non-causal": non_causal_model()}[source]
    bundle = build_model(config)
    assert trims_text_padding(bundle.model) == (source != "non-causal")
    encoder = Encoder(bundle)
    with torch.no_grad():
        reference = bundle.model.eval().encode_text(bundle.tokenizer(TEXTS), normalize=True).double().numpy()
    got = encoder.encode_texts(TEXTS)
    np.testing.assert_allclose(got, reference, atol=1e-5)
    # Alone or in a batch with longer texts, a query gets the same embedding.
    np.testing.assert_allclose(encoder.encode_texts(TEXTS[:1]), got[:1], atol=1e-5)


def test_image_embeddings_equal_open_clips_encode_image():
    torch.manual_seed(0)
    bundle = build_model(SMALL_MODEL)
    images = make_images(3, seed=31)
    with torch.no_grad():
        pixels = torch.stack([bundle.eval_transform(image) for image in images])
        reference = bundle.model.eval().encode_image(pixels, normalize=True).numpy()
    np.testing.assert_allclose(Encoder(bundle).encode_images(images), reference, atol=1e-6)


def test_the_fingerprint_names_the_weights_and_the_configs():
    torch.manual_seed(0)
    bundle = build_model(SMALL_MODEL)
    fingerprint = model_fingerprint(bundle)
    assert model_fingerprint(bundle) == fingerprint and len(fingerprint) == 64
    original = bundle.model.logit_scale.detach().clone()
    with torch.no_grad():
        bundle.model.logit_scale += 1e-3  # any weight
    assert model_fingerprint(bundle) != fingerprint
    with torch.no_grad():
        bundle.model.logit_scale.copy_(original)
    assert model_fingerprint(bundle) == fingerprint
    bundle.preprocess_cfg = {**bundle.preprocess_cfg, "mean": (0.5, 0.5, 0.5)}  # same weights, other inputs
    assert model_fingerprint(bundle) != fingerprint
