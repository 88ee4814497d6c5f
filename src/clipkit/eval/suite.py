"""A benchmark suite: datasets and, per dataset, the evaluations to run on it (a YAML file).

```yaml
name: local
resamples: 1000            # bootstrap resamples for the intervals
seed: 0                    # seeds the bootstrap (and nothing else)
datasets:
  - name: digits
    generate: {name: digits, dir: datasets/digits-seed0-32px, seed: 0, test_fraction: 0.3, image_size: 32}
    tasks: [zeroshot, retrieval, linear_probe, {type: fewshot, k: 5, seeds: [0, 1, 2]}]
  - name: cifar10
    source: hf-dataset:clip-benchmark/wds_cifar10   # read from the Hugging Face cache, offline
    tasks: [zeroshot]
```

A dataset is `source` (any layout `clipkit zeroshot` reads, or `hf-dataset:ORG/NAME`, a CLIP_benchmark
`wds_*` repository in the Hugging Face cache) or `generate` (a dataset clipkit writes, as
`data.generate`; a relative `dir` is under clipkit's cache). Splits: `split` (test) for every task,
`train_split` (train) and `val_split` (none: `val_proportion` of train is held out) for linear probes.
`open_suite` checks every dataset before any model runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clipkit.errors import ClipkitError
from clipkit.eval.datasets import (
    CLASSIFICATION,
    NSHARDS_FILE,
    RETRIEVAL,
    EvalDataset,
    iter_dataset_samples,
    open_eval_dataset,
)

HF_DATASET_PREFIX = "hf-dataset:"
ZEROSHOT, RETRIEVAL_TASK, LINEAR_PROBE, FEWSHOT = "zeroshot", "retrieval", "linear_probe", "fewshot"
TASK_TYPES = (ZEROSHOT, RETRIEVAL_TASK, LINEAR_PROBE, FEWSHOT)
DATASET_KEYS = {"name", "source", "generate", "tasks", "split", "train_split", "val_split", "val_proportion",
                "classnames", "templates"}  # fmt: skip
SUITE_KEYS = {"name", "datasets", "resamples", "seed", "description"}


@dataclass(kw_only=True)
class TaskSpec:
    type: str  # zeroshot | retrieval | linear_probe | fewshot
    k: int = -1  # fewshot: samples per class
    seeds: list[int] = field(default_factory=lambda: [0])  # probes: one probe per seed, metrics averaged

    @property
    def name(self) -> str:
        """The task's name in results: CLIP_benchmark's where it has one."""
        return {
            ZEROSHOT: "zeroshot_classification",
            RETRIEVAL_TASK: "zeroshot_retrieval",
            LINEAR_PROBE: "linear_probe",
        }.get(self.type, f"linear_probe_{self.k}shot")


@dataclass(kw_only=True)
class DatasetSpec:
    name: str
    source: str  # what the suite named (a path, hf-dataset:ORG/NAME, or generated:NAME)
    tasks: list[TaskSpec]
    split: str = "test"
    train_split: str = "train"
    val_split: str | None = None
    val_proportion: float = 0.2
    classnames: str | None = None
    templates: str | None = None
    generate: dict[str, Any] | None = None

    # Filled by `open_suite`: the opened splits.
    test: EvalDataset | None = None
    train: EvalDataset | None = None
    val: EvalDataset | None = None

    @property
    def needs_train(self) -> bool:
        return any(task.type in (LINEAR_PROBE, FEWSHOT) for task in self.tasks)

    def retrieval_view(self) -> EvalDataset:
        """The test split read as captioned samples (a labelled set whose samples also carry KEY.txt)."""
        assert self.test is not None
        if self.test.task == RETRIEVAL:
            return self.test
        return EvalDataset(source=self.test.source, layout="captioned_shards", task=RETRIEVAL,
                           shards=self.test.shards)  # fmt: skip


@dataclass(kw_only=True)
class Suite:
    name: str
    datasets: list[DatasetSpec]
    resamples: int = 1000
    seed: int = 0
    path: str = ""


def suites_dir() -> Path:
    from clipkit.configs import config_dir

    return config_dir() / "benchmark"


def read_suite(name_or_path: str | Path) -> Suite:
    """A suite from a YAML file, or by name from conf/benchmark/NAME.yaml."""
    import yaml

    path = Path(name_or_path)
    if not path.is_file():
        named = suites_dir() / f"{name_or_path}.yaml"
        if not named.is_file():
            known = sorted(p.stem for p in suites_dir().glob("*.yaml"))
            raise ClipkitError(
                f"suite {name_or_path} is neither a YAML file nor a suite name ({', '.join(known)})"
            )
        path = named
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ClipkitError(f"suite {path} is not valid YAML ({str(e).splitlines()[0]})") from None
    return parse_suite(raw, origin=str(path))


def parse_suite(raw: Any, *, origin: str) -> Suite:
    if not isinstance(raw, dict) or not isinstance(raw.get("datasets"), list) or not raw["datasets"]:
        raise ClipkitError(f"suite {origin} must be a mapping with a non-empty `datasets:` list")
    _check_keys(raw, SUITE_KEYS, f"suite {origin}")
    datasets = [_parse_dataset(entry, origin=origin) for entry in raw["datasets"]]
    names = [d.name for d in datasets]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise ClipkitError(
            f"suite {origin}: dataset name {duplicated[0]} is used twice; names must be unique"
        )
    return Suite(
        name=str(raw.get("name") or Path(origin).stem),
        datasets=datasets,
        resamples=int(raw.get("resamples", 1000)),
        seed=int(raw.get("seed", 0)),
        path=origin,
    )


def _parse_dataset(entry: Any, *, origin: str) -> DatasetSpec:
    if not isinstance(entry, dict) or "name" not in entry:
        raise ClipkitError(f"suite {origin}: each dataset is a mapping with a `name`, got {entry!r}")
    where = f"suite {origin}, dataset {entry['name']}"
    _check_keys(entry, DATASET_KEYS, where)
    if ("source" in entry) == ("generate" in entry):
        raise ClipkitError(
            f"{where}: give exactly one of `source` (a path or hf-dataset:ORG/NAME) or `generate`"
        )
    tasks = [_parse_task(task, where) for task in entry.get("tasks") or [ZEROSHOT]]
    generate = dict(entry["generate"]) if "generate" in entry else None
    source = str(entry.get("source") or f"generated:{generate.get('name') if generate else ''}")
    return DatasetSpec(
        name=str(entry["name"]),
        source=source,
        tasks=tasks,
        generate=generate,
        **{
            key: entry[key]
            for key in ("split", "train_split", "val_split", "val_proportion", "classnames", "templates")
            if key in entry
        },  # fmt: skip
    )


def _parse_task(task: Any, where: str) -> TaskSpec:
    if isinstance(task, str):
        task = {"type": task}
    if not isinstance(task, dict) or task.get("type") not in TASK_TYPES:
        raise ClipkitError(
            f"{where}: task {task!r} is not one of {', '.join(TASK_TYPES)} (or {{type: ..., ...}})"
        )
    _check_keys(task, {"type", "k", "seeds"}, f"{where}, task {task['type']}")
    seeds = task.get("seeds", [0])
    seeds = list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
    spec = TaskSpec(type=task["type"], k=int(task.get("k", -1)), seeds=seeds)
    if spec.type == FEWSHOT and spec.k < 1:
        raise ClipkitError(
            f"{where}: a fewshot task needs k >= 1 (samples per class), e.g. {{type: fewshot, k: 5}}"
        )
    return spec


def _check_keys(mapping: dict, allowed: set[str], where: str) -> None:
    unknown = sorted(set(mapping) - allowed)
    if unknown:
        raise ClipkitError(f"{where}: unknown key {unknown[0]!r}; known keys: {', '.join(sorted(allowed))}")


def resolve_dataset_source(spec: DatasetSpec) -> str:
    """The local directory (or shard spec) of a dataset: generated, found in the HF cache, or as given."""
    if spec.generate is not None:
        from clipkit.configs import cache_dir
        from clipkit.data.prepare import ensure_generated

        generate = dict(spec.generate)
        directory = Path(str(generate.get("dir", f"datasets/{spec.name}"))).expanduser()
        generate["dir"] = str(directory if directory.is_absolute() else cache_dir() / directory)
        return str(ensure_generated(generate))
    if spec.source.startswith(HF_DATASET_PREFIX):
        return str(hf_dataset_snapshot(spec.source[len(HF_DATASET_PREFIX) :], name=spec.name))
    return spec.source


def hf_dataset_snapshot(repo_id: str, *, name: str) -> Path:
    """The cached snapshot of a Hugging Face dataset repo (offline); one line with the download command if absent."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    repo_id, _, revision = repo_id.partition("@")
    try:
        path = snapshot_download(
            repo_id, repo_type="dataset", revision=revision or None, local_files_only=True
        )
    except (LocalEntryNotFoundError, FileNotFoundError, OSError):
        raise ClipkitError(
            f"dataset {name} (hf-dataset:{repo_id}) is not in the Hugging Face cache; download it first: "
            f"hf download --repo-type dataset {repo_id}" + (f" --revision {revision}" if revision else "")
        ) from None
    return Path(path)


