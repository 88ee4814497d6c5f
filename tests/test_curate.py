"""Curation: `clipkit score` (reusing `clipkit embed`), near-duplicate groups, `clipkit filter`, and
`data.keep_keys` in the training stream."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from clipkit.curate.dedup import clustered_pairs, duplicate_groups, keeper, near_duplicate_pairs
from clipkit.curate.score import read_scores, score_collection
from clipkit.data import DataConfig, TrainStream, prepare_data
from clipkit.data.shards import iter_shard_samples
from clipkit.errors import ClipkitError
from clipkit.retrieval import load_encoder
from conftest import run_clipkit
from shard_helpers import key_of, png_bytes, write_samples, write_shards
from test_data_stream import TOKENIZER, TRANSFORM, take


def make_stream(**keys) -> TrainStream:
    cfg = prepare_data(DataConfig.from_dict(keys))
    return TrainStream(cfg, transform=TRANSFORM, tokenizer=TOKENIZER, seed=3)


# -- data.keep_keys ----------------------------------------------------------------------------------------


def test_keep_keys_reads_only_the_listed_samples_and_never_decodes_the_others(tmp_path):
    keys = write_shards(tmp_path / "shards", num_shards=3, per_shard=10)
    # An undecodable image off the list: skipped before decoding, so never counted as bad.
    write_samples(
        tmp_path / "shards" / "s00003.tar", [{"__key__": "broken", "png": b"not a png", "txt": "x"}]
    )
    listed = keys[::3]
    keep = tmp_path / "keep.txt"
    keep.write_text("# a comment\n" + "".join(f"s{int(k[1:4]):05d}.tar#{k}\n" for k in listed) + "\n")
    stream = make_stream(train_shards=str(tmp_path / "shards"), keep_keys=str(keep), batch_size=2, workers=0)
    seen = [k for batch_keys, _, _ in take(stream, 10) for k in batch_keys]  # 20 samples: two epochs of 10
    assert sorted(seen[:10]) == sorted(listed)
    assert sorted(seen[10:]) == sorted(listed)
    assert stream.stats()["bad_samples"] == 0


def test_keep_keys_names_samples_of_one_shard_or_of_any(tmp_path):
    write_samples(tmp_path / "a.tar", [{"__key__": "k1", "png": png_bytes(1), "txt": "a1"}])
    write_samples(tmp_path / "b.tar", [{"__key__": "k1", "png": png_bytes(2), "txt": "b1"}])
    for listing, expected in (("b.tar#k1\n", {"b.tar"}), ("k1\n", {"a.tar", "b.tar"})):
        (tmp_path / "keep.txt").write_text(listing)
        stream = make_stream(
            train_shards=f"{tmp_path}/{{a,b}}.tar",
            keep_keys=str(tmp_path / "keep.txt"),
            batch_size=1,
            workers=0,
        )
        shards = set()
        for count, _ in enumerate(stream):
            shards.add(stream.last_keys[0].split("#")[0].rsplit("/", 1)[1])
            if count == 3:
                break
        assert shards == expected


def test_keep_keys_resume_continues_with_exactly_the_samples_not_yet_seen(tmp_path):
    keys = write_shards(tmp_path, num_shards=4, per_shard=12)
    keep = tmp_path / "keep.txt"
    keep.write_text("".join(f"{k}\n" for k in keys if int(k[-4:]) % 3))
    spec = {
        "train_shards": str(tmp_path),
        "keep_keys": str(keep),
        "batch_size": 5,
        "workers": 2,
        "shuffle_buffer": 7,
    }
    reference = make_stream(**spec)
    take(reference, 5)
    state = json.loads(json.dumps(reference.state_dict()))
    after = take(reference, 8)  # 32 listed samples an epoch: crosses into the next one
    resumed = make_stream(**spec)
    resumed.load_state_dict(state)
    for (keys_a, images_a, _), (keys_b, images_b, _) in zip(after, take(resumed, 8), strict=True):
        assert keys_a == keys_b
        assert torch.equal(images_a, images_b)
    assert all(int(k[-4:]) % 3 for batch in after for k in batch[0])


def test_a_key_list_of_other_shards_is_refused_before_training(tmp_path):
    write_shards(tmp_path / "shards", num_shards=2, per_shard=5)
    keep = tmp_path / "keep.txt"
    keep.write_text("s00000.tar#another-collection-key\n")
    with pytest.raises(ClipkitError, match="matches no sample of data.train_shards"):
        make_stream(train_shards=str(tmp_path / "shards"), keep_keys=str(keep))
    keep.write_text("\n# nothing\n")
    with pytest.raises(ClipkitError, match="names no sample"):
        make_stream(train_shards=str(tmp_path / "shards"), keep_keys=str(keep))


# -- near-duplicates --------------------------------------------------------------------------------------


def reference_groups(vectors: np.ndarray, threshold: float) -> list[list[int]]:
    """Connected components of cosine >= threshold, in float64, by brute force."""
    unit = vectors.astype(np.float64)
    similar = unit @ unit.T >= threshold
    seen, groups = set(), []
    for start in range(len(unit)):
        if start in seen:
            continue
        component, frontier = {start}, [start]
        while frontier:
            i = frontier.pop()
            for j in np.flatnonzero(similar[i]):
                if j not in component:
                    component.add(int(j))
                    frontier.append(int(j))
        seen |= component
        if len(component) > 1:
            groups.append(sorted(component))
    return groups


def planted(count=300, dim=32, copies=40, seed=0) -> tuple[np.ndarray, list[tuple[int, int]]]:
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((count, dim)).astype(np.float32)
    pairs = []
    for n in range(copies):  # a copy of row n, slightly moved, and a chain through a second copy for some
        vectors[count - 1 - n] = vectors[n] + 0.05 * rng.standard_normal(dim)
        pairs.append((n, count - 1 - n))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors, pairs


def test_exact_groups_match_a_float64_brute_force_reference():
    vectors, _ = planted()
    vectors[100] = vectors[0] * 0.98 + vectors[299] * 0.02  # a third member chained through a near-copy
    vectors[100] /= np.linalg.norm(vectors[100])
    for threshold in (0.9, 0.99):
        assert duplicate_groups(vectors, threshold) == reference_groups(vectors, threshold)
    pairs = near_duplicate_pairs(vectors, 0.9)
    assert (pairs[:, 0] < pairs[:, 1]).all()


def test_clustered_search_finds_the_planted_copies_as_the_exact_one_does():
    vectors, planted_pairs = planted(count=2000, copies=100)
    exact = duplicate_groups(vectors, 0.95)
    clustered = duplicate_groups(vectors, 0.95, exact_limit=100)  # above the limit: k-means + within clusters
    assert exact == sorted([sorted(p) for p in planted_pairs])
    found = {tuple(g) for g in clustered}
    # SemDeDup's trade: a copy whose k-means cluster differs from its original's is missed; here none or few.
    assert found <= {tuple(g) for g in exact}
    assert len(found) >= 0.95 * len(exact)
    assert len(clustered_pairs(vectors, 0.95, clusters=10)) >= 95


def test_a_group_keeps_its_highest_score_and_ties_go_to_the_smallest_name():
    scores = np.array([0.1, 0.3, np.nan, 0.3])
    assert keeper([0, 1, 2, 3], scores, ["d", "c", "a", "b"]) == 3
    assert keeper([0, 2], scores, ["b", "c", "a", "d"]) == 0  # NaN (no caption) loses to a smaller score


# -- clipkit score -----------------------------------------------------------------------------------------


def caption_shards(root, count=12) -> list[tuple[str, str, Image.Image]]:
    """Two shards of captioned images of different sizes; one sample without a caption, one undecodable."""
    rng = np.random.default_rng(0)
    written = []
    root.mkdir(parents=True, exist_ok=True)
    for shard in range(2):
        samples = []
        for i in range(count // 2):
            key = f"{shard}_{i:03d}"
            image = Image.fromarray(rng.integers(0, 256, (20 + i, 30, 3), dtype=np.uint8))
            out = io.BytesIO()
            image.save(out, format="PNG")
            sample = {"__key__": key, "png": out.getvalue(), "json": json.dumps({"n": i}).encode()}
            caption = "" if (shard, i) == (1, 2) else f"a picture number {i} of shard {shard}"
            if caption:
                sample["txt"] = caption
            samples.append(sample)
            written.append((key, caption, image))
        if shard == 1:
            samples.append({"__key__": "bad", "png": b"not an image", "txt": "bad"})
        write_samples(root / f"{shard:05d}.tar", samples)
    return written


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from clipkit.models import build_model, export_model

    path = tmp_path_factory.mktemp("tiny") / "model"
    torch.manual_seed(0)
    export_model(build_model("tiny"), path)
    return path


def test_score_columns_match_the_model_on_each_image_and_caption(tmp_path, tiny):
    written = caption_shards(tmp_path / "shards")
    encoder, identity = load_encoder(str(tiny))
    report = score_collection(
        tmp_path / "shards",
        tmp_path / "scores",
        encoder=encoder,
        identity=identity,
        part_size=5,
        batch_size=4,
    )
    assert [reason for _, reason in report.embedded.skipped if "bad" in _] and report.embedded.images == 12
    scored = read_scores(tmp_path / "scores")
    assert scored.manifest["model"]["fingerprint"] == identity["fingerprint"]
    by_key = {key: i for i, key in enumerate(scored.columns["key"])}
    images = encoder.encode_images([image for _, _, image in written])  # (12, D), the reference
    captioned = [(n, c) for n, (_, c, _) in enumerate(written) if c]
    texts = encoder.encode_texts([c for _, c in captioned])
    for (n, caption), text in zip(captioned, texts, strict=True):
        key, _, image = written[n]
        row = by_key[key]
        np.testing.assert_allclose(scored.image_vectors[row], images[n], atol=1e-5)
        expected = float(np.float64(images[n]) @ np.float64(text))
        assert scored.columns["clip_score"][row] == pytest.approx(expected, abs=1e-5)
        assert scored.columns["caption_length"][row] == len(caption)
        assert scored.columns["caption_words"][row] == len(caption.split())
        assert (scored.columns["width"][row], scored.columns["height"][row]) == image.size
    assert np.isnan(scored.columns["clip_score"][by_key["1_002"]])  # no caption: no score


def test_score_resumes_only_the_parts_that_are_missing(tmp_path, tiny):
    caption_shards(tmp_path / "shards")
    encoder, identity = load_encoder(str(tiny))
    options = {"encoder": encoder, "identity": identity, "part_size": 5}
    score_collection(tmp_path / "shards", tmp_path / "scores", **options)
    first = read_scores(tmp_path / "scores")
    (tmp_path / "scores" / "scores" / "scores_0001.parquet").unlink()
    report = score_collection(tmp_path / "shards", tmp_path / "scores", **options)
    assert report.scored_here == 1 and report.embedded.parts_done_here == 0
    again = read_scores(tmp_path / "scores")
    np.testing.assert_array_equal(first.columns["clip_score"], again.columns["clip_score"])


@pytest.mark.slow  # three processes importing torch
def test_score_in_two_processes_gives_the_one_process_result(tmp_path, tiny):
    caption_shards(tmp_path / "shards")
    one = run_clipkit(
        "score",
        "--model",
        str(tiny),
        "--images",
        str(tmp_path / "shards"),
        "--out",
        str(tmp_path / "one"),
        "--part-size",
        "4",
        "--workers",
        "0",
    )
    assert one.returncode == 0, one.stderr[-2000:]
    import subprocess
    import sys

    from conftest import REPO_ROOT, subprocess_env

    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "clipkit.score",
         "--model", str(tiny), "--images", str(tmp_path / "shards"), "--out", str(tmp_path / "two"), "--part-size", "4",
         "--workers", "0"],
        cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = read_scores(tmp_path / "one"), read_scores(tmp_path / "two")
    assert list(a.columns["key"]) == list(b.columns["key"])
    np.testing.assert_allclose(a.columns["clip_score"], b.columns["clip_score"], atol=1e-6)


# -- clipkit filter ----------------------------------------------------------------------------------------


class Result:
    def __init__(self, returncode: int, stdout: str, stderr: str):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def run_filter(capsys, *args: str) -> Result:
    """`clipkit filter ARGS` through the command's entry point, in this process (a subprocess would spend
    most of its time importing torch)."""
    from clipkit.cli.main import main

    capsys.readouterr()
    code = main(["filter", *args])
    captured = capsys.readouterr()
    return Result(code, captured.out, captured.err)


@pytest.fixture(scope="module")
def scored(tmp_path_factory, tiny):
    root = tmp_path_factory.mktemp("scored")
    caption_shards(root / "shards")
    encoder, identity = load_encoder(str(tiny))
    score_collection(root / "shards", root / "scores", encoder=encoder, identity=identity, part_size=5)
    return root


def test_filter_top_fraction_keeps_the_highest_scores_and_says_why_the_rest_went(scored, tmp_path, capsys):
    result = run_filter(
        capsys,
        "--scores",
        str(scored / "scores"),
        "--top-fraction",
        "0.5",
        "--min-caption-length",
        "1",
        "--out",
        str(tmp_path / "keys.txt"),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    collection = read_scores(scored / "scores")
    scores, lengths = collection.columns["clip_score"], collection.columns["caption_length"]
    names = collection.uris
    ranked = sorted(
        range(len(names)), key=lambda i: (-(scores[i] if np.isfinite(scores[i]) else -np.inf), names[i])
    )
    expected = [names[i] for i in sorted(ranked[:6]) if lengths[i] >= 1]
    assert (tmp_path / "keys.txt").read_text().splitlines() == expected
    summary = json.loads((tmp_path / "keys.txt.summary" / "summary.json").read_text())
    assert summary["kept"] == len(expected) and summary["samples"] == 12
    assert summary["removed_by"]["caption_length < 1"] == 1  # the sample without a caption
    assert sum(summary["removed_by"].values()) == 12 - len(expected)
    assert {p.name for p in (tmp_path / "keys.txt.summary").iterdir()} == {
        "summary.json",
        "scores.png",
        "examples.png",
    }


def test_filter_by_neighbour_score_without_caption_embeddings_stops_with_one_line(scored, tmp_path, capsys):
    import shutil

    broken = tmp_path / "scores"
    shutil.copytree(scored / "scores", broken)
    (broken / "text_emb" / "text_emb_0001.npy").write_bytes(b"not an array")
    out = tmp_path / "keys.txt"
    result = run_filter(
        capsys, "--scores", str(broken), "--top-fraction", "0.5", "--neighbours", "3", "--out", str(out)
    )
    assert result.returncode == 2
    assert "text_emb cannot be read" in result.stderr and "rerun `clipkit score`" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not out.exists() and not (tmp_path / "keys.txt.summary").exists()


def test_filter_by_neighbour_score_ranks_and_plots_by_it(scored, tmp_path, capsys):
    from clipkit.curate.neighbours import neighbour_scores
    from clipkit.curate.score import read_text_vectors

    out = tmp_path / "keys.txt"
    common = ["--scores", str(scored / "scores"), "--top-fraction", "0.5", "--neighbours", "3"]
    result = run_filter(capsys, *common, "--min", "neighbour_score=-1", "--out", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "not in the top 0.5 by neighbour_score" in result.stdout
    collection = read_scores(scored / "scores")
    scores = neighbour_scores(collection.image_vectors, read_text_vectors(collection), 3)
    assert np.isnan(scores).sum() == 1  # the sample without a caption
    names = collection.uris
    ranked = sorted(range(12), key=lambda i: (-(scores[i] if np.isfinite(scores[i]) else -np.inf), names[i]))
    assert out.read_text().splitlines() == [names[i] for i in sorted(ranked[:6])]
    summary = json.loads((tmp_path / "keys.txt.summary" / "summary.json").read_text())
    assert summary["rule"]["score_column"] == "neighbour_score" and summary["rule"]["neighbours"] == 3
    assert summary["score_cut"] == pytest.approx(scores[ranked[5]])


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--min", "aesthetic=5"], "names column 'aesthetic', which the scores do not have"),
        (["--min-score", "2"], "keeps none of the 12 samples"),
        (["--model", "tiny", "--top-fraction", "0.5"], "was scored by another model"),
        (["--neighbours", "12", "--top-fraction", "0.5"], "--neighbours must be between 0 and"),
    ],
    ids=["missing-column", "keeps-nothing", "other-model", "too-many-neighbours"],
)
def test_bad_rules_stop_with_one_line_and_write_nothing(scored, tmp_path, capsys, arguments, message):
    for output in (["--out", str(tmp_path / "keys.txt")], ["--reshard", str(tmp_path / "shards")]):
        result = run_filter(capsys, "--scores", str(scored / "scores"), *arguments, *output)
        assert result.returncode == 2
        assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert not list(tmp_path.iterdir())


def test_reshard_gives_the_same_training_samples_as_the_key_list(scored, tmp_path, capsys):
    common = ["--scores", str(scored / "scores"), "--top-fraction", "0.6"]
    assert run_filter(capsys, *common, "--out", str(tmp_path / "keys.txt")).returncode == 0
    result = run_filter(capsys, *common, "--reshard", str(tmp_path / "curated"), "--samples-per-shard", "4")
    assert result.returncode == 0, result.stderr[-2000:]
    info = json.loads((tmp_path / "curated" / "_info.json").read_text())
    assert info["samples"] == 8 and sum(info["shards"].values()) == 8 and len(info["shards"]) == 2

    def one_epoch(**keys) -> dict[str, tuple[bytes, str]]:
        stream = make_stream(batch_size=1, workers=0, shuffle_buffer=0, **keys)
        seen = {}
        for _ in stream:
            url, key = stream.last_keys[0].rsplit("#", 1)
            sample = next(s for s in iter_shard_samples(url, print) if s["__key__"] == key)
            seen[key] = (sample["png"], sample["txt"].decode())
            if len(seen) == 8:
                break
        return seen

    listed = one_epoch(train_shards=str(scored / "shards"), keep_keys=str(tmp_path / "keys.txt"))
    resharded = one_epoch(train_shards=str(tmp_path / "curated"))
    assert len(listed) == 8 and listed == resharded
    with tarfile.open(tmp_path / "curated" / "00000.tar") as tar:
        meta = json.loads(tar.extractfile(next(m for m in tar if m.name.endswith(".json"))).read())
    assert "n" in meta  # KEY.json carried over


def test_keys_and_groups_in_filter_output_name_samples_as_key_lists_do(scored, tmp_path, capsys):
    result = run_filter(
        capsys, "--scores", str(scored / "scores"), "--dedup", "0.9999", "--out", str(tmp_path / "k.txt")
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = (tmp_path / "k.txt").read_text().splitlines()
    assert len(lines) == 12 and all(line.split("#")[0] in ("00000.tar", "00001.tar") for line in lines)
    assert [key_of(line) for line in lines][:2] == ["0_000", "0_001"]
