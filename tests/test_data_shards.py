"""`clipkit shards`: every input kind round-trips (same images, same captions), bad inputs are listed."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipkit.cli.main import main as clipkit_main
from clipkit.data.shards import iter_shard_samples
from clipkit.data.writer import ImageOptions, Record, _write_shard


def make_image(path: Path, seed: int, size=(20, 12)) -> np.ndarray:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return pixels


def read_split(directory: Path) -> dict[str, dict]:
    """Every sample of every .tar in `directory`, by key, decoded: {"image", "caption", ...}."""
    samples = {}
    for shard in sorted(directory.glob("*.tar")):
        for sample in iter_shard_samples(str(shard), lambda *a: pytest.fail(f"bad shard {a}")):
            ext = next(e for e in ("jpg", "png", "webp") if e in sample)
            entry = {
                "image": np.asarray(Image.open(io.BytesIO(sample[ext]))),
                "ext": ext,
                "bytes": sample[ext],
            }
            entry["caption"] = sample["txt"].decode()
            if "json" in sample:
                entry["json"] = json.loads(sample["json"])
            if "cls" in sample:
                entry["cls"] = int(sample["cls"])
            samples[sample["__key__"]] = entry
    return samples


def shards(*args: str) -> int:
    return clipkit_main(["shards", *args])


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".parquet"])
def test_table_round_trip(tmp_path, suffix):
    rows, expected = [], {}
    for i in range(7):
        name = f"img/{i}.png"
        expected[f"caption number {i}"] = make_image(tmp_path / name, i)
        rows.append({"path": name, "text": f"caption number {i}", "source_id": i})
    rows.append({"path": "img/missing.png", "text": "no such file", "source_id": 99})
    table = tmp_path / f"table{suffix}"
    if suffix in (".csv", ".tsv"):
        with table.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="," if suffix == ".csv" else "\t")
            writer.writeheader()
            writer.writerows(rows)
    elif suffix == ".jsonl":
        table.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        pa = pytest.importorskip("pyarrow")
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), table)
    out = tmp_path / "out"
    args = [str(table), "--out", str(out), "--image-column", "path", "--caption-column", "text"]
    assert shards(*args, "--samples-per-shard", "3") == 0
    samples = read_split(out)
    assert sorted(p.name for p in out.glob("*.tar")) == ["00000.tar", "00001.tar", "00002.tar"]
    assert {s["caption"]: s["image"] for s in samples.values()}.keys() == expected.keys()
    for sample in samples.values():
        assert np.array_equal(sample["image"], expected[sample["caption"]])  # PNG kept as is: lossless
        assert str(sample["json"]["source_id"]) in sample["caption"]  # other columns travel in KEY.json
    info = json.loads((out / "_info.json").read_text())
    assert info["samples"] == 7 and sum(info["shards"].values()) == 7
    assert [f["input"] for f in info["failed"]] == [str(tmp_path / "img/missing.png")]


def test_caption_folder_round_trip_lists_unusable_inputs(tmp_path, capsys):
    source = tmp_path / "photos"
    expected = {}
    for i in range(5):
        expected[f"photo {i}"] = make_image(source / "sub" / f"p{i}.png", i)
        (source / "sub" / f"p{i}.txt").write_text(f"  photo {i}\n")
    make_image(source / "uncaptioned.png", 9)
    (source / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (source / "broken.txt").write_text("a broken image")
    out = tmp_path / "out"
    assert shards(str(source), "--out", str(out)) == 0
    assert "a folder of images with .txt captions" in capsys.readouterr().out
    samples = read_split(out)
    assert {s["caption"] for s in samples.values()} == set(expected)
    for sample in samples.values():
        assert np.array_equal(sample["image"], expected[sample["caption"]])
    failed = {
        Path(f["input"]).name: f["error"] for f in json.loads((out / "_info.json").read_text())["failed"]
    }
    assert failed.keys() == {"uncaptioned.png", "broken.jpg"}
    assert "no caption file" in failed["uncaptioned.png"]


def test_class_folders_write_train_test_and_zero_shot_files(tmp_path):
    source = tmp_path / "pets"
    images = {}
    for name in ("golden_retriever", "cat"):
        for i in range(10):
            images[(name, i)] = make_image(source / name / f"{i}.png", len(images))
    out = tmp_path / "out"
    code = shards(str(source), "--out", str(out), "--template", "a photo of a {}.", "--template", "a {c}.")
    assert code == 0
    assert (out / "classnames.txt").read_text() == "cat\ngolden retriever\n"  # sorted folders; label = line
    assert (out / "zeroshot_classification_templates.txt").read_text() == "a photo of a {c}.\na {c}.\n"
    assert (out / "test" / "nshards.txt").read_text().strip() == "1"
    train, test = read_split(out / "train"), read_split(out / "test")
    assert len(train) == 16 and len(test) == 4  # 20% of each class
    for sample in test.values():
        assert sample["caption"] in {f"a photo of a {c}." for c in ("cat", "golden retriever")} | {
            "a cat.",
            "a golden retriever.",
        }
        assert ("cat" in sample["caption"]) == (sample["cls"] == 0)
    for sample in train.values():
        label, classname = sample["json"]["label"], sample["json"]["classname"]
        assert classname in sample["caption"] and label == ["cat", "golden retriever"].index(classname)
        folder = sample["json"]["source"].split("/")[0]
        index = int(Path(sample["json"]["source"]).stem)
        assert np.array_equal(sample["image"], images[(folder, index)])


def test_resize_and_format_options(tmp_path):
    source = tmp_path / "photos"
    make_image(source / "wide.png", 1, size=(300, 100))
    (source / "wide.txt").write_text("a wide image")
    make_image(source / "small.png", 2, size=(40, 30))
    (source / "small.txt").write_text("a small image")
    out = tmp_path / "out"
    assert (
        shards(str(source), "--out", str(out), "--max-side", "60", "--format", "webp", "--workers", "2") == 0
    )
    sizes = {
        s["caption"]: (s["ext"], s["image"].shape[1], s["image"].shape[0]) for s in read_split(out).values()
    }
    assert sizes == {"a wide image": ("webp", 60, 20), "a small image": ("webp", 40, 30)}  # never enlarged


def test_existing_output_is_not_overwritten_without_asking(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    assert shards("digits", "--out", str(tmp_path / "out")) == 2
    assert "already exists and is not empty" in capsys.readouterr().err


def test_an_interrupted_shard_leaves_no_file_behind(tmp_path):
    def interrupted(record):
        raise KeyboardInterrupt

    job = (tmp_path / "00000.tar", [Record(key="a", caption="c")], "train", ImageOptions(), interrupted)
    with pytest.raises(KeyboardInterrupt):
        _write_shard(job)
    assert list(tmp_path.iterdir()) == []
