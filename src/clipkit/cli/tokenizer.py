"""Train a SentencePiece tokenizer on the captions of webdataset shards.

`clipkit tokenizer train --shards SPEC --vocab-size N --out DIR` writes DIR/spiece.model (+ the files that
let open_clip / Hugging Face load it). Name DIR as `tokenizer:` in a model config to use it.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    train = actions.add_parser("train", help="train a SentencePiece model on shard captions")
    train.add_argument(
        "--shards", required=True, help="shard spec: brace ranges, '::' between sources, or a dir"
    )
    train.add_argument(
        "--vocab-size", type=int, required=True, help="number of pieces, special tokens included"
    )
    train.add_argument("--out", required=True, help="directory to write")
    train.add_argument(
        "--max-captions", type=int, default=2_000_000, help="read at most this many (default 2M)"
    )
    train.add_argument("--model-type", choices=["unigram", "bpe"], default="unigram", help="default: unigram")
    train.add_argument(
        "--lowercase", action=argparse.BooleanOptionalAction, default=True, help="fold case (default: yes)"
    )


def run(args: argparse.Namespace) -> int:
    from clipkit.data.shards import iter_captions
    from clipkit.models.tokenizer import train_sentencepiece

    captions = iter_captions(args.shards, limit=args.max_captions)
    tokenizer = train_sentencepiece(
        captions, args.out, vocab_size=args.vocab_size, model_type=args.model_type, lowercase=args.lowercase
    )
    print(
        f"wrote a {tokenizer.vocab_size}-piece SentencePiece tokenizer to {args.out}; "
        f"use it with `tokenizer: {args.out}` and text_cfg.vocab_size: {tokenizer.vocab_size} in a model config"
    )
    return 0
