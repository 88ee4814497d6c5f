"""The training stream: splitting over processes and workers, resume, bad data, sources and mixing."""

from __future__ import annotations

import collections
import json
import logging
import os
import tarfile

import open_clip
import pytest
import torch
import torchvision.transforms as T

from clipkit.data import DataConfig, TrainStream, iter_val_batches, prepare_data
from clipkit.errors import ClipkitError
from shard_helpers import key_of, png_bytes, write_samples, write_shards

TOKENIZER = open_clip.SimpleTokenizer(context_length=12)
# A random transform, so that the tests see whether augmentation is reproducible.
TRANSFORM = T.Compose([T.RandomResizedCrop(6, scale=(0.3, 1.0)), T.RandomHorizontalFlip(), T.ToTensor()])


def make_stream(train_shards, *, rank=0, world_size=1, seed=0, **keys) -> TrainStream:
    cfg = prepare_data(DataConfig.from_dict({"train_shards": train_shards, **keys}))
    return TrainStream(
        cfg, transform=TRANSFORM, tokenizer=TOKENIZER, rank=rank, world_size=world_size, seed=seed
    )


def take(stream: TrainStream, batches: int) -> list[tuple[list[str], torch.Tensor, torch.Tensor]]:
    """(keys, images, tokens) of the next `batches` batches."""
    out = []
    for images, tokens in stream:
        out.append(([key_of(k) for k in stream.last_keys], images, tokens))
        if len(out) == batches:
            break
    return out


