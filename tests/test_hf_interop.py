"""Export to and import from Hugging Face transformers: CLIPModel / SiglipModel equal clipkit's towers."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from clipkit.cli.main import main as clipkit_main
from clipkit.errors import ClipkitError
from clipkit.losses import ClipLoss, SigLipLoss
from clipkit.models import build_model, export_model
from clipkit.models.config import ModelConfig
from clipkit.models.hf_export import export_transformers
from clipkit.models.tokenizer import train_sentencepiece
from conftest import run_clipkit
from test_eval_datasets import make_images

transformers = pytest.importorskip("transformers")

LABELS = ["red square", "green circle", "blue triangle", "tiny dog"]
TEMPLATE = "a photo of a {c}."  # `clipkit classify`'s default prompt
CAPTIONS = [f"a photo of a {label}." for label in LABELS] + [
    "a red circle at the top left", "the number three", "two blue squares on green grass", "a small dog",
]  # fmt: skip


def _train_a_few_steps(bundle, loss, steps: int = 3) -> None:
    """A few optimizer steps on random images and captions, so equality cannot come from the init."""
    torch.manual_seed(0)
    model = bundle.model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    size = model.visual.image_size
    tokens = bundle.tokenizer(CAPTIONS)
    for _ in range(steps):
        images = torch.randn(len(CAPTIONS), 3, *size)
        image_features = F.normalize(model.encode_image(images), dim=-1)
        text_features = F.normalize(model.encode_text(tokens), dim=-1)
        value = loss(
            image_features, text_features, model.logit_scale.exp(), getattr(model, "logit_bias", None)
        )
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
    model.eval()


def _clip_tiny(tmp_path):
    bundle = build_model("tiny", init_logit_scale=math.log(1 / 0.07))
    _train_a_few_steps(bundle, ClipLoss(init_logit_scale=math.log(1 / 0.07)))
    return bundle


def _siglip_loss_tiny(tmp_path):
    # Native towers trained with the sigmoid loss: a CLIPModel whose logit bias lives in config.json.
    bundle = build_model("tiny", init_logit_scale=math.log(10), init_logit_bias=-10.0)
    _train_a_few_steps(bundle, SigLipLoss(init_logit_scale=math.log(10), init_logit_bias=-10.0))
    return bundle


def _sentencepiece_tiny(tmp_path):
    # A clipkit SentencePiece tokenizer exports as T5Tokenizer files that give the same ids.
    tokenizer = train_sentencepiece(CAPTIONS * 20, tmp_path / "spm", vocab_size=40)
    bundle = build_model(
        ModelConfig(
            name="tiny-spm", embed_dim=64, tokenizer=str(tmp_path / "spm"),
            vision_cfg={"image_size": 32, "patch_size": 8, "layers": 2, "width": 64, "head_width": 32},
            text_cfg={"context_length": 32, "vocab_size": tokenizer.vocab_size, "width": 64, "heads": 2, "layers": 2},
        ),
        init_logit_scale=math.log(1 / 0.07),
    )  # fmt: skip
    _train_a_few_steps(bundle, ClipLoss(init_logit_scale=math.log(1 / 0.07)))
    return bundle


def siglip_tokenizer_dir(directory):
    """A SentencePiece model trained here, in the files transformers' SiglipTokenizer loads (as the hub's
    google/siglip-* and timm/ViT-B-16-SigLIP tokenizers: </s> ends and pads, no attention mask)."""
    train_sentencepiece(CAPTIONS * 20, directory, vocab_size=40)
    config = {
        "tokenizer_class": "SiglipTokenizer", "eos_token": "</s>", "pad_token": "</s>", "unk_token": "<unk>",
        "model_max_length": 64, "model_input_names": ["input_ids"],
    }  # fmt: skip
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    for name in ("clipkit_tokenizer.json", "special_tokens_map.json"):
        (directory / name).unlink()
    return directory


def _siglip_b16_reduced(tmp_path):
    """open_clip's ViT-B-16-SigLIP (timm image tower with MAP head, bidirectional text tower pooled at its
    last token): 32 px images and a 2-layer, 64-wide text tower. The timm trunk keeps its width and depth
    (open_clip's config does not reach timm's), which a 2x2-patch image keeps cheap."""
    tokenizer_dir = siglip_tokenizer_dir(tmp_path / "siglip-tokenizer")
    bundle = build_model(
        ModelConfig(
            name="siglip-b16-small", arch="ViT-B-16-SigLIP", vision_cfg={"image_size": 32},
            text_cfg={"width": 64, "heads": 2, "layers": 2, "vocab_size": 40, "hf_tokenizer_name": str(tokenizer_dir)},
            preprocess={"mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic", "resize_mode": "squash"},
        )
    )  # fmt: skip
    _train_a_few_steps(bundle, SigLipLoss(init_logit_scale=math.log(10), init_logit_bias=-10.0), steps=1)
    return bundle


MODELS = {
    "clip-tiny": _clip_tiny,
    "siglip-loss-tiny": _siglip_loss_tiny,
    "sentencepiece-tiny": _sentencepiece_tiny,
    "vit-b-16-siglip": pytest.param(_siglip_b16_reduced, marks=pytest.mark.slow),
}


@pytest.fixture(scope="module", params=list(MODELS.values()), ids=list(MODELS))
def exported(request, tmp_path_factory):
    """(bundle, its open_clip export, its transformers export, test images)."""
    tmp_path = tmp_path_factory.mktemp(request.param.__name__)
    bundle = request.param(tmp_path)
    open_clip_dir = export_model(bundle, tmp_path / "open_clip")
    hf_dir = export_transformers(bundle, tmp_path / "hf")
    images = tmp_path / "images"
    images.mkdir()
    size = bundle.model.visual.image_size
    for i, image in enumerate(make_images(4, seed=7, size=size)):
        # At the model's size, resizing is the identity in PIL and in transformers' processors alike.
        image.save(images / f"image{i}.png")
    return bundle, open_clip_dir, hf_dir, images


def _hf_features(hf_model, **inputs):
    with torch.no_grad():
        if "pixel_values" in inputs:
            out = hf_model.get_image_features(**inputs)
        else:
            out = hf_model.get_text_features(**inputs)
    return getattr(out, "pooler_output", out)


def test_transformers_embeddings_equal_clipkit(exported):
    bundle, _, hf_dir, image_dir = exported
    hf_model = transformers.AutoModel.from_pretrained(hf_dir).eval()
    siglip = hf_model.config.model_type == "siglip"
    assert type(hf_model).__name__ == ("SiglipModel" if siglip else "CLIPModel")
    processor = transformers.AutoImageProcessor.from_pretrained(hf_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    from PIL import Image

    images = [Image.open(p) for p in sorted(image_dir.iterdir())]
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    ours_pixels = torch.stack([bundle.eval_transform(image) for image in images])
    torch.testing.assert_close(pixels, ours_pixels, rtol=0, atol=1e-6)
    # As the pipeline tokenizes: SigLIP to max_length, CLIP to the longest text.
    context_length = bundle.model_cfg["text_cfg"]["context_length"]
    padding = {"padding": "max_length" if siglip else True, "max_length": context_length, "truncation": True}
    hf_tokens = tokenizer(CAPTIONS, return_tensors="pt", **padding)
    ours_tokens = bundle.tokenizer(CAPTIONS)
    if siglip:
        torch.testing.assert_close(hf_tokens["input_ids"], ours_tokens, rtol=0, atol=0)
    with torch.no_grad():
        ours_image = bundle.model.encode_image(ours_pixels)
        ours_text = bundle.model.encode_text(ours_tokens)
    assert (_hf_features(hf_model, pixel_values=pixels) - ours_image).abs().max() <= 1e-5
    assert (_hf_features(hf_model, **hf_tokens) - ours_text).abs().max() <= 1e-5
    torch.testing.assert_close(hf_model.logit_scale.reshape(()), bundle.model.logit_scale.reshape(()))
    bias = getattr(bundle.model, "logit_bias", None)
    if siglip:
        torch.testing.assert_close(hf_model.logit_bias.reshape(()), bias.reshape(()))
    elif bias is not None:
        assert hf_model.config.logit_bias == pytest.approx(bias.item(), abs=0)
        assert f"| logit bias | {bias.item():.4f} |" in (hf_dir / "README.md").read_text()


def test_pipeline_agrees_with_clipkit_classify(exported, capsys):
    bundle, open_clip_dir, hf_dir, image_dir = exported
    classify = transformers.pipeline("zero-shot-image-classification", model=str(hf_dir))
    code = clipkit_main([
        "classify", str(image_dir), "--model", str(open_clip_dir), "--labels", ",".join(LABELS),
        "--top-k", str(len(LABELS)), "--json", "--no-cache", "--device", "cpu",
    ])  # fmt: skip
    assert code == 0
    ours = json.loads(capsys.readouterr().out)["results"]
    assert len(ours) == 4
    # CLIPModel's pipeline takes a softmax; so does clipkit for a model without bias. SiglipModel's takes a
    # sigmoid, as clipkit does with a bias. A CLIPModel trained with the sigmoid loss only ranks the same.
    same_probabilities = (getattr(bundle.model, "logit_bias", None) is None) or hf_dir.joinpath(
        "config.json"
    ).read_text().count('"model_type": "siglip"') > 0
    for result in ours:
        theirs = classify(
            result["image"], candidate_labels=LABELS, hypothesis_template=TEMPLATE.replace("{c}", "{}")
        )
        assert theirs[0]["label"] == result["top"][0]["label"], result["image"]
        if same_probabilities:
            ours_by_label = {t["label"]: t["probability"] for t in result["top"]}
            for entry in theirs:
                assert entry["score"] == pytest.approx(ours_by_label[entry["label"]], abs=1e-4)


def test_import_of_export_equals_the_model(exported):
    bundle, _, hf_dir, _ = exported
    again = build_model(str(hf_dir))
    again.model.eval()  # as the exported model is: eval takes torch's fused attention path
    ours, theirs = bundle.model.state_dict(), again.model.state_dict()
    assert sorted(ours) == sorted(theirs)
    for name in ours:
        assert (ours[name].reshape(theirs[name].shape) - theirs[name]).abs().max() <= 1e-6, name
    torch.manual_seed(3)
    images = torch.randn(3, 3, *bundle.model.visual.image_size)
    tokens = bundle.tokenizer(CAPTIONS)
    torch.testing.assert_close(again.tokenizer(CAPTIONS), tokens, rtol=0, atol=0)
    with torch.no_grad():
        assert (again.model.encode_image(images) - bundle.model.encode_image(images)).abs().max() <= 1e-6
        assert (again.model.encode_text(tokens) - bundle.model.encode_text(tokens)).abs().max() <= 1e-6
    assert again.preprocess_cfg["mean"] == pytest.approx(bundle.preprocess_cfg["mean"])
    assert again.preprocess_cfg["resize_mode"] == bundle.preprocess_cfg["resize_mode"]


def test_clip_bpe_tokenizer_gives_open_clip_ids(tmp_path):
    import open_clip

    from clipkit.models.hf_export import clip_bpe_tokenizer

    ours = open_clip.SimpleTokenizer(context_length=16)
    clip_bpe_tokenizer(ours, 16, transformers).save_pretrained(tmp_path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert type(tokenizer).__name__.startswith("CLIPTokenizer") and tokenizer.model_max_length == 16
    texts = [*CAPTIONS, "Hello, World!  many   spaces", "naïve café 123 " * 5, "UPPER case", ""]
    expected = ours(texts)
    theirs = tokenizer(texts, padding="max_length", max_length=16, truncation=True, return_tensors="pt")
    for row_ours, row_theirs in zip(expected, theirs["input_ids"], strict=True):
        # transformers pads with the end token, open_clip with 0.
        end = int((row_ours == 49407).nonzero()[0]) + 1
        assert row_theirs[:end].tolist() == row_ours[:end].tolist()
        assert (row_theirs[end:] == 49407).all()


def test_unsupported_config_stops_with_one_line_naming_the_keys(tmp_path):
    config = tmp_path / "mean-pooled.yaml"
    config.write_text(
        "embed_dim: 32\nvision_cfg: {image_size: 16, patch_size: 8, layers: 1, width: 32, head_width: 16, "
        "pool_type: avg}\ntext_cfg: {context_length: 8, width: 32, heads: 2, layers: 1, proj_bias: true}\n"
    )
    result = run_clipkit("export", str(config), "--format", "hf", "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "vision_cfg.pool_type='avg'" in lines[0] and "text_cfg.proj_bias=True" in lines[0]
    assert "CLIPModel" in lines[0]
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir()] == ["mean-pooled.yaml"]


def test_unsupported_text_pooling_is_refused_in_python():
    bundle = build_model({
        "name": "qk", "embed_dim": 32,
        "vision_cfg": {"image_size": 16, "patch_size": 8, "layers": 1, "width": 32, "head_width": 16},
        "text_cfg": {"context_length": 8, "width": 32, "heads": 2, "layers": 1, "pool_type": "last", "qk_norm": True},
    })  # fmt: skip
    with pytest.raises(
        ClipkitError,
        match=r"text_cfg.qk_norm=True.*text_cfg.pool_type='last'|text_cfg.pool_type='last'.*qk_norm",
    ):
        export_transformers(bundle, "/nonexistent/never-written")


def _hf_cache(root, repo_id: str, files_dir) -> None:
    """The layout huggingface_hub writes: hub/models--ORG--NAME/snapshots/REV/FILES + refs/main = REV."""
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = root / "hub" / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for path in files_dir.iterdir():
        (snapshot / path.name).write_bytes(path.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)


@pytest.mark.slow  # two command-line runs
def test_zeroshot_runs_offline_on_a_cached_transformers_checkpoint(tmp_path):
    bundle = build_model("tiny")
    hf_dir = export_transformers(bundle, tmp_path / "export")
    # A checkpoint as transformers itself writes it, not only as clipkit does.
    model = transformers.CLIPModel.from_pretrained(hf_dir)
    model.save_pretrained(tmp_path / "resaved")
    for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"):
        (tmp_path / "resaved" / name).write_bytes((hf_dir / name).read_bytes())
    _hf_cache(tmp_path / "hf-home", "my-org/tiny-clip", tmp_path / "resaved")
    dataset = tmp_path / "dataset"
    for label, seed in (("cat", 1), ("dog", 2)):
        (dataset / label).mkdir(parents=True)
        for i, image in enumerate(make_images(2, seed=seed, size=(32, 32))):
            image.save(dataset / label / f"{i}.png")
    env = {
        "HF_HOME": str(tmp_path / "hf-home"),
        "HF_HUB_OFFLINE": "1",
        "CLIPKIT_CACHE": str(tmp_path / "cache"),
    }
    result = run_clipkit(
        "zeroshot", "--model", "hf:my-org/tiny-clip", "--dataset", str(dataset), "--workers", "0",
        "--output", str(tmp_path / "results.json"), **env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "results.json").read_text())
    assert report["num_images"] == 4 and 0.0 <= report["metrics"]["acc1"] <= 1.0
    # The numbers are the cached checkpoint's: the same as the model it was exported from.
    again = build_model(str(tmp_path / "resaved"))
    for name, tensor in bundle.model.state_dict().items():
        assert (again.model.state_dict()[name] - tensor).abs().max() <= 1e-6, name

    templates = tmp_path / "templates.txt"
    templates.write_text("a photo of a {c}.\n")
    missing = run_clipkit(
        "zeroshot", "--model", "hf:my-org/not-cached", "--dataset", str(dataset), "--templates", str(templates),
        **env,
    )  # fmt: skip
    assert missing.returncode == 2
    lines = missing.stderr.strip().splitlines()
    assert len(lines) == 1 and "my-org/not-cached" in lines[0] and "hf download" in lines[0], missing.stderr


@pytest.mark.slow  # a short training run (data generation, 2 steps, evaluation)
def test_card_of_a_siglip_run_names_its_data_steps_metrics_and_bias(tmp_path, capsys):
    from accelerate.state import AcceleratorState

    from clipkit.train import run
    from test_train import small_config

    AcceleratorState._reset_state(True)
    out = tmp_path / "run"
    run(small_config(out, "loss=siglip", "train.steps=2", "train.checkpoint_every=100"))
    AcceleratorState._reset_state(True)
    assert clipkit_main(["export", str(out), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    card = (tmp_path / "hf" / "README.md").read_text()
    last_eval = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    acc1 = last_eval["zeroshot/acc1"]
    assert "- loss: SigLipLoss" in card and "- steps: 2" in card and "data `train_shards`" in card
    assert f"| zeroshot/acc1 | {acc1:.4f} |" in card
    bias = build_model(str(out)).model.logit_bias.item()
    assert f"| logit bias | {bias:.4f} |" in card
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["logit_bias"] == pytest.approx(bias)


def test_imported_checkpoint_exports_to_open_clip_with_equal_embeddings(exported, tmp_path):
    import open_clip

    bundle, _, hf_dir, _ = exported
    if "timm_model_name" in bundle.model_cfg["vision_cfg"]:
        pytest.skip("open_clip's local-dir loader builds timm towers at their default image size, not 32 px")
    out = export_model(build_model(str(hf_dir)), tmp_path / "open_clip")
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{out}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{out}")
    model.eval()
    torch.testing.assert_close(tokenizer(CAPTIONS), bundle.tokenizer(CAPTIONS), rtol=0, atol=0)
    torch.manual_seed(4)
    images = torch.randn(2, 3, *bundle.model.visual.image_size)
    with torch.no_grad():
        assert (model.encode_image(images) - bundle.model.encode_image(images)).abs().max() <= 1e-6
        tokens = bundle.tokenizer(CAPTIONS)
        assert (model.encode_text(tokens) - bundle.model.encode_text(tokens)).abs().max() <= 1e-6
