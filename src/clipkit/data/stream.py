"""The training stream: endless batches from webdataset shards, split over processes and workers, resumable.

Layout. With W processes of `workers` DataLoader workers each there are G = W * max(1, workers) readers;
reader g = worker * W + rank. Each source's epoch e has one shard order, drawn from (seed, source, e),
that every reader computes alike:
- at least G shards: reader g reads shards g, g + G, ... of that order;
- fewer shards than readers: every reader reads all of them and keeps the samples of blocks
  (batch_size consecutive samples) g, g + G, ... -- no reader idles, and a global batch is the same set
  of samples for any (W, workers) with the same W * batch_size;
so, without resampling, one epoch of all readers sees every sample exactly once. Readers then shuffle
their samples through a buffer seeded from (seed, source, epoch, g), undecoded.

Position. A reader's position is, per source, (epoch, samples it has handed on in that epoch). Each batch
carries its reader's position; the DataLoader returns batches from its workers in turn, so the main
process knows every reader's position after the last batch it yielded. Resuming replays each reader's
raw samples (tar reading only, no decoding) up to that position.

Augmentation. Before its transform a sample's RNGs are seeded from (seed, epoch, shard URL, key), so the
pixels a sample gets do not depend on which process or worker reads it, nor on a resume. Likewise the
caption a visit draws (data.caption_choice: random, data.caption_templates) comes from (seed, epoch,
source, shard, key).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import logging
import math
import random
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from PIL import Image
from webdataset.filters import shuffle as shuffle_stage

from clipkit.data.config import DataConfig
from clipkit.data.images import decode_sample_image
from clipkit.data.keys import KeepKeys, check_keep_keys, read_keep_keys
from clipkit.data.seeds import stable_seed
from clipkit.data.shards import caption_of, captions_of, iter_shard_samples
from clipkit.errors import ClipkitError

log = logging.getLogger(__name__)

STATE_FORMAT = 1
# A source that gives a reader nothing for this many epochs in a row cannot feed training: fail loudly
# instead of spinning forever.
MAX_EMPTY_EPOCHS = 16
# Distinct bad samples and shards a reader logs by name before it only counts them.
MAX_LOGGED_PROBLEMS = 50


def choose_caption(
    sample: dict[str, Any],
    *,
    choice: str = "first",
    templates: list[str] | None = None,
    rng: random.Random | None = None,
) -> str:
    """The caption a visit of `sample` uses (data.caption_choice, data.caption_templates), or ValueError.

    `rng` (seeded per sample and visit) draws the caption under `random` and the template.
    """
    if choice == "whole":  # the .txt as it is, lines kept: what a sample's caption was before choices
        caption = caption_of(sample) if "txt" in sample else "\n".join(captions_of(sample))
    else:
        captions = captions_of(sample)
        caption = captions[0] if choice == "first" else rng.choice(captions)
    if templates:
        caption = rng.choice(templates).replace("{}", caption)
    return caption


def decode_sample(
    sample: dict[str, Any], choose: Callable[[dict[str, Any]], str] = choose_caption
) -> tuple[Image.Image, str]:
    """(RGB image, caption) of a raw sample, or ValueError naming what is wrong with it.

    `choose` picks the caption; the default is the first one, no template (evaluation's).
    """
    caption = choose(sample)
    image, reason = decode_sample_image(sample)
    if image is None:
        raise ValueError(reason)
    return image, caption


def seed_sample_rngs(seed: int, epoch: int, source: int, shard: int, key: str) -> None:
    """Seed the RNGs torchvision / open_clip transforms draw from, for this sample alone.

    The shard is named by its position in its source's list, not by its URL: the same shards mounted at
    another path (another node, a copy on local disk) give the same augmentation.
    """
    sample_seed = stable_seed(seed, epoch, source, shard, key)
    # The CPU generator directly: torch.manual_seed also seeds every accelerator, ~100x slower.
    torch.default_generator.manual_seed(sample_seed)
    random.seed(sample_seed)


def initial_reader_state(num_sources: int) -> dict[str, Any]:
    return {
        "sources": [{"epoch": 0, "emitted": 0} for _ in range(num_sources)],
        "draws": 0,  # source choices made (mixing by weights)
        "samples": 0,  # good samples put in batches
        "bad_samples": 0,
        "bad_shards": 0,
    }


class _SourceReader:
    """Endless raw samples of one source for reader g of G, epoch after epoch, from a saved position."""

    def __init__(
        self,
        urls: list[str],
        *,
        source_index: int,
        reader: int,
        num_readers: int,
        block: int,
        seed: int,
        resampled: bool,
        shuffle_buffer: int,
        position: dict[str, int],
        on_shard_error: Callable[[str, str | None, str], None],
        keep_keys: KeepKeys | None = None,
    ):
        self.urls = urls
        self.shard_index = {url: i for i, url in enumerate(urls)}
        self.source_index = source_index
        self.reader = reader
        self.num_readers = num_readers
        self.block = block
        self.seed = seed
        self.resampled = resampled
        self.shuffle_buffer = shuffle_buffer
        self.position = dict(position)
        self.on_shard_error = on_shard_error
        self.keep_keys = keep_keys

    def epoch_plan(self, epoch: int) -> tuple[list[str], Callable[[int], bool] | None]:
        """This reader's shards for `epoch`, and which of their samples (by index) it keeps."""
        g, count = self.reader, self.num_readers
        if self.resampled:
            rng = random.Random(stable_seed(self.seed, "resample", self.source_index, epoch, g))
            draws = max(1, math.ceil(len(self.urls) / count))
            return [rng.choice(self.urls) for _ in range(draws)], None
        order = list(self.urls)
        random.Random(stable_seed(self.seed, "shards", self.source_index, epoch)).shuffle(order)
        if len(order) >= count:
            return order[g::count], None
        block = self.block
        return order, lambda index: (index // block) % count == g

    def epoch_samples(self, epoch: int) -> Iterator[dict[str, Any]]:
        shards, keep = self.epoch_plan(epoch)
        listed = self.keep_keys

        def raw() -> Iterator[dict[str, Any]]:
            index = 0
            for url in shards:
                for sample in iter_shard_samples(url, self.on_shard_error):
                    # Off the key list: dropped undecoded, and before the block split so readers stay balanced.
                    if listed is not None and not listed.keeps(url, sample["__key__"]):
                        continue
                    if keep is None or keep(index):
                        yield sample
                    index += 1

        samples = raw()
        if self.shuffle_buffer > 0:
            rng = random.Random(stable_seed(self.seed, "shuffle", self.source_index, epoch, self.reader))
            samples = shuffle_stage(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)(samples)
        return samples

    def __iter__(self) -> Iterator[tuple[dict[str, Any], int]]:
        empty_epochs = 0
        while True:
            epoch, skip = self.position["epoch"], self.position["emitted"]
            produced = 0
            for index, sample in enumerate(self.epoch_samples(epoch)):
                produced += 1
                if index < skip:  # resuming: already handed on before the checkpoint
                    continue
                self.position["emitted"] = index + 1
                yield sample, epoch
            self.position = {"epoch": epoch + 1, "emitted": 0}
            empty_epochs = empty_epochs + 1 if produced == 0 else 0
            if empty_epochs >= MAX_EMPTY_EPOCHS:
                raise ClipkitError(
                    f"source {self.source_index} ({len(self.urls)} shards, first {self.urls[0]}) gave reader "
                    f"{self.reader} of {self.num_readers} no samples for {MAX_EMPTY_EPOCHS} epochs in a row: "
                    "the shards are empty or unreadable, or too few for the number of processes x workers"
                )


class _SourceChooser:
    """Which source each next sample comes from, in proportion to the weights; replayable from a count."""

    BLOCK = 4096

    def __init__(self, weights: list[float], *, seed: int, reader: int, draws: int):
        total = float(sum(weights))
        self.probabilities = np.asarray([w / total for w in weights])
        self.seed = stable_seed(seed, "mix", reader)
        self.draws = draws
        self._block_index = -1
        self._block: np.ndarray | None = None

    def next(self) -> int:
        block_index, offset = divmod(self.draws, self.BLOCK)
        if block_index != self._block_index:
            rng = np.random.default_rng([self.seed, block_index])
            self._block = rng.choice(len(self.probabilities), size=self.BLOCK, p=self.probabilities)
            self._block_index = block_index
        self.draws += 1
        return int(self._block[offset])


@contextlib.contextmanager
def _own_rng_state():
    """Keep the caller's torch / random RNG state: per-sample seeding must not leak into training."""
    python_state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            random.setstate(python_state)


class _BatchProducer(torch.utils.data.IterableDataset):
    """Runs in each DataLoader worker (or in the main process with workers=0): batches with positions."""

    def __init__(
        self,
        *,
        sources: list[list[str]],
        weights: list[float] | None,
        batch_size: int,
        seed: int,
        rank: int,
        world_size: int,
        num_workers: int,
        resampled: bool,
        shuffle_buffer: int,
        transform: Callable,
        tokenizer: Callable,
        reader_states: list[dict[str, Any]],
        first_worker: int,
        logged: set[tuple[str, str | None]],
        keep_keys: KeepKeys | None = None,
        caption_choice: str = "first",
        caption_templates: list[str] | None = None,
    ):
        super().__init__()
        self.keep_keys = keep_keys
        self.caption_choice = caption_choice
        self.caption_templates = caption_templates
        self.logged = logged  # problems already logged (kept across iterations when reading in-process)
        self.sources = sources
        self.weights = weights
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.num_workers = num_workers
        self.resampled = resampled
        self.shuffle_buffer = shuffle_buffer
        self.transform = transform
        self.tokenizer = tokenizer
        self.reader_states = reader_states
        self.first_worker = first_worker

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, dict[str, Any]]]:
        info = torch.utils.data.get_worker_info()
        in_main_process = info is None
        # The DataLoader's worker 0 produces the next batch the main process will yield; on resume that
        # batch belongs to worker `first_worker` of the saved run.
        worker = ((0 if info is None else info.id) + self.first_worker) % self.num_workers
        reader = worker * self.world_size + self.rank
        num_readers = self.num_workers * self.world_size
        state = copy.deepcopy(self.reader_states[worker])
        logged = self.logged

        def report(url: str, key: str | None, reason: str) -> None:
            state["bad_samples" if key is not None else "bad_shards"] += 1
            if (url, key) in logged or len(logged) > MAX_LOGGED_PROBLEMS:
                return
            logged.add((url, key))
            if len(logged) > MAX_LOGGED_PROBLEMS:
                log.warning("reader %d: more bad data; counted in stats() but no longer logged", reader)
            elif key is None:
                log.warning("skipping shard %s: %s", url, reason)
            else:
                log.warning("skipping sample %s in %s: %s", key, url, reason)

        readers = [
            _SourceReader(
                urls,
                source_index=index,
                reader=reader,
                num_readers=num_readers,
                block=self.batch_size,
                seed=self.seed,
                resampled=self.resampled,
                shuffle_buffer=self.shuffle_buffer,
                position=state["sources"][index],
                on_shard_error=report,
                keep_keys=self.keep_keys,
            )
            for index, urls in enumerate(self.sources)
        ]
        streams = [iter(r) for r in readers]
        last_good_epoch = [position["epoch"] for position in state["sources"]]
        chooser = None
        if len(readers) > 1:
            chooser = _SourceChooser(self.weights, seed=self.seed, reader=reader, draws=state["draws"])
        while True:
            images, captions, keys = [], [], []
            with _own_rng_state() if in_main_process else contextlib.nullcontext():
                while len(images) < self.batch_size:
                    source = chooser.next() if chooser is not None else 0
                    sample, epoch = next(streams[source])
                    url, key = sample["__url__"], sample["__key__"]
                    shard = readers[source].shard_index[url]
                    # Its own RNG, from the sample and visit: the same caption in any layout and on resume.
                    rng = random.Random(stable_seed(self.seed, "caption", epoch, source, shard, key))
                    choose = functools.partial(
                        choose_caption, choice=self.caption_choice, templates=self.caption_templates, rng=rng
                    )
                    try:
                        image, caption = decode_sample(sample, choose)
                    except ValueError as e:
                        report(url, key, str(e))
                        if epoch - last_good_epoch[source] >= MAX_EMPTY_EPOCHS:
                            raise ClipkitError(
                                f"source {source} (first shard {readers[source].urls[0]}) gave reader {reader} "
                                f"no usable sample for {MAX_EMPTY_EPOCHS} epochs: every image or caption is bad"
                            ) from None
                        continue
                    last_good_epoch[source] = epoch
                    seed_sample_rngs(self.seed, epoch, source, shard, key)
                    images.append(self.transform(image))
                    captions.append(caption)
                    keys.append(f"{url}#{key}")
                tokens = self.tokenizer(captions)
            state["samples"] += len(images)
            state["sources"] = [dict(r.position) for r in readers]
            state["draws"] = chooser.draws if chooser is not None else 0
            meta = {"worker": worker, "state": copy.deepcopy(state), "keys": keys}
            yield torch.stack(images), tokens.long(), meta


