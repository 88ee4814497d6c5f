"""Data knobs for small-batch recipes: augmentation presets, caption choice and templates, harder datasets."""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import random
import re

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from omegaconf import OmegaConf
from open_clip.transform import AugmentationCfg, PreprocessCfg, image_transform_v2
from PIL import Image

from clipkit.data import DataConfig, TrainStream, iter_val_batches, prepare_data
from clipkit.data.augment import AUGMENTATION_PRESETS, build_train_transform
from clipkit.data.digits import CLASSNAMES, load_digits_arrays, split_indices, write_digits_dataset
from clipkit.data.shards import iter_shard_samples
from clipkit.data.synthetic import CLASSNAMES as SYNTHETIC_CLASSES
from clipkit.data.synthetic import write_synthetic_dataset
from clipkit.errors import ClipkitError
from clipkit.models import build_model
from clipkit.train.schema import compose_config
from shard_helpers import png_bytes, write_samples

# A non-square picture with structure everywhere, so that crops, resizes and colour changes all show.
PICTURE = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8))
PREPROCESS = PreprocessCfg(size=24)
EXPECTED_SCALES = {"openclip": (0.9, 1.0), "light": (0.7, 1.0), "strong": (0.4, 1.0), "grayscale": (0.6, 1.0)}


def seeded_output(transform) -> torch.Tensor:
    torch.manual_seed(0)
    random.seed(0)  # open_clip's colour jitter and grey-scale stages draw from `random`
    return transform(PICTURE)


@pytest.mark.filterwarnings("ignore:Unused augmentation cfg items")  # open_clip's, about keys it does use
@pytest.mark.parametrize("name", sorted(EXPECTED_SCALES))
def test_each_preset_builds_the_transform_open_clip_builds_from_its_aug_cfg(name):
    ours = build_train_transform(PREPROCESS, name)
    reference = image_transform_v2(
        PREPROCESS, is_train=True, aug_cfg=AugmentationCfg(**AUGMENTATION_PRESETS[name])
    )
    assert [type(stage).__name__ for stage in ours.transforms] == [
        type(stage).__name__ for stage in reference.transforms
    ]
    assert torch.equal(seeded_output(ours), seeded_output(reference))
    crop = ours.transforms[0]
    assert isinstance(crop, T.RandomResizedCrop) and crop.scale == EXPECTED_SCALES[name]
    stages = {type(stage).__name__ for stage in ours.transforms}
    assert ("color_jitter" in stages) == ("gray_scale" in stages) == (name == "strong")  # never on grey data


def test_openclip_preset_is_what_null_gives():
    assert torch.equal(
        seeded_output(build_train_transform(PREPROCESS, "openclip")),
        seeded_output(build_train_transform(PREPROCESS, None)),
    )


def test_none_trains_on_exactly_what_evaluation_sees_and_evaluation_ignores_augmentation():
    plain = build_model("tiny", aug_cfg="none")
    strong = build_model("tiny", aug_cfg="strong")
    evaluated = plain.eval_transform(PICTURE)
    assert torch.equal(seeded_output(plain.train_transform), evaluated)
    assert not torch.equal(seeded_output(build_model("tiny").train_transform), evaluated)  # null crops
    assert torch.equal(strong.eval_transform(PICTURE), evaluated)
    assert not torch.equal(seeded_output(strong.train_transform), evaluated)


def test_unknown_preset_fails_with_one_line_listing_the_presets():
    with pytest.raises(ClipkitError) as error:
        DataConfig(augmentation="strnog")
    message = str(error.value)
    assert "\n" not in message and "unknown preset 'strnog'" in message
    assert "['none', 'openclip', 'light', 'strong', 'grayscale']" in message


