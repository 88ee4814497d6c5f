"""The zero-shot classifier against a float64 reference, and its on-disk cache's key."""

from __future__ import annotations

import pytest
import torch

from clipkit.eval import build_zeroshot_classifier, class_prompts, load_or_build_zeroshot_classifier
from test_eval_datasets import CLASSNAMES, TEMPLATES, small_model_bundle


@pytest.fixture(scope="module")
def bundle():
    return small_model_bundle(seed=0)


def reference_classifier(model, tokenizer, prompts_per_class):
    """Per class, in float64: normalise each prompt's embedding, average, normalise again."""
    columns = []
    with torch.no_grad():
        for prompts in prompts_per_class:
            embeddings = model.encode_text(tokenizer(prompts)).double()
            mean = (embeddings / embeddings.norm(dim=-1, keepdim=True)).mean(dim=0)
            columns.append(mean / mean.norm())
    return torch.stack(columns, dim=1)  # (D, C)


def test_classifier_is_the_normalised_mean_of_normalised_prompts(bundle):
    model, tokenizer = bundle.model, bundle.tokenizer
    model.eval()
    expected = reference_classifier(model, tokenizer, class_prompts(CLASSNAMES, TEMPLATES))
    for batch_size in (1, 4, 1000):  # batches cut across classes
        ours = build_zeroshot_classifier(model, tokenizer, CLASSNAMES, TEMPLATES, batch_size=batch_size)
        assert ours.dtype == torch.float32 and ours.shape == (32, 7)
        torch.testing.assert_close(ours.double(), expected, rtol=0, atol=1e-6)
    assert class_prompts(["cat"], TEMPLATES) == [["a photo of a cat.", "a drawing of the cat.", "cat"]]


def test_per_class_prompt_lists_are_used_as_given(bundle):
    model, tokenizer = bundle.model, bundle.tokenizer
    prompts = {"cat": ["a cat", "a small cat", "kitten"], "dog": ["a dog"]}
    ours = build_zeroshot_classifier(model.eval(), tokenizer, ["dog", "cat"], prompts, batch_size=2)
    expected = reference_classifier(model, tokenizer, [prompts["dog"], prompts["cat"]])
    torch.testing.assert_close(ours.double(), expected, rtol=0, atol=1e-6)


def test_training_mode_is_restored(bundle):
    model = bundle.model
    model.train()
    build_zeroshot_classifier(model, bundle.tokenizer, ["a", "b"], ["{c}"])
    assert model.training
    model.eval()


def test_cache_is_keyed_by_text_tower_and_prompts(bundle, tmp_path):
    model, tokenizer = bundle.model, bundle.tokenizer

    def lookup(classnames=CLASSNAMES, templates=TEMPLATES):
        return load_or_build_zeroshot_classifier(model, tokenizer, classnames, templates, cache_dir=tmp_path)

    first = lookup()
    assert not first.from_cache and first.path.is_file() and first.path.parent.parent == tmp_path
    again = lookup()
    assert again.from_cache and again.path == first.path
    assert torch.equal(again.classifier, first.classifier)
    assert not lookup(templates=TEMPLATES[:2]).from_cache
    assert not lookup(classnames=CLASSNAMES[::-1]).from_cache
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.visual.proj.add_(1.0)  # the image tower does not change the text classifier
        assert lookup().from_cache
        model.text_projection.add_(1e-3)  # the text tower does
        changed = lookup()
    model.load_state_dict(saved)
    assert not changed.from_cache and changed.path != first.path
    first.path.write_bytes(b"damaged")  # a damaged file is rebuilt, not trusted
    rebuilt = lookup()
    assert not rebuilt.from_cache
    torch.testing.assert_close(rebuilt.classifier, first.classifier, rtol=0, atol=0)
    assert [p.name for p in tmp_path.rglob("*.tmp")] == []