class TrainStream:
    """Endless training batches `(images (B,3,H,W) float32, tokens (B,L) long)` for one process.

    `cfg` comes from `prepare_data` (which builds generated datasets and resolves shard specs). `transform` and `tokenizer` are the
    model's (`bundle.train_transform`, `bundle.tokenizer`); both run in the DataLoader workers, so they
    must be picklable or the start method must be fork. `rank` / `world_size` are this process's place in
    the run; `seed` fixes shard order, shuffling and augmentation.
    """

    def __init__(
        self,
        cfg: DataConfig,
        *,
        transform: Callable,
        tokenizer: Callable,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        pin_memory: bool = False,
    ):
        if not 0 <= rank < world_size:
            raise ClipkitError(f"TrainStream: rank {rank} is not in [0, world_size={world_size})")
        if cfg.train_sources is None:
            # Preparing may generate a demo dataset: a step of its own, before any stream exists.
            raise ClipkitError(
                "TrainStream needs a prepared data config: cfg = clipkit.data.prepare_data(cfg) first"
            )
        if not cfg.train_sources:
            raise ClipkitError("data.train_shards is not set: name the training shards (see conf/data/)")
        self.cfg = cfg
        self.transform = transform
        self.tokenizer = tokenizer
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.pin_memory = pin_memory
        self.keep_keys = None
        if cfg.keep_keys:
            self.keep_keys = read_keep_keys(cfg.keep_keys)
            check_keep_keys(self.keep_keys, [url for source in cfg.train_sources for url in source])
        self.num_workers = max(1, cfg.workers)  # workers=0 reads like one worker, in this process
        self._reader_states = [initial_reader_state(len(cfg.train_sources)) for _ in range(self.num_workers)]
        self._batches = 0
        self._logged: set[tuple[str, str | None]] = set()
        self.last_keys: list[str] = []  # "shard_url#key" of each sample in the last batch yielded

    # -- iteration --------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        cfg = self.cfg
        producer = _BatchProducer(
            sources=cfg.train_sources,
            weights=cfg.weights,
            batch_size=cfg.batch_size,
            seed=self.seed,
            rank=self.rank,
            world_size=self.world_size,
            num_workers=self.num_workers,
            resampled=cfg.resampled,
            shuffle_buffer=cfg.shuffle_buffer,
            transform=self.transform,
            tokenizer=self.tokenizer,
            reader_states=copy.deepcopy(self._reader_states),
            first_worker=self._batches % self.num_workers,
            logged=self._logged,
            keep_keys=self.keep_keys,
            caption_choice=cfg.caption_choice,
            caption_templates=cfg.caption_templates,
        )
        if cfg.workers == 0:
            batches = iter(producer)
        else:
            loader = torch.utils.data.DataLoader(
                producer, batch_size=None, num_workers=cfg.workers, pin_memory=self.pin_memory
            )
            batches = iter(loader)
        for images, tokens, meta in batches:
            expected = self._batches % self.num_workers
            if meta["worker"] != expected:  # the DataLoader's in-order round robin is what positions rely on
                raise RuntimeError(f"batch from worker {meta['worker']}, expected worker {expected}")
            self._reader_states[meta["worker"]] = meta["state"]
            self._batches += 1
            self.last_keys = meta["keys"]
            yield images, tokens

    # -- position ---------------------------------------------------------------------------------------
    def _fingerprint(self) -> str:
        cfg = self.cfg
        described = (
            cfg.train_sources,
            cfg.weights,
            cfg.resampled,
            cfg.shuffle_buffer,
            cfg.batch_size,
            self.seed,
            # The list's content, not its path: a resume reads the same samples only with the same list.
            *([self.keep_keys.digest] if self.keep_keys is not None else []),
        )
        return hashlib.blake2b(repr(described).encode("utf-8"), digest_size=8).hexdigest()

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable position right after the last batch yielded (this process only)."""
        return {
            "format": STATE_FORMAT,
            "rank": self.rank,
            "world_size": self.world_size,
            "workers": self.num_workers,
            "fingerprint": self._fingerprint(),
            "batches": self._batches,
            "readers": copy.deepcopy(self._reader_states),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position; call before iterating.

        Exact (the same samples, in the same order, with the same pixels) when the number of processes,
        of workers, the data config and the seed are unchanged. Otherwise every reader restarts at the
        beginning of the earliest epoch any saved reader was in, and a warning says so.
        """
        if state.get("format") != STATE_FORMAT:
            raise ClipkitError(
                f"data stream state has format {state.get('format')!r}, expected {STATE_FORMAT}"
            )
        same_layout = state["world_size"] == self.world_size and state["workers"] == self.num_workers
        if same_layout and state["rank"] != self.rank:
            raise ClipkitError(
                f"data stream state of rank {state['rank']} given to rank {self.rank}: "
                "restore each process's own state"
            )
        self._batches = int(state["batches"])
        saved = state["readers"]
        if same_layout and state["fingerprint"] == self._fingerprint():
            self._reader_states = copy.deepcopy(saved)
            return
        num_sources = len(self.cfg.train_sources)
        epochs = [
            min((r["sources"][s]["epoch"] for r in saved if len(r["sources"]) == num_sources), default=0)
            for s in range(num_sources)
        ]
        log.warning(
            "data stream: resuming with a different %s (saved: %d processes x %d workers); the exact position "
            "cannot carry over, so every reader restarts at the beginning of epoch(s) %s",
            "layout" if not same_layout else "data config or seed",
            state["world_size"],
            state["workers"],
            epochs,
        )
        self._reader_states = [initial_reader_state(num_sources) for _ in range(self.num_workers)]
        for states in self._reader_states:
            states["sources"] = [{"epoch": e, "emitted": 0} for e in epochs]
        # Keep the counters going: this process's share of the saved totals goes to its first reader.
        first = self._reader_states[0]
        for key in ("samples", "bad_samples", "bad_shards"):
            first[key] = sum(int(r[key]) for r in saved)

    # -- reporting --------------------------------------------------------------------------------------
    def stats(self) -> dict[str, int]:
        """Counters for this process as of the last batch yielded (cumulative over the run, resumes included).

        samples: good samples yielded; bad_samples: samples skipped (undecodable image, missing or empty
        caption, a KEY.json caption list that is not valid), counted each time they are met; bad_shards:
        shard reads that failed or found an empty or truncated tar; epoch: the earliest epoch any of this
        process's readers is in; batches.
        """
        states = self._reader_states
        return {
            "samples": sum(s["samples"] for s in states),
            "bad_samples": sum(s["bad_samples"] for s in states),
            "bad_shards": sum(s["bad_shards"] for s in states),
            "epoch": min(src["epoch"] for s in states for src in s["sources"]),
            "batches": self._batches,
        }


