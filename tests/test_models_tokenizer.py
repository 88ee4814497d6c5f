"""SentencePiece tokenizers: trained from shard captions, named by a model config, carried by export."""

from __future__ import annotations

import open_clip
import pytest
import sentencepiece
import torch
import yaml

from clipkit.cli.main import main as clipkit_main
from clipkit.configs import config_dir
from clipkit.data.synthetic import write_synthetic_dataset
from clipkit.errors import ClipkitError
from clipkit.models import build_model, export_model
from clipkit.models.tokenizer import EOS_ID, PAD_ID, SentencePieceTokenizer, train_sentencepiece

TEXTS = ["a small red circle in the top left.", "A LARGE  Blue\tsquare", "a purple cross " * 20, "é ✓", ""]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    write_synthetic_dataset(root / "shapes", train_samples=400, test_samples=1)
    code = clipkit_main(["tokenizer", "train", "--shards", str(root / "shapes" / "train"), "--vocab-size", "40",
                         "--out", str(root / "tok")])  # fmt: skip
    assert code == 0
    return root / "tok"


def test_tokens_are_pieces_then_end_then_padding(tokenizer_dir):
    tokenizer = SentencePieceTokenizer(tokenizer_dir, context_length=12)
    processor = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer_dir / "spiece.model"))
    assert tokenizer.vocab_size == processor.get_piece_size() == 40
    tokens = tokenizer(TEXTS)
    assert tokens.shape == (5, 12) and tokens.dtype == torch.long
    for text, row in zip(TEXTS, tokens.tolist(), strict=True):
        pieces = processor.encode(" ".join(text.split()))[:11]
        assert row == pieces + [EOS_ID] + [PAD_ID] * (11 - len(pieces))
    assert tokens[2, -1] == EOS_ID  # a long caption is cut and still ends with </s>
    assert torch.equal(tokenizer(["a red circle"]), tokenizer(["A RED CIRCLE"]))  # case folded by default


def tiny_config_with(tokenizer_dir) -> dict:
    values = yaml.safe_load((config_dir() / "model" / "tiny.yaml").read_text())
    values["text_cfg"].pop("vocab_size")
    values["tokenizer"] = str(tokenizer_dir)
    return values


def test_a_model_config_names_it_and_export_carries_it(tokenizer_dir, tmp_path):
    bundle = build_model(tiny_config_with(tokenizer_dir))
    text_cfg = bundle.model_cfg["text_cfg"]
    assert (text_cfg["vocab_size"], text_cfg["pool_type"], text_cfg["eos_id"]) == (40, "eos", EOS_ID)
    assert isinstance(bundle.tokenizer, SentencePieceTokenizer) and bundle.tokenizer.context_length == 16
    export_model(bundle, tmp_path / "exported")
    tokens = bundle.tokenizer(TEXTS)

    reloaded = build_model(tmp_path / "exported")  # clipkit: sentencepiece alone
    assert torch.equal(reloaded.tokenizer(TEXTS), tokens)
    with torch.no_grad():
        expected = bundle.model.encode_text(tokens)
        assert torch.allclose(reloaded.model.encode_text(tokens), expected, atol=1e-6)
        model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'exported'}")
        assert torch.allclose(model.encode_text(tokens), expected, atol=1e-6)
    # Pooling happens at </s>: what follows it does not change the text embedding.
    noisy = tokens.clone()
    noisy[0, (tokens[0] == EOS_ID).nonzero()[0, 0] + 1 :] = 7
    with torch.no_grad():
        assert torch.allclose(bundle.model.encode_text(noisy)[0], expected[0], atol=1e-5)


def test_open_clip_tokenizer_matches_when_transformers_is_installed(tokenizer_dir, tmp_path):
    pytest.importorskip("transformers")  # open_clip loads `hf_tokenizer_name` tokenizers through it
    bundle = build_model(tiny_config_with(tokenizer_dir))
    export_model(bundle, tmp_path / "exported")
    open_clip_tokenizer = open_clip.get_tokenizer(f"local-dir:{tmp_path / 'exported'}")
    assert torch.equal(open_clip_tokenizer(TEXTS), bundle.tokenizer(TEXTS))


def test_config_mismatches_are_explained(tokenizer_dir):
    values = tiny_config_with(tokenizer_dir)
    values["text_cfg"]["vocab_size"] = 49408
    with pytest.raises(ClipkitError, match="text_cfg.vocab_size is 49408 but the tokenizer .* has 40 pieces"):
        build_model(values)
    values["text_cfg"]["vocab_size"] = 40
    values["text_cfg"]["pool_type"] = "argmax"
    with pytest.raises(ClipkitError, match="set text_cfg.pool_type: eos"):
        build_model(values)
    with pytest.raises(ClipkitError, match="SentencePiece tokenizer not found"):
        build_model({**values, "tokenizer": str(tokenizer_dir / "nope")})
    with pytest.raises(ClipkitError, match="Please set it to a value <= .*try a smaller --vocab-size"):
        train_sentencepiece(["a b c", "a b"], tokenizer_dir.parent / "too-big", vocab_size=500)
