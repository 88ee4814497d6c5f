"""Tokenizers that travel with a model: `build_tokenizer` picks open_clip's choice for a model config,
and SentencePiece tokenizers trained on a dataset's captions, for text towers trained from scratch.

Token ids as in T5: <pad> = 0, </s> (end of text) = 1, <unk> = 2, no start token. A sequence is the caption's
pieces, then </s>, then padding to the context length; a caption too long keeps its first
context_length - 1 pieces and ends with </s>. This is what Hugging Face's T5Tokenizer produces from the
same model file, so `open_clip.get_tokenizer("local-dir:DIR")` (which loads a `hf_tokenizer_name`
model through transformers) gives the same ids. The text tower pools at </s> (text_cfg pool_type: eos).
"""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sentencepiece
import torch

from clipkit.errors import ClipkitError

if TYPE_CHECKING:
    from clipkit.models.sources import TokenizerSpec

MODEL_FILE = "spiece.model"  # the name Hugging Face's T5Tokenizer looks for
MARKER_FILE = "clipkit_tokenizer.json"  # says "this directory's tokenizer is clipkit's SentencePiece"
PAD_ID, EOS_ID, UNK_ID = 0, 1, 2  # T5's layout, which Hugging Face's T5 converter assumes


class SentencePieceTokenizer:
    """Callable like open_clip's tokenizers: list of texts -> (N, context_length) long tensor."""

    def __init__(self, model_path: str | Path, *, context_length: int = 77):
        path = Path(model_path)
        if path.is_dir():
            path = path / MODEL_FILE
        if not path.is_file():
            raise ClipkitError(
                f"SentencePiece tokenizer not found at {path}; train one with "
                "`clipkit tokenizer train --shards SPEC --vocab-size N --out DIR`"
            )
        self.model_path = path
        self.model_proto = path.read_bytes()
        self.processor = sentencepiece.SentencePieceProcessor(model_proto=self.model_proto)
        if self.processor.eos_id() != EOS_ID or self.processor.pad_id() != PAD_ID:
            raise ClipkitError(
                f"{path}: expected </s> = {EOS_ID} and <pad> = {PAD_ID} (a model from `clipkit tokenizer "
                f"train`), got {self.processor.eos_id()} and {self.processor.pad_id()}"
            )
        self.context_length = context_length
        self.vocab_size = self.processor.get_piece_size()
        self.eos_id = EOS_ID

    def __getstate__(self):  # the processor is a C++ object: rebuild it from the bytes in workers
        state = dict(self.__dict__)
        del state["processor"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.processor = sentencepiece.SentencePieceProcessor(model_proto=self.model_proto)

    def __call__(self, texts: str | list[str], context_length: int | None = None) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        length = context_length or self.context_length
        # Same cleaning as open_clip's HFTokenizer (whitespace only; case folding is in the model).
        pieces = self.processor.encode([re.sub(r"\s+", " ", t).strip() for t in texts])
        tokens = torch.full((len(texts), length), PAD_ID, dtype=torch.long)
        for row, ids in enumerate(pieces):
            ids = ids[: length - 1] + [EOS_ID]
            tokens[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return tokens

    def save_pretrained(self, directory: str | Path) -> None:
        """The model file plus the files that let Hugging Face (and so open_clip) load it as a T5Tokenizer."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / MODEL_FILE).write_bytes(self.model_proto)
        config = {
            "tokenizer_class": "T5Tokenizer",
            "extra_ids": 0,
            "eos_token": "</s>",
            "unk_token": "<unk>",
            "pad_token": "<pad>",
            "model_max_length": self.context_length,
            "legacy": True,
        }
        (directory / "tokenizer_config.json").write_text(
            json.dumps(config, indent=2) + "\n", encoding="utf-8"
        )
        special = {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
        (directory / "special_tokens_map.json").write_text(
            json.dumps(special, indent=2) + "\n", encoding="utf-8"
        )
        marker = {"type": "sentencepiece", "model": MODEL_FILE, "vocab_size": self.vocab_size}
        (directory / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")


def is_sentencepiece_dir(directory: str | Path) -> bool:
    return (Path(directory) / MARKER_FILE).is_file() and (Path(directory) / MODEL_FILE).is_file()


def train_sentencepiece(
    captions: Iterable[str],
    out_dir: str | Path,
    *,
    vocab_size: int,
    model_type: str = "unigram",
    lowercase: bool = True,
    character_coverage: float = 0.9995,
    context_length: int = 77,
) -> SentencePieceTokenizer:
    """Train on `captions` and save to `out_dir` (written under a temporary name, then renamed)."""
    if vocab_size < 8:
        raise ClipkitError(f"vocab size must be at least 8, got {vocab_size}")
    model = io.BytesIO()
    count = 0

    def sentences():
        nonlocal count
        for caption in captions:
            count += 1
            yield caption

    try:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=sentences(),
            model_writer=model,
            vocab_size=vocab_size,
            model_type=model_type,
            character_coverage=character_coverage,
            pad_id=PAD_ID,
            unk_id=UNK_ID,
            eos_id=EOS_ID,
            bos_id=-1,
            # nmt_nfkc_cf = NFKC normalisation + case folding (lowercase), as CLIP's tokenizer lowercases.
            normalization_rule_name="nmt_nfkc_cf" if lowercase else "nmt_nfkc",
            minloglevel=2,
        )
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        hint = " (try a smaller --vocab-size)" if "Vocabulary size" in first or "vocab_size" in first else ""
        raise ClipkitError(f"SentencePiece training on {count} captions failed: {first}{hint}") from None
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.with_name(f".{out_dir.name}.{os.getpid()}.tmp")
    staging.mkdir(exist_ok=True)
    (staging / MODEL_FILE).write_bytes(model.getvalue())
    tokenizer = SentencePieceTokenizer(staging / MODEL_FILE, context_length=context_length)
    tokenizer.save_pretrained(staging)
    if out_dir.exists():
        for path in staging.iterdir():
            os.replace(path, out_dir / path.name)
        staging.rmdir()
    else:
        os.replace(staging, out_dir)
    return SentencePieceTokenizer(out_dir, context_length=context_length)


def text_cfg_for_sentencepiece(text_cfg: dict, tokenizer: SentencePieceTokenizer, *, model_name: str) -> dict:
    """The text tower config a SentencePiece tokenizer needs: its vocabulary, pooling at </s>, and the
    `hf_tokenizer_name` that makes open_clip's `local-dir:` loader use the exported tokenizer files."""
    vocab_size = text_cfg.get("vocab_size")
    if vocab_size is not None and vocab_size != tokenizer.vocab_size:
        raise ClipkitError(
            f"model '{model_name}': text_cfg.vocab_size is {vocab_size} but the tokenizer {tokenizer.model_path} "
            f"has {tokenizer.vocab_size} pieces; set text_cfg.vocab_size: {tokenizer.vocab_size}"
        )
    pool_type = text_cfg.get("pool_type", "eos")
    if pool_type != "eos" or text_cfg.get("eos_id", EOS_ID) != EOS_ID:
        raise ClipkitError(
            f"model '{model_name}': a SentencePiece tokenizer ends texts with id {EOS_ID}, so the text tower must "
            f"pool there: set text_cfg.pool_type: eos and eos_id: {EOS_ID} (or leave both out)"
        )
    return {
        **text_cfg,
        "vocab_size": tokenizer.vocab_size,
        "pool_type": "eos",
        "eos_id": EOS_ID,
        "hf_tokenizer_name": text_cfg.get("hf_tokenizer_name") or "clipkit-sentencepiece",
    }


def build_tokenizer(model_cfg: Mapping[str, Any], spec: TokenizerSpec, *, model_name: str) -> Callable:
    """open_clip's choice of tokenizer, from the text config alone (never from the model's name):
    a clipkit SentencePiece model, the Hugging Face tokenizer the text config names (from the model's
    own directory when it has the files), else open_clip's CLIP BPE tokenizer."""
    import open_clip

    text_cfg = model_cfg["text_cfg"]
    context_length = text_cfg.get("context_length", 77)
    if spec.sentencepiece is not None:
        return SentencePieceTokenizer(spec.sentencepiece, context_length=context_length)
    hf_name = text_cfg.get("hf_tokenizer_name")
    if hf_name:
        source = spec.hf_dir or hf_name
        try:
            return open_clip.tokenizer.HFTokenizer(
                str(source),
                context_length=context_length,
                tokenizer_mode=text_cfg.get("tokenizer_mode"),
                **(text_cfg.get("tokenizer_kwargs") or {}),
            )
        except Exception as e:
            raise ClipkitError(
                f"model '{model_name}' tokenizes with the Hugging Face tokenizer '{source}', which could "
                f"not be loaded ({type(e).__name__}: {str(e).splitlines()[0][:160]}); install `transformers` "
                f"and fetch it once with network access (`hf download {hf_name}`)"
            ) from None
    return open_clip.SimpleTokenizer(
        context_length=context_length, **(text_cfg.get("tokenizer_kwargs") or {})
    )
