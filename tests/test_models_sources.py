"""Model sources: hf-hub repos and open_clip pretrained tags from a Hugging Face cache on disk, offline.

The cache is laid out as `hf download` leaves it (models--ORG--NAME/snapshots/REV/, refs/main), holding a
small model in open_clip's hub layout (open_clip_config.json + open_clip_model.safetensors).
"""

from __future__ import annotations

import json

import open_clip
import pytest
import torch
from accelerate.state import AcceleratorState
from safetensors.torch import load_file

from clipkit.errors import ClipkitError
from clipkit.models import ModelConfig, build_model, export_model, load_model_config
from clipkit.models.config import find_model_config_file
from conftest import run_clipkit
from hub_helpers import put_in_hub_cache, use_hub_cache
from test_eval_datasets import SMALL_MODEL, labels_for, make_images, write_class_folders

REPO = "clipkit-test/small-clip"
# Not clipkit's defaults, so a test sees whether the checkpoint's own preprocessing is used.
PREPROCESS = {
    "mean": [0.5, 0.5, 0.5],
    "std": [0.5, 0.5, 0.5],
    "interpolation": "bilinear",
    "resize_mode": "squash",
}


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory):
    """The small model with fixed non-initial weights, exported in open_clip's layout."""
    torch.manual_seed(0)
    bundle = build_model({**SMALL_MODEL, "preprocess": PREPROCESS}, init_logit_scale=2.0)
    with torch.no_grad():
        for parameter in bundle.model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return export_model(bundle, tmp_path_factory.mktemp("small") / "small")


@pytest.fixture
def hf_home(tmp_path, monkeypatch, small_dir):
    home = tmp_path / "hf"
    files = {name: small_dir / name for name in ("open_clip_config.json", "open_clip_model.safetensors")}
    put_in_hub_cache(home, REPO, files)
    use_hub_cache(monkeypatch, home)
    return home


def assert_same_bundle(a, b):
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a.preprocess_cfg == b.preprocess_cfg
    texts = ["a photo of a cat", "a red square"]
    assert torch.equal(a.tokenizer(texts), b.tokenizer(texts))


def test_hf_hub_repo_loads_the_same_model_as_its_directory(hf_home, small_dir):
    from_dir = build_model(small_dir)
    from_hub = build_model(f"hf-hub:{REPO}")
    assert_same_bundle(from_hub, from_dir)
    assert (
        from_hub.preprocess_cfg["resize_mode"] == "squash"
        and tuple(from_hub.preprocess_cfg["mean"]) == (0.5,) * 3
    )
    assert from_hub.weights_source == f"hf-hub:{REPO}"
    # open_clip itself reads the same cache entry to the same weights.
    reference, _, _ = open_clip.create_model_and_transforms(f"hf-hub:{REPO}")
    ref = reference.state_dict()
    assert all(torch.equal(ref[k], v) for k, v in from_hub.model.state_dict().items())


def test_pretrained_repo_wins_over_the_model_group_and_an_explicit_conflict_is_an_error(hf_home, small_dir):
    from_dir = build_model(small_dir)
    # model=vit-b-32 model.pretrained=hf-hub:...: architecture, preprocessing and tokenizer from the repo.
    group = load_model_config(find_model_config_file("vit-b-32"))
    group.pretrained = f"hf-hub:{REPO}"
    assert_same_bundle(build_model(group), from_dir)
    # model=tiny model.vision_cfg.width=96 model.pretrained=hf-hub:...: the explicit key disagrees.
    tiny = load_model_config(find_model_config_file("tiny"))
    tiny.vision_cfg = {**tiny.vision_cfg, "width": 96}
    with pytest.raises(ClipkitError, match=r"vision_cfg\.width=96 \(it has 64\)"):
        build_model(tiny, pretrained=f"hf-hub:{REPO}")


def test_uncached_repo_and_tag_fail_with_one_line_naming_the_fetch_command(hf_home):
    with pytest.raises(ClipkitError) as error:
        build_model("hf-hub:nobody/not-cached")
    assert "\n" not in str(error.value) and "`hf download nobody/not-cached`" in str(error.value)
    # A real open_clip tag resolves through open_clip's registry to its hub repo, which is not cached here.
    with pytest.raises(ClipkitError, match=r"`hf download laion/CLIP-ViT-B-32-laion2B-s34B-b79K`"):
        build_model("vit-b-32", pretrained="laion2b_s34b_b79k")