def open_suite(suite: Suite) -> Suite:
    """Open every dataset's splits and check them, so a bad dataset stops the run before any model does."""
    for spec in suite.datasets:
        local = resolve_dataset_source(spec)
        wants_retrieval_only = all(task.type == RETRIEVAL_TASK for task in spec.tasks)
        task = RETRIEVAL if wants_retrieval_only else "auto"
        try:
            spec.test = _open_split(local, spec.split, task=task, spec=spec)
            if spec.needs_train:
                spec.train = _open_split(local, spec.train_split, task=CLASSIFICATION, spec=spec)
            if spec.needs_train and spec.val_split:
                spec.val = _open_split(local, spec.val_split, task=CLASSIFICATION, spec=spec)
        except ClipkitError as e:
            raise ClipkitError(f"dataset {spec.name}: {e}") from None
        if spec.test.task != CLASSIFICATION and any(t.type != RETRIEVAL_TASK for t in spec.tasks):
            raise ClipkitError(
                f"dataset {spec.name} ({local}) has captions but no labels; give it `tasks: [retrieval]`"
            )
        for split in (spec.test, spec.train, spec.val):
            if split is not None:
                check_split(split, name=spec.name)
    return suite


def _open_split(local: str, split: str, *, task: str, spec: DatasetSpec) -> EvalDataset:
    """A split of a CLIP_benchmark directory (SPLIT/nshards.txt), or a plain folder of shards SPLIT/
    (clipkit's generated train splits), with the class names and templates of the directory above."""
    folder = Path(local) / split
    if folder.is_dir() and not (folder / NSHARDS_FILE).is_file():
        local, split = str(folder), "test"
    return open_eval_dataset(
        local, task=task, split=split, classnames=spec.classnames, templates=spec.templates
    )


def check_split(dataset: EvalDataset, *, name: str) -> None:
    """Not empty, and (on its first shard) labels within the class names: else one line naming it."""
    count = dataset.count_samples()
    if count == 0:
        raise ClipkitError(f"dataset {name}: {dataset.source} holds no samples; check the path or the split")
    if dataset.task != CLASSIFICATION or not dataset.shards:
        return
    num_classes = dataset.num_classes or 0
    for sample in iter_dataset_samples(dataset.shards[:1]):
        label = _sample_label(sample)
        if label is not None and not 0 <= label < num_classes:
            raise ClipkitError(
                f"dataset {name}: sample {sample['__key__']} in {sample.get('__url__')} has label {label} but "
                f"there are {num_classes} class names; fix the class names (classnames: FILE) or the labels"
            )


def _sample_label(sample: dict[str, Any]) -> int | None:
    import json

    try:
        if "cls" in sample:
            return int(sample["cls"].decode("utf-8").strip())
        if "json" in sample:
            return int(json.loads(sample["json"])["label"])
    except (ValueError, KeyError, TypeError):
        return None  # the loader reports it, with the sample, when it reads it
    return None