def test_presets_and_templates_compose_from_the_command_line():
    cfg = compose_config(
        "data=digits",
        "data.augmentation=grayscale",
        "data.caption_choice=first",
        "data.caption_templates=['a photo of {}.','{}, by hand']",
    )
    data = DataConfig.from_dict(OmegaConf.to_container(cfg.data, resolve=True))
    assert data.augmentation == "grayscale" and data.caption_choice == "first"
    assert data.caption_templates == ["a photo of {}.", "{}, by hand"]


# -- captions -------------------------------------------------------------------------------------------
class CaptionIds:
    """A tokenizer that turns each caption into its index in a list, so batches show the captions drawn."""

    def __init__(self):
        self.captions: list[str] = []

    def __call__(self, captions: list[str]) -> torch.Tensor:
        for caption in captions:
            if caption not in self.captions:
                self.captions.append(caption)
        return torch.tensor([[self.captions.index(c)] for c in captions])


def stream_captions(shards, batches: int, *, seed: int = 0, state=None, **keys) -> tuple[list, TrainStream]:
    cfg = prepare_data(
        DataConfig.from_dict({"train_shards": str(shards), "workers": 0, "shuffle_buffer": 0, **keys})
    )
    ids = CaptionIds()
    stream = TrainStream(cfg, transform=T.ToTensor(), tokenizer=ids, seed=seed)
    if state is not None:
        stream.load_state_dict(state)
    drawn = []
    for _, tokens in stream:
        drawn.append([ids.captions[int(t)] for t in tokens[:, 0]])
        if len(drawn) == batches:
            break
    return drawn, stream


def write_captioned(path, texts: list[str | None], json_values: list[object] | None = None):
    samples = []
    for i, text in enumerate(texts):
        sample = {"__key__": f"k{i:02d}", "png": png_bytes(i)}
        if text is not None:
            sample["txt"] = text
        if json_values is not None and json_values[i] is not None:
            value = json_values[i]
            sample["json"] = value if isinstance(value, str) else json.dumps(value)
        samples.append(sample)
    write_samples(path, samples)
    return path


LINES = [[f"sample {i} caption {j}" for j in range(3)] for i in range(4)]


def test_random_choice_spreads_draws_over_the_lines_the_same_way_for_a_seed_and_on_resume(tmp_path):
    shard = write_captioned(tmp_path / "lines.tar", ["\n".join(lines) + "\n\n" for lines in LINES])
    drawn, _ = stream_captions(shard, 120, batch_size=4)  # 120 epochs: every sample visited 120 times
    counts = collections.Counter(caption for batch in drawn for caption in batch)
    assert set(counts) == {line for lines in LINES for line in lines}  # blank lines are not captions
    assert all(20 <= count <= 60 for count in counts.values()), counts  # 40 expected, sd 5.2
    for position, batch in enumerate(drawn[:10]):
        assert [caption.split(" caption")[0] for caption in batch] == [f"sample {i}" for i in range(4)], (
            position
        )
    again, _ = stream_captions(shard, 120, batch_size=4)
    assert again == drawn
    other_seed, _ = stream_captions(shard, 120, batch_size=4, seed=1)
    assert other_seed != drawn
    _, stopped = stream_captions(shard, 50, batch_size=4)
    resumed, _ = stream_captions(shard, 20, batch_size=4, state=stopped.state_dict())
    assert resumed == drawn[50:70]


def test_first_and_whole_choices_and_a_one_line_caption_under_every_choice(tmp_path):
    shard = write_captioned(tmp_path / "lines.tar", ["  one line only \n", "a\n\n  b \nc"])
    firsts, _ = stream_captions(shard, 3, batch_size=2, caption_choice="first")
    assert firsts == [["one line only", "a"]] * 3
    wholes, _ = stream_captions(shard, 3, batch_size=2, caption_choice="whole")
    assert wholes == [["one line only", "a\n\n  b \nc"]] * 3  # the file as one caption, as before choices
    randoms, _ = stream_captions(shard, 40, batch_size=2, caption_choice="random")
    assert {batch[0] for batch in randoms} == {"one line only"} and {batch[1] for batch in randoms} == {
        "a",
        "b",
        "c",
    }


