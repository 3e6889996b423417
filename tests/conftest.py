"""Shared fixtures: a tiny random BERT (saved once per session) and small data files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

_WORDS = (
    "the a of and to in is for on with movie film drama comedy action thriller romance horror science "
    "cell protein gene cancer study patients effect risk increase decrease treatment disease brain blood "
    "recently liked heat casino toy story war love space night day man woman life world time city "
    "genres children animation adventure fantasy crime mystery sci fi documentary western musical"
).split()


@pytest.fixture(scope="session")
def tiny_bert_path(tmp_path_factory) -> Path:
    """A randomly initialised 2-layer BERT with a small WordPiece vocab, saved as a sentence-transformers dir.

    The same directory loads as ``SentenceTransformer(path)`` (mean pooling) and as
    ``CrossEncoder(path, num_labels=1)`` (fresh classification head), like the real default model.
    """
    import torch
    from sentence_transformers import SentenceTransformer, models
    from transformers import BertConfig, BertModel, BertTokenizerFast

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("tiny-bert")
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    letters = list("abcdefghijklmnopqrstuvwxyz0123456789.,:()-'")
    vocab = specials + sorted(set(_WORDS)) + letters + [f"##{c}" for c in letters]
    (root / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    tokenizer = BertTokenizerFast(vocab=str(root / "vocab.txt"), do_lower_case=True)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=128,
    )
    bert_dir = root / "bert"
    BertModel(config).save_pretrained(bert_dir)
    tokenizer.save_pretrained(bert_dir)
    transformer = models.Transformer(str(bert_dir), max_seq_length=64)
    pooling = models.Pooling(transformer.get_embedding_dimension(), pooling_mode="mean")
    st_dir = root / "st"
    SentenceTransformer(modules=[transformer, pooling], device="cpu").save(str(st_dir))
    return st_dir
