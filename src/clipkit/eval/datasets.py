"""Evaluation datasets: finite, labelled (or captioned) and read in a fixed order.

A dataset is described once (`open_eval_dataset`) by its layout, where its samples live, and the class
names and prompt templates that go with it; `clipkit.eval.loader.EvalLoader` then reads it in batches.
The layouts are the ones people already have:

- a CLIP_benchmark `wds` directory (`test/nshards.txt`, `test/0.tar`, ..., `classnames.txt`,
  `zeroshot_classification_templates.txt`, optional `dataset_type.txt`), read as
  `clip_benchmark.datasets.builder.build_wds_dataset` reads it;
- a folder of class sub-folders, as torchvision's `ImageFolder` reads it;
- webdataset shards whose samples carry a label (`KEY.cls`, or `KEY.json` with `"label"`), plus a
  class-names file;
- for retrieval, captioned shards (img2dataset's `KEY.jpg` + `KEY.txt`, one caption per line) or a
  CLIP_benchmark retrieval `wds` directory.
"""

from __future__ import annotations

import glob
import json
import logging
import tarfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clipkit.data.images import is_image_file
from clipkit.errors import ClipkitError

if TYPE_CHECKING:
    from clipkit.data.shards import ErrorCallback

log = logging.getLogger(__name__)

CLASSIFICATION = "classification"
RETRIEVAL = "retrieval"
TASKS = (CLASSIFICATION, RETRIEVAL)

# File names CLIP_benchmark's wds builder reads next to the split folders.
CLASSNAMES_FILE = "classnames.txt"
TEMPLATES_FILE = "zeroshot_classification_templates.txt"
DATASET_TYPE_FILE = "dataset_type.txt"
NSHARDS_FILE = "nshards.txt"


SUPPORTED_LAYOUTS = (
    "a CLIP_benchmark wds directory (DIR/test/nshards.txt, DIR/test/0.tar ... with KEY.jpg|png|webp + "
    "KEY.cls, DIR/classnames.txt, DIR/zeroshot_classification_templates.txt)",
    "a folder of class sub-folders (DIR/CLASS_NAME/IMAGE.jpg)",
    "webdataset shards (DIR/*.tar, FILE.tar, 'DIR/{000..009}.tar' or a glob) whose samples have "
    'KEY.json {"label": int} or KEY.cls, with --classnames FILE',
    "for --task retrieval: captioned shards (KEY.jpg + KEY.txt, one caption per line) or a "
    "CLIP_benchmark retrieval wds directory (dataset_type.txt = retrieval)",
)


@dataclass(kw_only=True)
class EvalDataset:
    """Where an evaluation set's samples are and what goes with them.

    Samples have a fixed order: shards in the order given (members in tar order), or class folders
    sorted by name with their files sorted. `EvalLoader` numbers samples in that order.
    """

    source: str  # what the user named
    layout: str  # "clip_benchmark_wds" | "class_folders" | "labelled_shards" | "captioned_shards"
    task: str  # "classification" | "retrieval"
    shards: list[str] = field(default_factory=list)  # tar paths or URLs, for shard layouts
    files: list[tuple[str, int]] = field(default_factory=list)  # (image path, label), for class folders
    classnames: list[str] | None = None
    templates: list[str] | dict[str, list[str]] | None = None

    @property
    def num_classes(self) -> int | None:
        return None if self.classnames is None else len(self.classnames)

    def count_samples(self) -> int | None:
        """The number of samples, from tar headers alone (None for remote or unreadable shards)."""
        if self.layout == "class_folders":
            return len(self.files)
        total = 0
        for shard in self.shards:
            if "://" in shard or shard.startswith("pipe:") or not Path(shard).is_file():
                return None
            count = _count_tar_samples(Path(shard))
            if count is None:
                return None
            total += count
        return total

    def describe(self) -> str:
        what = self.layout.replace("_", " ")
        if self.classnames is not None:
            what += f", {len(self.classnames)} classes"
        return what


