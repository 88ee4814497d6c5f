"""`clipkit benchmark` end to end: two models x three datasets x {zero-shot, retrieval, linear probe,
few-shot}, one of them read from a Hugging Face cache laid out on disk; intervals, comparisons, files,
pictures, cached rerun, resume, and bad input stopped before any model runs."""

from __future__ import annotations

import json
import re
import shlex
import shutil

import pytest

from conftest import REPO_ROOT, run_clipkit
from test_eval_datasets import CLASSNAMES, TEMPLATES, encode, export_small_model, make_images, write_tar

pytestmark = pytest.mark.slow

REPO = "clip-benchmark/wds_tiny"


def write_dataset(root, *, seed: int, train: int = 70, test: int = 42):
    """A CLIP_benchmark wds directory whose samples carry a label and captions (train/ and test/)."""
    for split, count, offset in (("train", train, 0), ("test", test, 1)):
        images = make_images(count, seed=seed + offset)
        samples = []
        for i, image in enumerate(images):
            label = (i * 3 + seed) % len(CLASSNAMES)
            captions = [f"a {CLASSNAMES[label]} number {i}", f"picture {i} of a {CLASSNAMES[label]}"][
                : 1 + i % 2
            ]
            samples.append({"__key__": f"s{i:05d}", "png": encode(image, "png"), "cls": str(label).encode(),
                            "txt": "\n".join(captions).encode()})  # fmt: skip
        write_tar(root / split / "0.tar", samples)
        (root / split / "nshards.txt").write_text("1\n")
    (root / "classnames.txt").write_text("\n".join(CLASSNAMES) + "\n")
    (root / "zeroshot_classification_templates.txt").write_text("\n".join(TEMPLATES) + "\n")
    return root


def write_hub_cache(hf_home, repo: str, *, seed: int):
    """The layout huggingface_hub leaves: hub/datasets--ORG--NAME/{refs/main, snapshots/REV/...}."""
    folder = hf_home / "hub" / f"datasets--{repo.replace('/', '--')}"
    revision = "0123456789abcdef0123456789abcdef01234567"
    write_dataset(folder / "snapshots" / revision, seed=seed)
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(revision)


TASKS = "[zeroshot, retrieval, linear_probe, {type: fewshot, k: 2, seeds: 2}]"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("benchmark")
    models = [
        export_small_model(root / "runs" / "model-a", seed=0),
        export_small_model(root / "runs" / "model-b", seed=1),
    ]
    write_dataset(root / "first", seed=1)
    write_dataset(root / "second", seed=2)
    write_hub_cache(root / "hf", REPO, seed=3)
    suite = root / "suite.yaml"
    suite.write_text(
        "name: tiny\nresamples: 200\ndatasets:\n"
        f"  - {{name: first, source: {root / 'first'}, tasks: {TASKS}}}\n"
        f"  - {{name: second, source: {root / 'second'}, tasks: {TASKS}}}\n"
        f"  - {{name: hub, source: 'hf-dataset:{REPO}', tasks: {TASKS}}}\n"
    )
    return root, models, suite


def readme_command() -> list[str]:
    """The README's `clipkit benchmark` command, as typed there (run in the directory the test lays out)."""
    section = (REPO_ROOT / "README.md").read_text().split("## Benchmark", 1)[1].split("\n## ", 1)[0]
    command = re.search(r"```bash\n(.*?)```", section, re.S).group(1).strip()
    assert command.startswith("clipkit benchmark ")
    return shlex.split(command)[1:]


def benchmark(root, models, suite, out, **env):
    args = ["benchmark", "--suite", str(suite), "--out", str(out), "--workers", "0", "--batch-size", "32"]
    for model in models:
        args += ["--model", str(model)]
    return run_clipkit(*args, cwd=root, HF_HOME=str(root / "hf"), CLIPKIT_CACHE=str(root / "cache"), **env)


