"""Exported models load in open_clip itself with the same embeddings, tokenizer and preprocessing."""

from __future__ import annotations

import json
import math

import open_clip
import pytest
import safetensors.torch
import torch
from PIL import Image

from clipkit.errors import ClipkitError
from clipkit.models import build_model, export_model
from conftest import run_clipkit


def _assert_open_clip_rebuilds(bundle, out_dir):
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out_dir}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{out_dir}")
    model.eval()
    bundle.model.eval()
    captions = ["a red circle at the top left.", "a photo of the number three.", ""]
    tokens = tokenizer(captions)
    torch.testing.assert_close(tokens, bundle.tokenizer(captions), rtol=0, atol=0)
    image = Image.new("RGB", (50, 37), (10, 200, 30))
    pixels = preprocess(image)
    torch.testing.assert_close(pixels, bundle.eval_transform(image), rtol=0, atol=0)
    torch.manual_seed(0)
    images = torch.randn(4, *pixels.shape)
    with torch.no_grad():
        ours_image, theirs_image = bundle.model.encode_image(images), model.encode_image(images)
        ours_text, theirs_text = bundle.model.encode_text(tokens), model.encode_text(tokens)
    assert (ours_image - theirs_image).abs().max() <= 1e-6
    assert (ours_text - theirs_text).abs().max() <= 1e-6
    torch.testing.assert_close(model.logit_scale, bundle.model.logit_scale, rtol=0, atol=0)
    return model


def _perturb(model):
    # Move away from the initialisation so equality cannot come from both sides starting the same.
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))


def test_clip_export_loads_in_open_clip(tmp_path):
    bundle = build_model("tiny", init_logit_scale=math.log(1 / 0.07))
    _perturb(bundle.model)
    out = export_model(bundle, tmp_path / "exported")
    assert sorted(p.name for p in out.iterdir()) == ["open_clip_config.json", "open_clip_model.safetensors"]
    config = json.loads((out / "open_clip_config.json").read_text())
    assert config["preprocess_cfg"]["size"] == [32, 32]
    model = _assert_open_clip_rebuilds(bundle, out)
    assert getattr(model, "logit_bias", None) is None


def test_siglip_export_keeps_logit_bias_and_preprocessing(tmp_path):
    bundle = build_model(
        {
            "name": "tiny-siglip",
            "embed_dim": 64,
            "vision_cfg": {"image_size": 32, "patch_size": 8, "layers": 2, "width": 64, "head_width": 32},
            "text_cfg": {"context_length": 12, "width": 64, "heads": 2, "layers": 2},
            "preprocess": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "resize_mode": "squash"},
        },
        init_logit_scale=math.log(10),
        init_logit_bias=-10.0,
    )
    _perturb(bundle.model)
    out = export_model(bundle, tmp_path / "siglip")
    model = _assert_open_clip_rebuilds(bundle, out)
    torch.testing.assert_close(model.logit_bias, bundle.model.logit_bias, rtol=0, atol=0)
    # And clipkit reads its own export back to the same weights.
    again = build_model(str(out))
    for (name, a), (_, b) in zip(
        bundle.model.state_dict().items(), again.model.state_dict().items(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_open_clip_state_dict_with_architecture_name_exports(tmp_path):
    source = build_model(
        {
            "name": "b32-small",
            "arch": "ViT-B-32",
            "vision_cfg": {"image_size": 64, "layers": 1},
            "text_cfg": {"layers": 1},
        }
    )
    _perturb(source.model)
    # The layout open_clip's trainer writes: DDP-prefixed names inside {"state_dict": ...}.
    checkpoint = tmp_path / "epoch_1.pt"
    torch.save(
        {
            "epoch": 1,
            "name": "b32",
            "state_dict": {f"module.{k}": v for k, v in source.model.state_dict().items()},
        },
        checkpoint,
    )
    config = tmp_path / "b32-small.yaml"
    config.write_text("arch: ViT-B-32\nvision_cfg: {image_size: 64, layers: 1}\ntext_cfg: {layers: 1}\n")
    result = run_clipkit(
        "export", str(config), "--pretrained", str(checkpoint), "--out", str(tmp_path / "out")
    )
    assert result.returncode == 0, result.stderr
    loaded = build_model(str(tmp_path / "out"))
    for (name, a), (_, b) in zip(
        source.model.state_dict().items(), loaded.model.state_dict().items(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    weights = safetensors.torch.load_file(str(tmp_path / "out" / "open_clip_model.safetensors"))
    assert not any(k.startswith("module.") for k in weights)


def test_export_refuses_to_overwrite_and_leaves_nothing_half_written(tmp_path, monkeypatch):
    bundle = build_model("tiny")
    out = export_model(bundle, tmp_path / "model")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(ClipkitError, match="already exists.*--overwrite"):
        export_model(bundle, out)

    def fail_midway(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", fail_midway)
    with pytest.raises(OSError, match="disk full"):
        export_model(bundle, out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary directory left
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the old export is untouched


def test_cli_export_of_unknown_source_is_one_line_error(tmp_path):
    result = run_clipkit("export", "not-a-model", "--out", str(tmp_path / "x"))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("clipkit export: error: unknown model 'not-a-model'")
    assert not (tmp_path / "x").exists()