def test_json_caption_lists_are_read_txt_wins_and_bad_json_is_a_skipped_bad_sample(tmp_path, caplog):
    texts = [None, "the txt caption", None, None, None, None]
    json_values = [
        ["json one", "json two"],
        {"caption": "metadata, not captions", "label": 3},  # beside a .txt: metadata, never read as captions
        '["not closed", ',
        {"caption": "a mapping is not a caption list"},
        [],
        ["fine again"],
    ]
    shard = write_captioned(tmp_path / "json.tar", texts, json_values)
    with caplog.at_level(logging.WARNING):
        drawn, stream = stream_captions(shard, 30, batch_size=3)
    assert {tuple(batch[1:]) for batch in drawn} == {("the txt caption", "fine again")}
    assert {batch[0] for batch in drawn} == {"json one", "json two"}
    assert stream.stats()["bad_samples"] == 3 * 30  # the three bad ones, met once per epoch
    assert "skipping sample k02" in caplog.text and "captions (.json) are not valid JSON" in caplog.text
    assert "skipping sample k03" in caplog.text and "must be a JSON list of strings" in caplog.text
    assert "skipping sample k04" in caplog.text and "empty caption list (.json)" in caplog.text
    wholes, _ = stream_captions(shard, 1, batch_size=3, caption_choice="whole")
    assert wholes == [["json one\njson two", "the txt caption", "fine again"]]


def test_templates_wrap_the_chosen_caption_and_need_one_placeholder(tmp_path):
    shard = write_captioned(tmp_path / "lines.tar", ["\n".join(lines) for lines in LINES])
    templates = ["a photo of {}.", "{}, drawn"]
    drawn, _ = stream_captions(shard, 60, batch_size=4, caption_templates=templates)
    used = collections.Counter()
    for batch in drawn:
        for i, caption in enumerate(batch):
            matches = [(t, line) for t in templates for line in LINES[i] if t.replace("{}", line) == caption]
            assert len(matches) == 1, caption
            used[matches[0][0]] += 1
    assert min(used.values()) > 60  # 120 each expected: both templates drawn
    firsts, _ = stream_captions(shard, 2, batch_size=4, caption_choice="first", caption_templates=["{}"])
    assert firsts == [[lines[0] for lines in LINES]] * 2
    for bad in (["a photo of."], ["{} and {}"], "a photo of {}."):
        with pytest.raises(ClipkitError, match="caption_templates") as error:
            DataConfig(caption_templates=bad)
        assert "\n" not in str(error.value)
    with pytest.raises(ClipkitError, match=r"caption_choice must be one of \['random', 'first', 'whole'\]"):
        DataConfig(caption_choice="all")


def test_validation_pairs_each_image_with_its_first_caption_without_templates(tmp_path):
    write_captioned(tmp_path / "val.tar", ["\n".join(lines) for lines in LINES])
    cfg = prepare_data(
        DataConfig.from_dict(
            {
                "val_shards": str(tmp_path / "val.tar"),
                "caption_choice": "whole",
                "caption_templates": ["x {}"],
            }
        )
    )
    ids = CaptionIds()
    (images, tokens), *rest = list(iter_val_batches(cfg, transform=T.ToTensor(), tokenizer=ids, batch_size=8))
    assert not rest and [ids.captions[int(t)] for t in tokens[:, 0]] == [lines[0] for lines in LINES]


# -- harder generated datasets --------------------------------------------------------------------------
def samples_in(directory) -> list[dict]:
    return [s for p in sorted(directory.glob("*.tar")) for s in iter_shard_samples(str(p), pytest.fail)]


