"""`clipkit` entry point: dispatches to one module per subcommand.

Command modules keep heavy imports (torch, open_clip) inside `run`, so `clipkit --help` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from clipkit import __version__
from clipkit.errors import ClipkitError

# name -> (module, one-line help). Listed here, not discovered, so the command set is explicit.
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("clipkit.cli.train", "train a model (Hydra overrides; same as python -m clipkit.train)"),
    "export": (
        "clipkit.cli.export",
        "write a model in open_clip's local-dir layout or as a transformers model",
    ),
    "shards": ("clipkit.cli.shards", "write webdataset shards from images, or a demo dataset"),
    "tokenizer": ("clipkit.cli.tokenizer", "train a SentencePiece tokenizer on shard captions"),
    "zeroshot": ("clipkit.cli.zeroshot", "zero-shot classification / retrieval metrics on a dataset"),
    "benchmark": (
        "clipkit.cli.benchmark",
        "a suite of datasets x models: zero-shot, retrieval, linear probes, with intervals",
    ),
    "classify": ("clipkit.cli.classify", "zero-shot classify images against labels you name"),
    "index": ("clipkit.cli.index", "build a text-to-image search index, or add images to one"),
    "embed": (
        "clipkit.cli.embed",
        "embed a collection into clip-retrieval's layout (also under accelerate launch)",
    ),
    "score": (
        "clipkit.cli.score",
        "score a collection for curation: embeddings, CLIP score, caption length, image size",
    ),
    "filter": ("clipkit.cli.filter", "keep a scored collection's best samples: a key list or new shards"),
    "serve": ("clipkit.cli.serve", "serve a search index over HTTP (API, search page, metrics)"),
    "merge": ("clipkit.cli.merge", "interpolate two models in weight space (WiSE-FT)"),
    "runs": ("clipkit.cli.runs", "compare training runs: the settings that differ and the final metrics"),
}


class _HelpFormatter(argparse.HelpFormatter):
    """argparse sizes the help column from the command names without their indent, so a name longer than
    the rest (`tokenizer`) would wrap onto a line of its own; count the indent."""

    def add_argument(self, action: argparse.Action) -> None:
        super().add_argument(action)
        if isinstance(action.choices, dict):  # the subcommands
            longest = max((len(name) for name in action.choices), default=0)
            indent = self._current_indent + 2 * self._indent_increment
            self._action_max_length = max(self._action_max_length, longest + indent)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clipkit",
        formatter_class=_HelpFormatter,
        description="Train, evaluate, export and serve CLIP / SigLIP models built on open_clip.",
    )
    parser.add_argument("--version", action="version", version=f"clipkit {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        sub = subparsers.add_parser(name, help=help_text, description=(module.__doc__ or help_text).strip())
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:
        # Every argument after `train` is Hydra's (-m, --cfg job, --help, overrides), as for python -m clipkit.train.
        from clipkit.cli.train import run_hydra

        return run_hydra(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return args.run(args) or 0
    except ClipkitError as e:
        print(f"clipkit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"clipkit {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