def open_eval_dataset(
    source: str | Path,
    *,
    task: str = "auto",
    split: str = "test",
    classnames: str | Path | Sequence[str] | None = None,
    templates: str | Path | Sequence[str] | Mapping[str, Sequence[str]] | None = None,
) -> EvalDataset:
    """Describe the dataset at `source`, detecting its layout.

    `task` is "classification", "retrieval" or "auto" (a CLIP_benchmark directory says which in
    dataset_type.txt; shards are retrieval when their samples have captions but no labels).
    `classnames` / `templates` are files (or lists) that override what the dataset ships; templates
    are strings with a `{c}` placeholder, or a mapping of class name to its own finished prompts.
    A classification set without templates uses OpenAI's 80 ImageNet templates (logged).
    """
    if task not in ("auto", *TASKS):
        raise ClipkitError(f"task '{task}' is not one of auto, {', '.join(TASKS)}")
    text = str(source)
    path = Path(text)
    if path.is_dir() and (path / split / NSHARDS_FILE).is_file():
        dataset = _open_clip_benchmark_dir(path, split=split, task=task)
    elif path.is_dir() and sorted(path.glob(f"*/{NSHARDS_FILE}")):
        found = ", ".join(p.parent.name for p in sorted(path.glob(f"*/{NSHARDS_FILE}")))
        raise ClipkitError(
            f"{text} has no split '{split}' ({split}/{NSHARDS_FILE}); it has: {found}. Pass --split"
        )
    elif path.is_dir() and (path / NSHARDS_FILE).is_file() and (path.parent / CLASSNAMES_FILE).is_file():
        # The split folder of a CLIP_benchmark directory, named directly.
        dataset = _open_clip_benchmark_dir(path.parent, split=path.name, task=task)
    elif path.is_dir() and sorted(path.glob("*.tar")):
        dataset = _open_shards([str(p) for p in sorted(path.glob("*.tar"))], text, task=task, home=path)
    elif path.is_dir() and _class_folders(path):
        dataset = _open_class_folders(path, task=task)
    elif path.is_file() and path.suffix == ".tar":
        dataset = _open_shards([text], text, task=task, home=path.parent)
    elif any(ch in text for ch in "{*?[") or "://" in text or text.startswith("pipe:"):
        shards = _expand_shard_pattern(text)
        local = Path(shards[0]).parent if Path(shards[0]).is_file() else None
        dataset = _open_shards(shards, text, task=task, home=local)
    elif not path.exists():
        raise ClipkitError(f"dataset {text} not found; give one of: {'; '.join(SUPPORTED_LAYOUTS)}")
    else:
        raise ClipkitError(
            f"{text} is not a dataset layout clipkit reads; supported layouts: {'; '.join(SUPPORTED_LAYOUTS)}"
        )

    if dataset.task == CLASSIFICATION:
        if classnames is not None:
            dataset.classnames = _classnames_override(classnames, dataset)
        if templates is not None:
            dataset.templates = read_templates(templates) if isinstance(templates, str | Path) else templates
        if dataset.classnames is None:
            raise ClipkitError(
                f"dataset {text} has no class names: pass --classnames FILE (one class name per line, "
                f"line i naming label i) or put {CLASSNAMES_FILE} next to the shards"
            )
        if not dataset.templates:
            dataset.templates = openai_imagenet_templates()
            log.info(
                "no templates given for %s; using OpenAI's %d ImageNet templates",
                text,
                len(dataset.templates),
            )
        check_templates(dataset.templates, dataset.classnames, origin=str(templates or text))
    return dataset


def read_classnames(path: str | Path) -> list[str]:
    """One class name per line (line i names label i), as CLIP_benchmark's classnames.txt; or a JSON list."""
    path = Path(path)
    text, parsed = _read_text_or_json(path, "class names")
    if parsed is not None:
        names = parsed
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ClipkitError(f"{path}: a JSON class names file must hold a list of strings")
        return names
    names = [line.strip() for line in text.splitlines()]
    while names and not names[-1]:
        names.pop()
    if not names:
        raise ClipkitError(f"{path} lists no class names; write one per line")
    blank = [i + 1 for i, name in enumerate(names) if not name]
    if blank:
        raise ClipkitError(f"{path}: line {blank[0]} is empty; line i names label i, so remove or fill it")
    return names