def split_digests(directory) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def test_digits_fraction_noise_and_phrasings_change_only_the_training_split(tmp_path):
    options = {"train_fraction": 0.25, "caption_noise": 0.3, "captions_per_sample": 3, "image_size": 8}
    counts = write_digits_dataset(tmp_path / "hard", **options)
    write_digits_dataset(tmp_path / "again", **options)
    write_digits_dataset(tmp_path / "plain", image_size=8)
    assert split_digests(tmp_path / "hard" / "train") == split_digests(tmp_path / "again" / "train")
    assert split_digests(tmp_path / "hard" / "test") == split_digests(tmp_path / "plain" / "test")

    _, labels = load_digits_arrays()
    full_train, _ = split_indices(labels, test_fraction=0.3, seed=0)
    per_class_full = collections.Counter(int(labels[i]) for i in full_train)
    samples = samples_in(tmp_path / "hard" / "train")
    metas = [json.loads(s["json"]) for s in samples]
    per_class = collections.Counter(m["label"] for m in metas)
    assert per_class == {c: round(n * 0.25) for c, n in per_class_full.items()} and counts["train"] == len(
        samples
    )
    noisy = 0
    for sample, meta in zip(samples, metas, strict=True):
        lines = sample["txt"].decode().splitlines()
        assert len(set(lines)) == 3
        named = meta.get("caption_label", meta["label"])
        noisy += named != meta["label"]
        for line in lines:  # every phrasing names the same class, by word or numeral
            words = re.findall(r"\w+", line)
            assert CLASSNAMES[named] in words or str(named) in words, line
    assert noisy == round(0.3 * len(samples))
    plain = samples_in(tmp_path / "plain" / "train")
    assert len(plain) == sum(per_class_full.values()) and all(b"\n" not in s["txt"] for s in plain)
    assert all("caption_label" not in json.loads(s["json"]) for s in plain)


def test_synthetic_caption_noise_renames_exactly_that_fraction_of_training_captions_only(tmp_path):
    sizes = {"train_samples": 60, "test_samples": 20, "image_size": 16}
    write_synthetic_dataset(tmp_path / "noisy", caption_noise=0.5, **sizes)
    write_synthetic_dataset(tmp_path / "clean", **sizes)
    assert split_digests(tmp_path / "noisy" / "test") == split_digests(tmp_path / "clean" / "test")
    noisy, clean = (samples_in(tmp_path / name / "train") for name in ("noisy", "clean"))
    assert [s["jpg"] for s in noisy] == [s["jpg"] for s in clean]  # the same pictures, other captions
    renamed = 0
    for sample in noisy:
        meta = json.loads(sample["json"])
        named = SYNTHETIC_CLASSES[meta.get("caption_label", meta["label"])]
        colour, shape = named.split()
        assert f"{colour} {shape}" in sample["txt"].decode()
        renamed += "caption_label" in meta and meta["caption_label"] != meta["label"]
    assert renamed == 30
    with pytest.raises(ClipkitError, match="synthetic: caption_noise must be in"):
        write_synthetic_dataset(tmp_path / "bad", caption_noise=-0.1, **sizes)


@pytest.mark.parametrize("bad", [{"train_fraction": 0.0}, {"caption_noise": 1.5}, {"captions_per_sample": 9}])
def test_digits_options_out_of_range_fail_naming_the_option(tmp_path, bad):
    with pytest.raises(ClipkitError, match=f"digits: {next(iter(bad))} must"):
        write_digits_dataset(tmp_path, **bad)


@pytest.mark.parametrize("dataset", ["digits", "synthetic"])
def test_every_generate_option_is_in_the_cache_directory_name(dataset):
    base = OmegaConf.to_container(compose_config(f"data={dataset}").data.generate, resolve=True)
    for option, value in base.items():
        if option in ("name", "dir"):
            continue
        changed = type(value)(value * 2 if value else 1) if not isinstance(value, float) else value / 2 + 0.01
        generate = compose_config(f"data={dataset}", f"data.generate.{option}={changed}").data.generate
        assert OmegaConf.to_container(generate, resolve=True)["dir"] != base["dir"], option
