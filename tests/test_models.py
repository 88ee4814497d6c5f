"""Every model config builds and trains a step; sources resolve; logit parameters follow the loss."""

from __future__ import annotations

import math

import pytest
import torch

from clipkit.configs import config_dir
from clipkit.errors import ClipkitError
from clipkit.models import ModelConfig, build_model, create_model, list_model_configs, load_model_config

REDUCED_IMAGE_SIZE = 64  # every architecture here has a patch size dividing 64


@pytest.mark.parametrize("name", list_model_configs())
def test_every_model_config_runs_forward_and_backward(name):
    config = load_model_config(config_dir() / "model" / f"{name}.yaml")
    if name != "tiny":  # tiny is already small; the others run at reduced resolution
        config.vision_cfg = {**config.vision_cfg, "image_size": REDUCED_IMAGE_SIZE}
    model_cfg = config.to_open_clip_cfg()
    torch.manual_seed(0)
    model = create_model(model_cfg)
    model.train()
    size = model.visual.image_size
    images = torch.randn(2, 3, *size)
    text_cfg = model_cfg["text_cfg"]
    tokens = torch.randint(1, text_cfg.get("vocab_size", 49408) - 1, (2, text_cfg.get("context_length", 77)))
    image_features, text_features, logit_scale = model(images, tokens)[:3]
    embed_dim = model_cfg["embed_dim"]
    assert image_features.shape == (2, embed_dim) and text_features.shape == (2, embed_dim)
    assert torch.isfinite(image_features).all() and torch.isfinite(text_features).all()
    # Features come out L2-normalised, as open_clip's contrastive losses expect.
    torch.testing.assert_close(image_features.norm(dim=-1), torch.ones(2))
    logits = logit_scale * image_features @ text_features.T
    loss = torch.nn.functional.cross_entropy(logits, torch.arange(2))
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    visual_ids = {id(p) for p in model.visual.parameters()}
    visual_grad = sum(p.grad.abs().sum() for p in model.visual.parameters() if p.grad is not None)
    text_grad = sum(
        p.grad.abs().sum() for p in model.parameters() if p.grad is not None and id(p) not in visual_ids
    )
    assert visual_grad > 0 and text_grad > 0  # both towers learn


def test_tiny_matches_its_documented_shape():
    bundle = build_model("tiny")
    model = bundle.model
    assert bundle.model_cfg["embed_dim"] == 128
    assert model.visual.image_size == (32, 32) and model.visual.patch_size == (4, 4)
    assert len(model.visual.transformer.resblocks) == 4 and model.visual.transformer.width == 128
    assert len(model.transformer.resblocks) == 4 and model.transformer.width == 128
    assert model.context_length == 16
    assert bundle.tokenizer(["a red square"]).shape == (1, 16)


def test_architecture_name_builds_open_clip_model_with_transforms():
    bundle = build_model("ViT-S-32-alt")
    assert bundle.model_cfg["embed_dim"] == 256
    assert bundle.preprocess_cfg["size"] == (224, 224)
    from PIL import Image

    image = Image.new("RGB", (300, 200), (200, 10, 10))
    assert bundle.eval_transform(image).shape == (3, 224, 224)
    assert bundle.train_transform(image).shape == (3, 224, 224)
    assert bundle.tokenizer(["hello"]).shape == (1, 77)


def test_mapping_source_with_arch_overrides_is_merged():
    bundle = build_model(
        {
            "name": "small-b32",
            "arch": "ViT-B-32",
            "vision_cfg": {"image_size": 64, "layers": 2},
            "text_cfg": {"layers": 2},
        }
    )
    assert bundle.model.visual.image_size == (64, 64)
    assert len(bundle.model.visual.transformer.resblocks) == 2
    assert bundle.model_cfg["vision_cfg"]["width"] == 768  # the rest still comes from open_clip's config


def test_logit_parameters_follow_the_loss_and_config_wins():
    clip = build_model("tiny", init_logit_scale=math.log(1 / 0.07))
    assert clip.model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    assert getattr(clip.model, "logit_bias", None) is None

    siglip = build_model("tiny", init_logit_scale=math.log(10), init_logit_bias=-10.0)
    assert siglip.model.logit_scale.item() == pytest.approx(math.log(10))
    assert siglip.model.logit_bias.item() == pytest.approx(-10.0)

    config = load_model_config(config_dir() / "model" / "tiny.yaml")
    config.init_logit_scale, config.init_logit_bias = 1.5, -3.0
    own = build_model(config, init_logit_scale=math.log(10), init_logit_bias=-10.0)
    assert own.model.logit_scale.item() == pytest.approx(1.5)
    assert own.model.logit_bias.item() == pytest.approx(-3.0)


def test_preprocess_overrides_reach_the_transforms():
    bundle = build_model(
        {
            "name": "t",
            "embed_dim": 32,
            "vision_cfg": {"image_size": 32, "patch_size": 8, "layers": 1, "width": 64, "head_width": 32},
            "text_cfg": {"context_length": 8, "width": 64, "heads": 2, "layers": 1},
            "preprocess": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "resize_mode": "squash"},
        }
    )
    from PIL import Image

    white = bundle.eval_transform(Image.new("RGB", (40, 20), (255, 255, 255)))
    torch.testing.assert_close(white, torch.ones(3, 32, 32))  # (1 - 0.5) / 0.5, squashed, not cropped


def test_unknown_model_name_lists_where_it_looked():
    with pytest.raises(ClipkitError, match=r"unknown model 'no-such-model'.*conf/model \(.*tiny.*open_clip"):
        build_model("no-such-model")


def test_unknown_config_key_is_named():
    with pytest.raises(ClipkitError, match=r"unknown key\(s\) \['image_size'\].*vision_cfg"):
        ModelConfig.from_dict({"arch": "ViT-B-32", "image_size": 64})


def test_weights_file_without_architecture_says_how_to_name_both(tmp_path):
    path = tmp_path / "w.pt"
    torch.save(build_model("tiny").model.state_dict(), path)
    with pytest.raises(ClipkitError, match=r"holds weights but not the architecture"):
        build_model(str(path))


def test_missing_directory_says_what_was_looked_for(tmp_path):
    with pytest.raises(ClipkitError, match=r"not a model directory: expected .*open_clip_config.json"):
        build_model(str(tmp_path))
    with pytest.raises(ClipkitError, match=r"model directory not found"):
        build_model(f"local-dir:{tmp_path / 'absent'}")