def test_open_clip_pretrained_tag_resolves_through_open_clip_registry(hf_home, small_dir, monkeypatch):
    arch, tag, repo = "clipkit-test-small", "testtag", "clipkit-test/small-tag"
    config = json.loads((small_dir / "open_clip_config.json").read_text())
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, arch, config["model_cfg"])
    tag_cfg = open_clip.pretrained._pcfg(
        hf_hub=f"{repo}/", **{k: tuple(v) if isinstance(v, list) else v for k, v in PREPROCESS.items()}
    )
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, arch, {tag: tag_cfg})
    put_in_hub_cache(
        hf_home, repo, {"open_clip_model.safetensors": small_dir / "open_clip_model.safetensors"}
    )
    assert open_clip.get_pretrained_cfg(arch, tag)["hf_hub"] == f"{repo}/"

    from_tag = build_model(ModelConfig(name="small", arch=arch, pretrained=tag))
    assert_same_bundle(from_tag, build_model(small_dir))
    assert "hf-hub:clipkit-test/small-tag" in from_tag.weights_source
    # open_clip's own loader agrees on the weights.
    reference = open_clip.create_model(arch, pretrained=tag)
    ref = reference.state_dict()
    assert all(torch.equal(ref[k], v) for k, v in from_tag.model.state_dict().items())


@pytest.mark.slow  # four `clipkit zeroshot` processes: ~60 s on 2 loaded cores
def test_zeroshot_with_hf_hub_equals_the_directory_and_random_weights_say_so(hf_home, small_dir, tmp_path):
    images, labels = make_images(12, seed=3), labels_for(12)
    folders = write_class_folders(tmp_path / "folders", images, labels)

    def zeroshot(model: str):
        out = tmp_path / f"{len(list(tmp_path.glob('*.json')))}.json"
        result = run_clipkit(
            "zeroshot", "--model", model, "--dataset", str(folders), "--workers", "0", "--no-cache",
            "--output", str(out), HF_HOME=str(hf_home), HF_HUB_OFFLINE="1",
        )  # fmt: skip
        return result, (json.loads(out.read_text()) if result.returncode == 0 else None)

    (from_dir, dir_report), (from_hub, hub_report) = zeroshot(str(small_dir)), zeroshot(f"hf-hub:{REPO}")
    assert from_hub.returncode == 0, from_hub.stderr[-2000:]
    assert hub_report["metrics"] == dir_report["metrics"]
    assert "random weights" not in from_hub.stderr + from_dir.stderr

    missing, _ = zeroshot("hf-hub:nobody/not-cached")
    lines = [line for line in missing.stderr.splitlines() if "error" in line.lower()]
    assert missing.returncode == 2 and len(lines) == 1 and "Traceback" not in missing.stderr
    assert "hf-hub:nobody/not-cached" in lines[0] and "hf download nobody/not-cached" in lines[0]

    random_model, _ = zeroshot("tiny")
    assert random_model.returncode == 0, random_model.stderr[-2000:]
    assert sum("random weights" in line for line in random_model.stderr.splitlines()) == 1


def test_training_from_hf_hub_at_lr_0_exports_exactly_its_weights(hf_home, small_dir, tmp_path):
    from clipkit.train import run
    from test_train import small_config

    AcceleratorState._reset_state(True)
    out = tmp_path / "run"
    run(small_config(out, f"model.pretrained=hf-hub:{REPO}", "optim.lr=0", "train.steps=2",
                     "data.zeroshot_dataset=null", "data.val_shards=null"))  # fmt: skip
    trained = load_file(str(out / "model" / "open_clip_model.safetensors"))
    start = load_file(str(small_dir / "open_clip_model.safetensors"))
    assert trained.keys() == start.keys() and all(torch.equal(trained[k], start[k]) for k in start)
    exported = json.loads((out / "model" / "open_clip_config.json").read_text())
    assert exported == json.loads((small_dir / "open_clip_config.json").read_text())

    AcceleratorState._reset_state(True)
    missing = tmp_path / "missing"
    with pytest.raises(ClipkitError, match="hf download nobody/not-cached"):
        run(small_config(missing, "model.pretrained=hf-hub:nobody/not-cached"))
    assert not (missing / "checkpoints").exists()
    AcceleratorState._reset_state(True)
