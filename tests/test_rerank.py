"""Stage 2's model: raw-logit scoring of (request, item) pairs, in input order, from many threads."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import sharpened_reranker

from twostage.rerank import Reranker, load_cross_encoder

REQUEST = "science fiction movie about space"
TEXTS = [
    "space war science fiction film",
    "a romance drama in the city",
    "children animation adventure",
    "cancer study patients treatment",
    "space night time sci fi thriller film war",
]


@pytest.fixture(scope="module")
def reranker(tiny_bert_path) -> Reranker:
    rr = sharpened_reranker(tiny_bert_path, [REQUEST, "cell protein gene study", "love story", *TEXTS])
    scores = rr.score([(REQUEST, t) for t in TEXTS])
    assert np.diff(np.sort(scores)).min() > 1e-3
    return rr


def test_scores_are_raw_logits_not_sigmoid(tiny_bert_path):
    import torch

    rr = Reranker(tiny_bert_path, device="cpu", max_length=64)
    assert rr.fresh_head
    assert isinstance(rr.model.activation_fn, torch.nn.Identity)
    with torch.no_grad():
        rr.model.model.classifier.bias.fill_(-3.0)  # logits far below 0: a sigmoid would map them into (0, 1)
    pairs = [(REQUEST, t) for t in TEXTS]
    scores = rr.score(pairs)
    assert scores.dtype == np.float32 and scores.shape == (len(TEXTS),) and scores.flags.c_contiguous
    assert (scores < -2.0).all()
    # The same logits through the model's own forward pass, one pair at a time (no padding).
    rr.model.eval()
    with torch.no_grad():
        direct = [float(rr.model(rr.model.preprocess([list(p)]))["scores"].view(-1)[0]) for p in pairs]
    np.testing.assert_allclose(scores, direct, rtol=1e-4, atol=1e-4)


def test_score_empty_returns_empty_float32(reranker):
    out = reranker.score([])
    assert out.shape == (0,) and out.dtype == np.float32


def test_scores_are_in_input_order_and_batching_does_not_change_them(reranker):
    pairs = [(q, t) for q in (REQUEST, "love story") for t in TEXTS]
    together = reranker.score(pairs)
    alone = np.concatenate([reranker.score([p]) for p in pairs])
    np.testing.assert_allclose(together, alone, atol=1e-4)
    assert np.diff(np.sort(together[: len(TEXTS)])).min() > 1e-3  # the sharpened head tells texts apart


def test_threads_share_one_reranker(reranker):
    from concurrent.futures import ThreadPoolExecutor

    pairs = [(REQUEST, t) for t in TEXTS]
    expected = reranker.score(pairs)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: reranker.score(pairs), range(12)))
    for got in results:
        np.testing.assert_allclose(got, expected, atol=1e-5)


def test_missing_model_raises_not_found(tmp_path):
    from twostage.errors import NotFoundError

    with pytest.raises(NotFoundError, match="not found"):
        load_cross_encoder(str(tmp_path / "no-such-model"))


@pytest.mark.slow
def test_default_reranker_loads_offline_minilm_and_scores():
    rr = Reranker(device="cpu")
    assert rr.fresh_head and rr.name_or_path == "default"
    scores = rr.score(
        [
            ("How many people live in Berlin?", "Berlin had a population of 3,520,031 in 2019."),
            ("How many people live in Berlin?", "Berlin is well known for its museums."),
        ]
    )
    assert scores.shape == (2,) and scores.dtype == np.float32 and np.isfinite(scores).all()