def test_benchmark_two_models_three_datasets_all_tasks(setup):
    root, models, suite = setup
    out = root / "bench"  # what the README's command names: runs/model-a, runs/model-b, suite.yaml, bench
    result = run_clipkit(
        *readme_command(), cwd=root, HF_HOME=str(root / "hf"), CLIPKIT_CACHE=str(root / "cache")
    )
    assert result.returncode == 0, result.stderr[-3000:]
    table = result.stdout
    assert "model-a" in table and "model-b" in table and "suite average" in table
    for task in ("zeroshot_classification", "zeroshot_retrieval", "linear_probe", "linear_probe_2shot"):
        assert len(re.findall(rf"(?<!\S){task}(?!\S)", table)) == 3, task
    assert "95% bootstrap intervals" in table and "* = significant" in table

    report = json.loads((out / "results.json").read_text())
    assert len(report["results"]) == 2 * 3 * 4
    for entry in report["results"]:
        for metric, interval in entry["intervals"].items():
            assert (
                interval["low"] <= entry["metrics"][metric] + 1e-12
                and entry["metrics"][metric] <= interval["high"] + 1e-12
            )
        if entry["label"] == "model-b":
            comparison = entry["comparison"][next(iter(entry["comparison"]))]
            low, high = comparison["difference"]["low"], comparison["difference"]["high"]
            assert comparison["significant"] == (not low <= 0 <= high) and 0 <= comparison["p_value"] <= 1
    keys = {entry["task"]: set(entry["metrics"]) for entry in report["results"]}
    assert {"acc1", "acc5", "mean_per_class_recall"} <= keys["zeroshot_classification"]
    assert {"image_retrieval_recall@1", "text_retrieval_recall@5"} <= keys["zeroshot_retrieval"]
    assert {"lp_acc1", "lp_acc5", "lp_mean_per_class_recall", "weight_decay"} <= keys["linear_probe"]
    assert report["suite_average"][1]["comparison"] is not None
    for name in ("results.md", "results.csv", "bars.png"):
        assert (out / name).stat().st_size > 0, name
    assert "| first | zeroshot_classification | acc1 |" in (out / "results.md").read_text()

    # A rerun reads every result back: nothing is evaluated, the same numbers come out.
    again = benchmark(root, models, suite, out)
    assert again.returncode == 0 and "0 (model, dataset) pairs evaluated" in again.stderr
    assert json.loads((out / "results.json").read_text()) == report

    # Interrupted after all but one (model, dataset): only that one runs, from cached features.
    (out / "raw" / next(p.name for p in (out / "raw").iterdir()) / "second.json").unlink()
    resumed = benchmark(root, models, suite, out)
    assert resumed.returncode == 0 and "1 (model, dataset) pairs evaluated" in resumed.stderr
    assert differences(json.loads((out / "results.json").read_text()), report) == []


def differences(a, b, path="") -> list[str]:
    """The paths where two JSON values differ (for a readable failure)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in differences(a.get(k), b.get(k), f"{path}/{k}")]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [
            d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in differences(x, y, f"{path}[{i}]")
        ]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


def test_bad_datasets_stop_before_any_model_runs(setup, tmp_path):
    root, models, _ = setup
    cases = {
        "hf-dataset:someone/wds_absent": "hf download --repo-type dataset someone/wds_absent",
        str(tmp_path / "missing"): "not found",
    }
    short = tmp_path / "short"
    shutil.copytree(root / "first", short)
    (short / "classnames.txt").write_text("one\ntwo\n")  # labels go up to 6
    cases[str(short)] = "fix the class names"
    for source, message in cases.items():
        suite = tmp_path / "suite.yaml"
        suite.write_text(
            f"datasets:\n  - {{name: ok, source: {root / 'first'}}}\n  - {{name: bad, source: '{source}'}}\n"
        )
        result = benchmark(root, models[:1], suite, tmp_path / "out")
        assert result.returncode == 2, result.stderr[-2000:]
        lines = [line for line in result.stderr.splitlines() if line.startswith("clipkit benchmark: error")]
        assert len(lines) == 1 and "bad" in lines[0] and message in lines[0], result.stderr[-2000:]
        assert not (tmp_path / "out" / "raw").exists()  # no model ran