@pytest.mark.parametrize(
    ("num_shards", "per_shard"),
    [pytest.param(8, 10, id="shards-split"), pytest.param(2, 40, id="fewer-shards-than-readers")],
)
def test_two_processes_two_workers_see_every_sample_exactly_once_per_epoch(tmp_path, num_shards, per_shard):
    keys = write_shards(tmp_path, num_shards=num_shards, per_shard=per_shard)
    # 80 samples, 2 processes x 2 workers = 4 readers of 20 samples = 4 batches of 5 each: one epoch is
    # 8 batches per process.
    seen_per_epoch = [collections.Counter(), collections.Counter()]
    for rank in (0, 1):
        stream = make_stream(
            str(tmp_path), rank=rank, world_size=2, batch_size=5, workers=2, shuffle_buffer=6
        )
        batches = take(stream, 16)
        for index, (batch_keys, images, tokens) in enumerate(batches):
            assert images.shape == (5, 3, 6, 6) and images.dtype == torch.float32
            assert tokens.shape == (5, 12) and tokens.dtype == torch.long
            assert torch.equal(tokens, TOKENIZER([f"caption of {k}" for k in batch_keys]))
            seen_per_epoch[index // 8].update(batch_keys)
        assert stream.stats()["epoch"] == 1 and stream.stats()["samples"] == 80
    for seen in seen_per_epoch:
        assert sorted(seen) == sorted(keys)
        assert set(seen.values()) == {1}


def test_batches_are_the_same_global_batches_with_the_same_pixels_for_any_layout(tmp_path):
    # The check the trainer's multi-process test builds on: with fewer shards than readers and no
    # sample shuffling, 2 processes x batch 4 make the same global batches as 1 process x batch 8, and a
    # sample's augmented pixels do not depend on who read it.
    write_shards(tmp_path, num_shards=1, per_shard=48)
    single = take(make_stream(str(tmp_path), batch_size=8, workers=1, shuffle_buffer=0, seed=5), 6)
    halves = [
        take(
            make_stream(
                str(tmp_path), rank=r, world_size=2, batch_size=4, workers=0, shuffle_buffer=0, seed=5
            ),
            6,
        )
        for r in (0, 1)
    ]
    for step, (keys, images, _) in enumerate(single):
        pixels = dict(zip(keys, images, strict=True))
        split_keys = halves[0][step][0] + halves[1][step][0]
        assert sorted(split_keys) == sorted(keys)
        for rank in (0, 1):
            for key, image in zip(halves[rank][step][0], halves[rank][step][1], strict=True):
                assert torch.equal(image, pixels[key]), key
    # ...and the augmentation really is random from sample to sample.
    first = single[0][1]
    assert not all(torch.equal(first[0], first[i]) for i in range(1, 8))


def test_the_same_shards_at_another_path_give_the_same_batches_and_pixels(tmp_path):
    # A cluster mounts the data at another path on each node, or a job copies it to local disk first:
    # the run (order and augmentation) must not change with where the shards live.
    write_shards(tmp_path / "a", num_shards=3, per_shard=16)
    (tmp_path / "elsewhere").mkdir()
    os.rename(tmp_path / "a", tmp_path / "elsewhere" / "b")
    moved = take(make_stream(str(tmp_path / "elsewhere" / "b"), batch_size=8, workers=2, seed=3), 6)
    os.rename(tmp_path / "elsewhere" / "b", tmp_path / "a")
    original = take(make_stream(str(tmp_path / "a"), batch_size=8, workers=2, seed=3), 6)
    for (keys, images, tokens), (moved_keys, moved_images, moved_tokens) in zip(original, moved, strict=True):
        assert keys == moved_keys
        assert torch.equal(images, moved_images) and torch.equal(tokens, moved_tokens)


@pytest.mark.parametrize(
    "layout",
    [
        pytest.param({"workers": 2}, id="two-workers"),
        pytest.param({"workers": 0, "weighted": True}, id="in-process-two-weighted-sources"),
        pytest.param({"workers": 2, "resampled": True}, id="resampled"),
    ],
)
def test_resume_continues_with_exactly_the_samples_not_yet_seen(tmp_path, layout):
    layout = dict(layout)
    if layout.pop("weighted", False):
        write_shards(tmp_path / "a", num_shards=3, per_shard=10, prefix="a")
        write_shards(tmp_path / "b", num_shards=2, per_shard=10, prefix="b")
        spec = {"train_shards": f"{tmp_path / 'a'}::{tmp_path / 'b'}", "weights": [2.0, 1.0]}
    else:
        write_shards(tmp_path, num_shards=4, per_shard=12)
        spec = {"train_shards": str(tmp_path)}
    keys = {"batch_size": 5, "shuffle_buffer": 7, **spec, **layout}
    reference = make_stream(seed=11, **keys)
    before = take(reference, 7)  # an odd count: the next batch comes from the second worker
    state = json.loads(json.dumps(reference.state_dict()))  # what a checkpoint stores
    stats_at_checkpoint = reference.stats()
    after = take(reference, 8)  # 48 samples an epoch: this crosses into the next epoch

    resumed = make_stream(seed=11, **keys)
    resumed.load_state_dict(state)
    assert resumed.stats() == stats_at_checkpoint
    again = take(resumed, 8)
    for (keys_a, images_a, tokens_a), (keys_b, images_b, tokens_b) in zip(after, again, strict=True):
        assert keys_a == keys_b
        assert torch.equal(images_a, images_b)
        assert torch.equal(tokens_a, tokens_b)
    assert resumed.stats() == reference.stats()
    assert {k for b in before for k in b[0]}  # sanity: the first part produced data


def test_resume_with_another_layout_restarts_the_epoch_with_a_warning(tmp_path, caplog):
    write_shards(tmp_path, num_shards=4, per_shard=10)
    first = make_stream(str(tmp_path), batch_size=5, workers=2, shuffle_buffer=0)
    take(first, 3)
    state = first.state_dict()
    other = make_stream(str(tmp_path), batch_size=5, workers=0, shuffle_buffer=0)
    with caplog.at_level(logging.WARNING):
        other.load_state_dict(state)
    assert "different layout" in caplog.text
    seen = [k for batch in take(other, 8) for k in batch[0]]
    assert len(seen) == len(set(seen)) == 40  # a whole epoch, from its beginning
    assert other.stats()["samples"] == 15 + 40  # the counters carry over


def test_state_of_another_rank_is_refused(tmp_path):
    write_shards(tmp_path, num_shards=4, per_shard=4)
    state = make_stream(str(tmp_path), rank=1, world_size=2, workers=0, batch_size=2).state_dict()
    with pytest.raises(ClipkitError, match="rank 1 given to rank 0"):
        make_stream(str(tmp_path), rank=0, world_size=2, workers=0, batch_size=2).load_state_dict(state)


def test_corrupt_images_and_missing_captions_are_skipped_and_counted(tmp_path, caplog):
    good = [{"__key__": f"k{i:02d}", "png": png_bytes(i), "txt": f"caption {i}"} for i in range(10)]
    good[2]["png"] = b"not an image at all"
    good[4]["png"] = png_bytes(4)[:40]  # truncated file
    del good[5]["txt"]
    good[7]["txt"] = "   "
    good[8] = {"__key__": "k08", "txt": "a caption without an image"}
    write_samples(tmp_path / "mixed.tar", good)
    stream = make_stream(str(tmp_path / "mixed.tar"), batch_size=5, workers=0, shuffle_buffer=0)
    with caplog.at_level(logging.WARNING):
        first_epoch = take(stream, 1)
        assert first_epoch[0][0] == ["k00", "k01", "k03", "k06", "k09"]
        assert stream.stats()["bad_samples"] == 5
        take(stream, 1)  # the second epoch meets the same five again
    assert stream.stats()["bad_samples"] == 10
    assert stream.stats()["samples"] == 10
    for key, reason in [("k02", "cannot decode k02"), ("k04", "cannot decode k04"), ("k05", "no caption")]:
        assert f"skipping sample {key} in {tmp_path / 'mixed.tar'}: {reason}" in caplog.text
    assert "k07 in" in caplog.text and "empty caption" in caplog.text and "no image" in caplog.text
    # Logged once each, although met twice.
    assert caplog.text.count("skipping sample") == 5


def test_empty_truncated_and_broken_shards_are_skipped_and_training_goes_on(tmp_path, caplog):
    keys = write_shards(tmp_path / "good", num_shards=1, per_shard=5, prefix="g")
    write_samples(tmp_path / "empty.tar", [])
    write_shards(tmp_path / "long", num_shards=1, per_shard=10, prefix="t")
    whole = tmp_path / "long" / "t00000.tar"
    with tarfile.open(whole) as tar:
        seventh = next(m.offset for m in tar.getmembers() if m.name.startswith("t000_0006"))
    # Cut in the middle of the 7th sample's first header: the 6 samples before it are intact.
    (tmp_path / "truncated.tar").write_bytes(whole.read_bytes()[: seventh + 100])
    (tmp_path / "garbage.tar").write_bytes(os.urandom(3000))
    spec = "::".join(
        str(tmp_path / p) for p in ["good/g00000.tar", "empty.tar", "truncated.tar", "garbage.tar"]
    )
    stream = make_stream(spec, batch_size=1, workers=0, shuffle_buffer=0)
    with caplog.at_level(logging.WARNING):
        seen = [k for batch in take(stream, 22) for k in batch[0]]
    expected = set(keys) | {f"t000_{i:04d}" for i in range(6)}
    assert collections.Counter(seen) == {k: 2 for k in expected}  # two epochs of the good samples
    assert 3 <= stream.stats()["bad_shards"] <= 6  # three bad shards a pass; the third pass may have begun
    assert stream.stats()["bad_samples"] == 0
    for name, reason in [
        ("empty.tar", "empty shard"),
        ("truncated.tar", "truncated tar"),
        ("garbage.tar", ""),
    ]:
        assert f"skipping shard {tmp_path / name}: {reason}" in caplog.text
    assert caplog.text.count("skipping shard") == 3


def test_sources_with_nothing_usable_fail_loudly_instead_of_hanging(tmp_path):
    write_samples(tmp_path / "empty.tar", [])
    stream = make_stream(str(tmp_path / "empty.tar"), batch_size=2, workers=0)
    with pytest.raises(ClipkitError, match="no samples for 16 epochs"):
        take(stream, 1)
    write_samples(tmp_path / "bad.tar", [{"__key__": f"k{i}", "png": b"junk", "txt": "x"} for i in range(3)])
    stream = make_stream(str(tmp_path / "bad.tar"), batch_size=2, workers=0)
    with pytest.raises(ClipkitError, match="no usable sample for 16 epochs"):
        take(stream, 1)


def test_in_process_reading_leaves_the_callers_rng_alone(tmp_path):
    write_shards(tmp_path, num_shards=1, per_shard=6)
    stream = make_stream(str(tmp_path), batch_size=3, workers=0)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    take(stream, 2)
    assert torch.equal(torch.rand(3), expected)


def test_weights_set_the_mix_and_without_weights_sources_are_one_set(tmp_path):
    write_shards(tmp_path / "a", num_shards=2, per_shard=20, prefix="a")
    write_shards(tmp_path / "b", num_shards=2, per_shard=20, prefix="b")
    spec = f"{tmp_path / 'a'}::{tmp_path / 'b'}"
    mixed = [k for b in take(make_stream(spec, weights=[3, 1], batch_size=20, workers=0), 20) for k in b[0]]
    share_a = sum(k.startswith("a") for k in mixed) / len(mixed)
    assert 0.70 < share_a < 0.80  # 400 draws at p = 0.75: 5 standard deviations wide
    one_set = [k for b in take(make_stream(spec, batch_size=10, workers=0), 8) for k in b[0]]
    assert len(set(one_set)) == 80  # one pass over both sources, each sample once


def test_brace_ranges_pipe_commands_and_fsspec_urls_read_the_same_samples(tmp_path):
    fsspec = pytest.importorskip("fsspec")
    keys = write_shards(tmp_path, num_shards=3, per_shard=4)
    memory = fsspec.filesystem("memory")
    for i in range(3):
        memory.pipe(f"/clipkit-test/s{i:05d}.tar", (tmp_path / f"s{i:05d}.tar").read_bytes())
    specs = {
        "braces": str(tmp_path / "s{00000..00002}.tar"),
        "pipe": f"pipe:cat {tmp_path}/s0000{{0..2}}.tar",
        "fsspec": "memory://clipkit-test/s{00000..00002}.tar",
    }
    for name, spec in specs.items():
        seen = [
            k for b in take(make_stream(spec, batch_size=4, workers=0, shuffle_buffer=0), 3) for k in b[0]
        ]
        assert sorted(seen) == keys, name


def test_a_spec_matching_no_file_fails_before_training_naming_the_spec(tmp_path, caplog):
    write_shards(tmp_path, num_shards=2, per_shard=2)
    spec = str(tmp_path / "missing-{000..009}.tar")
    with pytest.raises(
        ClipkitError, match=r"data.train_shards '.*missing-\{000\.\.009\}\.tar' matches no shard"
    ):
        prepare_data(DataConfig.from_dict({"train_shards": spec}))
    with caplog.at_level(logging.WARNING):
        cfg = prepare_data(DataConfig.from_dict({"train_shards": str(tmp_path / "s{00000..00003}.tar")}))
    assert cfg.train_sources == [[str(tmp_path / "s00000.tar"), str(tmp_path / "s00001.tar")]]
    assert "2 of 4 shards do not exist" in caplog.text
    with pytest.raises(ClipkitError, match="data.weights has 1 entries but data.train_shards has 2 sources"):
        prepare_data(DataConfig.from_dict({"train_shards": f"{tmp_path}::{tmp_path}", "weights": [1.0]}))


def test_unknown_config_key_is_named_with_the_valid_keys():
    with pytest.raises(
        ClipkitError, match=r"unknown key\(s\) \['batchsize'\]; valid keys are \[.*'batch_size'"
    ):
        DataConfig.from_dict({"batchsize": 3})
    with pytest.raises(ClipkitError, match="shuffle_buffer must be an integer >= 0"):
        DataConfig.from_dict({"shuffle_buffer": -1})


def test_val_batches_pair_every_image_with_its_caption_in_order(tmp_path):
    keys = write_shards(tmp_path, num_shards=2, per_shard=5)
    cfg = prepare_data(DataConfig.from_dict({"val_shards": str(tmp_path)}))
    batches = list(iter_val_batches(cfg, transform=T.ToTensor(), tokenizer=TOKENIZER, batch_size=4))
    assert [len(images) for images, _ in batches] == [4, 4, 2]
    images = torch.cat([b[0] for b in batches])
    tokens = torch.cat([b[1] for b in batches])
    assert torch.equal(tokens, TOKENIZER([f"caption of {k}" for k in keys]))
    assert [round(float(im[0, 0, 0]) * 255) for im in images] == list(range(10))  # red channel = index
