"""Throughput of clipkit's TrainStream against the decode ceiling, at 1 and 2 DataLoader workers.

Both sides do the same work on the same 224 px JPEG images: PIL decode, the model's training transform
(open_clip's RandomResizedCrop to 224 + normalise) and tokenisation, batched in the workers. The ceiling
reads the images as plain files with a map-style DataLoader (no tar, no shuffling, no bookkeeping);
the stream reads them from webdataset shards with everything it adds (shard split, shuffle buffer,
per-sample seeding, positions). Runs are interleaved (ceiling, stream, stream, ceiling, ...) and the
medians reported, since the machine may be shared. Prints JSON.

    python scripts/bench_data.py [--images 1024] [--rounds 3] [--out results.json]
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import open_clip
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image

from _report import write_report
from clipkit.data import DataConfig, TrainStream, prepare_data
from clipkit.data.synthetic import describe_sample, render
from clipkit.data.writer import TRAIN_LAYOUT, Record, write_split


class RawFiles(torch.utils.data.Dataset):
    """The ceiling: image files read and decoded in a loop, cycling through them."""

    def __init__(self, paths: list[Path], captions: list[str], transform, length: int):
        self.paths, self.captions, self.transform, self.length = paths, captions, transform, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        index %= len(self.paths)
        with Image.open(io.BytesIO(self.paths[index].read_bytes())) as image:
            return self.transform(image.convert("RGB")), self.captions[index]


def make_collate(tokenizer):
    def collate(items):
        return torch.stack([image for image, _ in items]), tokenizer([caption for _, caption in items])

    return collate


def make_images(directory: Path, count: int) -> tuple[list[Path], list[str]]:
    paths, captions = [], []
    for index in range(count):
        record = describe_sample(0, "bench", index, 224)
        path = directory / f"{index:06d}.jpg"
        render(record).save(path, format="JPEG", quality=90)
        paths.append(path)
        captions.append(record.caption)
    return paths, captions


def samples_per_second(batches, *, batch_size: int, warmup: int, measured: int) -> float:
    """Rate over `measured` batches after `warmup` (worker start-up and first prefetch excluded)."""
    iterator = iter(batches)
    for _ in range(warmup):
        next(iterator)
    start = time.perf_counter()
    for _ in range(measured):
        next(iterator)
    rate = measured * batch_size / (time.perf_counter() - start)
    del iterator  # stops the workers
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--measured-batches", type=int, default=24)
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the main process only receives batches
    transform = image_transform_v2(PreprocessCfg(size=224), is_train=True)
    tokenizer = open_clip.SimpleTokenizer(context_length=77)

    with tempfile.TemporaryDirectory(prefix="clipkit-bench-data-") as tmp:
        tmp = Path(tmp)
        (tmp / "raw").mkdir()
        paths, captions = make_images(tmp / "raw", args.images)
        records = [
            Record(key=p.stem, caption=c, image_path=str(p)) for p, c in zip(paths, captions, strict=True)
        ]
        write_split(records, tmp / "shards", layout=TRAIN_LAYOUT, samples_per_shard=args.images // 8)
        total = args.batch_size * (2 + args.measured_batches) * max(args.workers) * 4

        def ceiling(workers: int) -> float:
            loader = torch.utils.data.DataLoader(
                RawFiles(paths, captions, transform, total),
                batch_size=args.batch_size,
                num_workers=workers,
                collate_fn=make_collate(tokenizer),
            )
            return samples_per_second(
                loader, batch_size=args.batch_size, warmup=2, measured=args.measured_batches
            )

        def stream(workers: int) -> float:
            cfg = prepare_data(
                DataConfig(train_shards=str(tmp / "shards"), batch_size=args.batch_size, workers=workers)
            )
            batches = TrainStream(cfg, transform=transform, tokenizer=tokenizer, seed=0)
            return samples_per_second(
                batches, batch_size=args.batch_size, warmup=2, measured=args.measured_batches
            )

        rates = {w: {"ceiling": [], "stream": []} for w in args.workers}
        for round_index in range(args.rounds):
            for workers in args.workers:
                order = ("ceiling", "stream") if round_index % 2 == 0 else ("stream", "ceiling")
                for kind in order:
                    rates[workers][kind].append((ceiling if kind == "ceiling" else stream)(workers))

    results = {}
    for workers, measured in rates.items():
        ceiling_median = statistics.median(measured["ceiling"])
        stream_median = statistics.median(measured["stream"])
        results[str(workers)] = {
            "ceiling_samples_per_s": [round(r, 1) for r in measured["ceiling"]],
            "stream_samples_per_s": [round(r, 1) for r in measured["stream"]],
            "ceiling_median": round(ceiling_median, 1),
            "stream_median": round(stream_median, 1),
            "stream_over_ceiling": round(stream_median / ceiling_median, 3),
        }
    report = {
        "benchmark": "data loading: TrainStream vs plain PIL decode + transform (same work, same workers)",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
        "images": args.images,
        "image_size": 224,
        "batch_size": args.batch_size,
        "measured_batches": args.measured_batches,
        "rounds": args.rounds,
        "workers": results,
    }
    print(write_report(report, args.out))


if __name__ == "__main__":
    main()