def read_templates(path: str | Path) -> list[str] | dict[str, list[str]]:
    """Templates with `{c}`, one per line (blank lines ignored); or JSON: a list, or class -> prompts."""
    path = Path(path)
    text, templates = _read_text_or_json(path, "templates")
    if templates is not None:
        if isinstance(templates, dict):
            return {str(k): list(v) for k, v in templates.items()}
        if isinstance(templates, list):
            return [str(t) for t in templates]
        raise ClipkitError(f"{path}: a JSON templates file holds a list of templates or class -> prompts")
    templates = [line.strip() for line in text.splitlines() if line.strip()]
    if not templates:
        raise ClipkitError(f"{path} holds no templates; write one per line with {{c}} for the class name")
    return templates


def _read_text_or_json(path: Path, what: str) -> tuple[str, Any]:
    """The file's text, and its parsed value when it is a .json file (else None)."""
    if not path.is_file():
        raise ClipkitError(f"{what} file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix != ".json":
        return text, None
    try:
        return text, json.loads(text)
    except json.JSONDecodeError as e:
        raise ClipkitError(f"{path} is not valid JSON ({e})") from None


def check_templates(
    templates: Sequence[str] | Mapping[str, Sequence[str]], classnames: Sequence[str], *, origin: str
) -> None:
    """Every class gets at least one prompt, and every template fills with `str.format(c=...)`."""
    if isinstance(templates, Mapping):
        missing = [c for c in classnames if not templates.get(c)]
        if missing:
            raise ClipkitError(
                f"{origin}: per-class prompts are missing for {len(missing)} class(es), e.g. {missing[:3]}"
            )
        return
    if not templates:
        raise ClipkitError(f"{origin}: no templates; give at least one, like 'a photo of a {{c}}.'")
    for template in templates:
        try:
            filled = template.format(c="\0")
        except (KeyError, IndexError, ValueError) as e:
            raise ClipkitError(
                f"{origin}: template {template!r} does not fill with {{c}} ({type(e).__name__}: {e}); "
                "escape literal braces as {{ and }}"
            ) from None
        if "\0" not in filled:
            raise ClipkitError(f"{origin}: template {template!r} has no {{c}} placeholder for the class name")


def openai_imagenet_templates() -> list[str]:
    """OpenAI's 80 ImageNet prompts with `{c}`: CLIP_benchmark's default when a dataset ships none."""
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    return [template("{c}") for template in OPENAI_IMAGENET_TEMPLATES]


def iter_dataset_samples(
    shards: Sequence[str], on_error: ErrorCallback | None = None
) -> Iterator[dict[str, Any]]:
    """Raw webdataset samples (`__key__`, `__url__`, one bytes entry per extension), shards in order.

    Read by the data layer's tolerant shard reader, as training reads: a shard that cannot be opened,
    or is corrupt or truncated, goes to `on_error(url, None, reason)` and its readable samples are kept.
    """
    from clipkit.data.shards import iter_shard_samples  # imports webdataset (and torch): only when reading

    for url in shards:
        yield from iter_shard_samples(url, on_error or _ignore_error)


def _ignore_error(url: str, key: str | None, reason: str) -> None:
    pass


def _open_clip_benchmark_dir(root: Path, *, split: str, task: str) -> EvalDataset:
    nshards_file = root / split / NSHARDS_FILE
    try:
        nshards = int(nshards_file.read_text().strip())
    except ValueError:
        raise ClipkitError(f"{nshards_file} must hold the number of shards as one integer") from None
    shards = [str(root / split / f"{i}.tar") for i in range(nshards)]
    missing = [s for s in shards if not Path(s).is_file()]
    if missing:
        raise ClipkitError(
            f"{nshards_file} says {nshards} shards but {missing[0]} is missing; fix nshards.txt or the shards"
        )
    type_file = root / DATASET_TYPE_FILE
    dataset_type = type_file.read_text().strip().lower() if type_file.is_file() else "classification"
    if dataset_type not in ("classification", "retrieval"):
        raise ClipkitError(
            f"{type_file} says '{dataset_type}'; clipkit evaluates classification and retrieval sets only"
        )
    if task == "auto":
        task = dataset_type
    if task != dataset_type:
        raise ClipkitError(
            f"{root} is a CLIP_benchmark {dataset_type} dataset ({type_file.name}); run it with "
            f"--task {dataset_type}"
        )
    dataset = EvalDataset(source=str(root), layout="clip_benchmark_wds", task=task, shards=shards)
    if task == CLASSIFICATION:
        if (root / CLASSNAMES_FILE).is_file():
            dataset.classnames = read_classnames(root / CLASSNAMES_FILE)
        if (root / TEMPLATES_FILE).is_file():
            dataset.templates = read_templates(root / TEMPLATES_FILE)
    return dataset


def _open_shards(shards: list[str], source: str, *, task: str, home: Path | None) -> EvalDataset:
    if task == "auto":
        task = _guess_shard_task(shards)
    layout = "labelled_shards" if task == CLASSIFICATION else "captioned_shards"
    dataset = EvalDataset(source=source, layout=layout, task=task, shards=shards)
    if task == CLASSIFICATION and home is not None:
        # clipkit's generated datasets keep classnames.txt beside train/ and test/, so also look one up.
        for folder in (home, home.parent):
            if dataset.classnames is None and (folder / CLASSNAMES_FILE).is_file():
                dataset.classnames = read_classnames(folder / CLASSNAMES_FILE)
            if dataset.templates is None and (folder / TEMPLATES_FILE).is_file():
                dataset.templates = read_templates(folder / TEMPLATES_FILE)
    return dataset


def _guess_shard_task(shards: list[str]) -> str:
    for sample in iter_dataset_samples(shards[:1]):
        if "cls" in sample or "json" in sample:
            return CLASSIFICATION
        if "txt" in sample:
            return RETRIEVAL
        break
    return CLASSIFICATION


def _class_folders(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def _open_class_folders(path: Path, *, task: str) -> EvalDataset:
    if task == RETRIEVAL:
        raise ClipkitError(
            f"{path} is a folder of class sub-folders, which has no captions for --task retrieval; "
            "give captioned shards (KEY.jpg + KEY.txt) instead"
        )
    folders = _class_folders(path)
    files: list[tuple[str, int]] = []
    for label, folder in enumerate(folders):
        files.extend((str(p), label) for p in sorted(folder.rglob("*")) if is_image_file(p))
    if not files:
        raise ClipkitError(
            f"{path} has sub-folders but no images in them; supported layouts: {'; '.join(SUPPORTED_LAYOUTS)}"
        )
    dataset = EvalDataset(
        source=str(path),
        layout="class_folders",
        task=CLASSIFICATION,
        files=files,
        classnames=[folder.name for folder in folders],
    )
    if (path / TEMPLATES_FILE).is_file():
        dataset.templates = read_templates(path / TEMPLATES_FILE)
    return dataset


def _classnames_override(classnames: str | Path | Sequence[str], dataset: EvalDataset) -> list[str]:
    names = read_classnames(classnames) if isinstance(classnames, str | Path) else list(classnames)
    if dataset.layout == "class_folders" and len(names) != len(dataset.classnames or []):
        raise ClipkitError(
            f"{classnames} lists {len(names)} class names but {dataset.source} has "
            f"{len(dataset.classnames or [])} class folders; give one name per folder, in sorted folder order"
        )
    return names


def _expand_shard_pattern(pattern: str) -> list[str]:
    from webdataset.shardlists import expand_urls  # braces and '::', as webdataset reads them

    shards: list[str] = []
    for item in expand_urls(pattern):
        if "://" in item or item.startswith("pipe:"):
            shards.append(item)
        elif any(ch in item for ch in "*?["):
            shards.extend(sorted(glob.glob(item)))
        elif Path(item).is_file():
            shards.append(item)
        else:
            raise ClipkitError(f"shard {item} (from {pattern}) not found")
    if not shards:
        raise ClipkitError(f"no shards match {pattern}")
    return shards


def _count_tar_samples(path: Path) -> int | None:
    """Samples in a tar from its headers; None when the tar cannot be read (the reader reports it)."""
    import webdataset as wds

    keys = set()
    try:
        with tarfile.open(path) as tar:
            for member in tar:  # reads headers only: tarfile seeks over member data in a regular file
                if member.isreg():
                    key, _ = wds.tariterators.base_plus_ext(member.name)
                    if key is not None and not Path(member.name).name.startswith("__"):
                        keys.add(key)
    except (tarfile.TarError, OSError):
        return None
    return len(keys)
