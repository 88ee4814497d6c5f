"""Precision and recall of near-duplicate removal on planted copies of real images.

The 539 held-out digit scans (real, from `data=digits`) plus resized and recompressed copies of `--copies` of
them (enlarged 1.5x with bicubic resampling and saved as JPEG quality 75, beside PNG originals) are scored with
`--model` through `score_collection` (what `clipkit score` runs); `duplicate_groups` then groups them at each
threshold, exactly and clustered (k-means, SemDeDup's way). A predicted pair is two members of one group;
precision is the share of predicted pairs that are a planted (original, copy) pair, recall the share of planted
pairs predicted. Two distinct scans that look alike count against precision, so it is a lower bound.

    nice -n 10 python scripts/bench_dedup.py --model runs/digits --out bench_dedup.json
"""

from __future__ import annotations

import argparse
import io
import itertools
import random
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

from _report import write_report


def plant(digits: Path, out: Path, copies: int, seed: int) -> set[tuple[str, str]]:
    """The test scans as PNG files in `out`, and JPEG copies of `copies` of them; the planted (original, copy) pairs."""
    from clipkit.data.shards import iter_shard_samples

    out.mkdir(parents=True)
    names = []
    for shard in sorted((digits / "test").glob("*.tar")):
        for sample in iter_shard_samples(str(shard), lambda url, key, reason: None):
            name = f"{sample['__key__']}.png"
            (out / name).write_bytes(sample["png"])
            names.append(name)
    planted = set()
    for name in random.Random(seed).sample(names, copies):
        image = Image.open(out / name).convert("RGB")
        image = image.resize((image.width * 3 // 2, image.height * 3 // 2), Image.Resampling.BICUBIC)
        copy = f"copy-{Path(name).stem}.jpg"
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=75)
        (out / copy).write_bytes(buffer.getvalue())
        planted.add(tuple(sorted((name, copy))))
    return planted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="the model that embeds (e.g. a digits run dir)")
    parser.add_argument("--copies", type=int, default=50)
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.9, 0.95, 0.97, 0.98, 0.99])
    parser.add_argument("--out", help="also write the JSON report here")
    args = parser.parse_args()
    from clipkit.curate.dedup import duplicate_groups
    from clipkit.curate.score import read_scores, score_collection
    from clipkit.data.prepare import ensure_generated
    from clipkit.retrieval import load_encoder

    with tempfile.TemporaryDirectory(prefix="bench-dedup-") as work:
        work = Path(work)
        digits = ensure_generated(
            {"name": "digits", "dir": str(work / "digits"), "seed": 0, "test_fraction": 0.3, "image_size": 32}
        )
        planted = plant(digits, work / "images", args.copies, seed=0)
        encoder, identity = load_encoder(args.model)
        started = time.perf_counter()
        score_collection(work / "images", work / "scores", encoder=encoder, identity=identity)
        scored = read_scores(work / "scores")
        names = [str(k) for k in scored.columns["key"]]
        rows = []
        searches = (("exact", None), ("clustered", 0))
        for center, threshold, (method, limit) in itertools.product((False, True), args.thresholds, searches):
            options = {"exact_limit": limit} if limit is not None else {}
            groups = duplicate_groups(scored.image_vectors, threshold, center=center, **options)
            predicted = {
                tuple(sorted((names[i], names[j]))) for g in groups for i, j in itertools.combinations(g, 2)
            }
            hits = len(predicted & planted)
            rows.append(
                {
                    "threshold": threshold,
                    "search": method,
                    "centered": center,
                    "groups": len(groups),
                    "predicted_pairs": len(predicted),
                    "precision": hits / len(predicted) if predicted else None,
                    "recall": hits / len(planted),
                }
            )
            print(rows[-1], file=sys.stderr)
    report = {
        "benchmark": "near-duplicate removal on planted copies of real digit scans",
        "command": "nice -n 10 python scripts/bench_dedup.py " + " ".join(sys.argv[1:]),
        "model": identity["source"],
        "images": len(names),
        "planted_pairs": len(planted),
        "seconds": time.perf_counter() - started,
        "results": rows,
    }
    print(write_report(report, args.out))


if __name__ == "__main__":
    main()
