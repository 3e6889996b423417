"""Shared fixtures: a tiny random BERT (saved once per session) and small data files."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ray's local test cluster listens on loopback only (read when ray is imported; see twostage.scale._ray)
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

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


def write(tmp_path: Path, name: str, text: str | bytes) -> Path:
    """Write a test file (text as UTF-8, or bytes as they are) and return its path."""
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


GENRES = ["Action", "Comedy", "Drama", "Horror", "Romance"]


def make_movielens(root: Path, *, n_items: int = 40, n_users: int = 24, seed: int = 0) -> Path:
    """A small MovieLens-layout folder where each user sticks to one genre (so there is signal to learn)."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    lines = ["movieId,title,genres"]
    by_genre: dict[str, list[int]] = {g: [] for g in GENRES}
    for i in range(1, n_items + 1):
        genre = GENRES[i % len(GENRES)]
        by_genre[genre].append(i)
        lines.append(f"{i},{genre.lower()} film {i} ({1990 + i % 20}),{genre}")
    (root / "movies.csv").write_text("\n".join(lines) + "\n")
    ratings = ["userId,movieId,rating,timestamp"]
    for u in range(1, n_users + 1):
        genre = GENRES[u % len(GENRES)]
        items = rng.sample(by_genre[genre], 6)
        for t, i in enumerate(items):
            ratings.append(f"{u},{i},{rng.choice([3.0, 4.0, 5.0])},{1_000_000 + u * 100 + t}")
    (root / "ratings.csv").write_text("\n".join(ratings) + "\n")
    return root


def sharpened_reranker(tiny_bert_path: Path, texts: list[str]):
    """The tiny BERT as a cross-encoder whose logits clearly differ between ``texts``.

    A random tiny BERT's pooled features barely depend on the input, so a fresh head gives logits within
    float32 noise of each other. The head is pointed along the features' main direction of variation
    (centred, unit spread), as a trained head's would be, so rankings do not hinge on rounding noise.
    """
    import torch

    from twostage.rerank import Reranker

    torch.manual_seed(0)
    rr = Reranker(tiny_bert_path, device="cpu", max_length=64, batch_size=4)
    feats: list[torch.Tensor] = []
    head = rr.model.model.classifier
    hook = head.register_forward_hook(lambda _m, inp, _out: feats.append(inp[0].detach()))
    rr.score([(q, t) for q in texts[:3] for t in texts])
    hook.remove()
    h = torch.cat(feats).double()
    centred = h - h.mean(0)
    direction = torch.linalg.svd(centred, full_matrices=False).Vh[0]
    spread = (centred @ direction).std()
    with torch.no_grad():
        head.weight.copy_((direction / spread).float().unsqueeze(0))
        head.bias.fill_(float(-(h.mean(0) @ direction) / spread))
    return rr


SERVED_CONFIG = """
[retriever]
model = "{model}"
max_seq_length = 48
popularity_weight = 0.05
[reranker]
max_length = 64
depth = 12
mmr_depth = 25
cowatch_weight = 0.5
cowatched_size = 4
[index]
depth = 20
[eval]
ks = [1, 5, 10, 30]
bootstrap = 100
"""


def make_served_project(root: Path, tiny_bert_path: Path, extra_config: str = "") -> Path:
    """A project with the tiny BERT as both models (the reranker's head sharpened, saved as the project's),
    the popularity prior and co-watch scores on, evaluation and MMR deeper than stage 1, and a built index."""
    from twostage import Engine

    project = root / "project"
    Engine.init(project)
    (project / "twostage.toml").write_text(SERVED_CONFIG.format(model=tiny_bert_path) + extra_config)
    engine = Engine.open(project)
    engine.datasets_load("movielens", make_movielens(root / "data"))
    engine.split()
    engine.index_build()
    texts = list(engine.project.catalogue().texts.values())
    rr = sharpened_reranker(tiny_bert_path, ["Recently: drama film 3", "comedy film", *texts])
    rr.model.save_pretrained(str(project / "models" / "reranker"))
    engine.close()
    return project