def iter_val_batches(
    cfg: DataConfig,
    *,
    transform: Callable,
    tokenizer: Callable,
    batch_size: int | None = None,
    max_samples: int | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One in-order pass over `val_shards`: `(images (B,3,H,W), tokens (B,L))`, the last batch smaller.

    For retrieval recall during training: image i of the pass goes with caption i (a sample's first
    caption, no template, whatever data.caption_choice says). Read in this process;
    bad samples are skipped and logged. `cfg` comes from `prepare_data`.
    """
    if cfg.val_sources is None:
        raise ClipkitError("data.val_shards is not set (or prepare_data was not called)")
    batch_size = batch_size or cfg.batch_size

    def report(url: str, key: str | None, reason: str) -> None:
        log.warning("validation data: skipping %s%s: %s", url, f" key {key}" if key else "", reason)

    images, captions, seen = [], [], 0
    for url in (url for source in cfg.val_sources for url in source):
        for sample in iter_shard_samples(url, report):
            try:
                image, caption = decode_sample(sample)
            except ValueError as e:
                report(url, sample["__key__"], str(e))
                continue
            images.append(transform(image))
            captions.append(caption)
            seen += 1
            if len(images) == batch_size or seen == max_samples:
                yield torch.stack(images), tokenizer(captions).long()
                images, captions = [], []
            if seen == max_samples:
                return
    if images:
        yield torch.stack(images), tokenizer(captions).long()
