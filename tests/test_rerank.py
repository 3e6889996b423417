"""Stage-2 inference: raw-logit scoring, ordering, ties, fusion, batching across requests, MMR."""

from __future__ import annotations

import numpy as np
import pytest

from twostage.errors import ConfigError, InputError
from twostage.rerank import Candidate, Reranker, fuse, load_cross_encoder, mmr

REQUEST = "science fiction movie about space"
TEXTS = [
    "space war science fiction film",
    "a romance drama in the city",
    "children animation adventure",
    "cancer study patients treatment",
    "space night time sci fi thriller film war",
]


def _candidates(texts=TEXTS, scores=None) -> list[Candidate]:
    scores = scores if scores is not None else [1.0 - 0.1 * i for i in range(len(texts))]
    return [Candidate(f"i{i}", t, s) for i, (t, s) in enumerate(zip(texts, scores, strict=True))]


@pytest.fixture(scope="module")
def reranker(tiny_bert_path) -> Reranker:
    import torch

    rr = Reranker(tiny_bert_path, device="cpu", max_length=64, batch_size=4)
    # A random tiny BERT's pooled features barely depend on the input, so a fresh head gives logits within
    # float32 noise of each other. Point the head along the features' main direction of variation (centred,
    # unit spread) so the logits differ clearly, as a trained head's would.
    feats: list[torch.Tensor] = []
    head = rr.model.model.classifier
    hook = head.register_forward_hook(lambda _m, inp, _out: feats.append(inp[0].detach()))
    rr.score([(q, t) for q in (REQUEST, "cell protein gene study", "love story") for t in TEXTS])
    hook.remove()
    h = torch.cat(feats).double()
    centred = h - h.mean(0)
    direction = torch.linalg.svd(centred, full_matrices=False).Vh[0]
    spread = (centred @ direction).std()
    with torch.no_grad():
        head.weight.copy_((direction / spread).float().unsqueeze(0))
        head.bias.fill_(float(-(h.mean(0) @ direction) / spread))
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


def test_rerank_orders_by_reranker_score(reranker):
    cands = _candidates()
    scores = reranker.score([(REQUEST, c.text) for c in cands])
    hits = reranker.rerank(REQUEST, cands, k=3)
    expected = [cands[i].item_id for i in np.argsort(-scores, kind="stable")[:3]]
    assert [h.item_id for h in hits] == expected
    assert [h.rank for h in hits] == [1, 2, 3]
    for h in hits:
        i = int(h.item_id[1:])
        assert h.score == pytest.approx(float(scores[i]), abs=1e-5)  # w=0: the raw logit
        assert h.rerank_score == h.score
        assert h.stage1_rank == i + 1 and h.stage1_score == cands[i].stage1_score
    assert len(reranker.rerank(REQUEST, cands, k=50)) == len(cands)


def test_ties_break_by_stage1_rank_then_item_id(tiny_bert_path):
    reranker = Reranker(tiny_bert_path, device="cpu", max_length=64)
    # Identical texts get the same logit up to float32 batch noise, which fuse() treats as a tie;
    # stage-1 scores decide, then item_id.
    same = "space war science fiction film"
    cands = [Candidate("b", same, 0.2), Candidate("a", same, 0.9), Candidate("c", same, 0.5)]
    assert [h.item_id for h in reranker.rerank(REQUEST, cands, k=3)] == ["a", "c", "b"]
    cands = [Candidate("z", same, 0.5), Candidate("y", same, 0.5), Candidate("x", same, 0.1)]
    hits = reranker.rerank(REQUEST, cands, k=3)
    assert [h.item_id for h in hits] == ["y", "z", "x"]  # y and z share stage-1 rank 1: item_id decides
    assert [h.stage1_rank for h in hits] == [1, 1, 3]
    # The result does not depend on the order the candidates arrive in.
    again = reranker.rerank(REQUEST, cands[::-1], k=3)
    assert [(h.item_id, h.rank, h.stage1_rank) for h in again] == [
        (h.item_id, h.rank, h.stage1_rank) for h in hits
    ]
    hits = fuse([Candidate("q", "", 1.0), Candidate("p", "", 1.0)], np.zeros(2), k=2)
    assert [h.item_id for h in hits] == ["p", "q"]


def test_fusion_weight_zero_is_reranker_one_is_stage1(reranker):
    cands = _candidates(scores=[0.1, 0.5, 0.3, 0.9, 0.7])
    scores = reranker.score([(REQUEST, c.text) for c in cands])
    pure = reranker.rerank(REQUEST, cands, k=5, fusion_weight=0.0)
    assert [h.item_id for h in pure] == [cands[i].item_id for i in np.argsort(-scores, kind="stable")]
    stage1 = reranker.rerank(REQUEST, cands, k=5, fusion_weight=1.0)
    assert [h.item_id for h in stage1] == ["i3", "i4", "i1", "i2", "i0"]
    assert [h.score for h in stage1] == [0.9, 0.7, 0.5, 0.3, 0.1]


def test_fused_score_is_weighted_sum_of_zscores():
    cands = [Candidate("a", "", 3.0), Candidate("b", "", 2.0), Candidate("c", "", 1.0)]
    rerank = np.array([0.0, 0.0, 3.0])
    hits = fuse(cands, rerank, k=3, fusion_weight=0.5)
    # z(rerank) = [-1/sqrt2, -1/sqrt2, sqrt2]; z(stage1) = [sqrt(1.5), 0, -sqrt(1.5)]
    z_r = np.array([-(2**-0.5), -(2**-0.5), 2**0.5])
    z_s = np.array([1.5**0.5, 0.0, -(1.5**0.5)])
    expected = 0.5 * z_r + 0.5 * z_s
    got = {h.item_id: h.score for h in hits}
    for i, item in enumerate("abc"):
        assert got[item] == pytest.approx(expected[i], abs=1e-9)
    assert [h.item_id for h in hits] == ["a", "c", "b"]


def test_cowatch_score_is_fused_as_a_zscore_and_stage1_alone_reads_no_rerank_scores():
    cands = [Candidate("a", "", 3.0, 0), Candidate("b", "", 2.0, 2), Candidate("c", "", 1.0, 1)]
    z_r = np.array([-(2**-0.5), -(2**-0.5), 2**0.5])  # z([0, 0, 3])
    z_s = np.array([1.5**0.5, 0.0, -(1.5**0.5)])  # z([3, 2, 1])
    z_c = np.array([-(1.5**0.5), 1.5**0.5, 0.0])  # z([0, 2, 1])
    hits = fuse(cands, np.array([0.0, 0.0, 3.0]), k=3, fusion_weight=0.5, cowatch_weight=2.0)
    expected = dict(zip("abc", 0.5 * z_r + 0.5 * z_s + 2.0 * z_c, strict=True))
    assert {h.item_id: h.score for h in hits} == pytest.approx(expected, abs=1e-9)
    assert [h.item_id for h in hits] == ["b", "c", "a"]
    assert {h.item_id: h.cowatch for h in hits} == {"a": 0.0, "b": 2.0, "c": 1.0}
    # w = 1: stage 1 and co-watch only; the cross-encoder's scores are not read (NaN when it did not run)
    alone = fuse(cands, np.full(3, np.nan), k=3, fusion_weight=1.0, cowatch_weight=1.0)
    assert {h.item_id: h.score for h in alone} == pytest.approx(dict(zip("abc", z_s + z_c, strict=True)))
    assert [h.item_id for h in alone] == ["b", "a", "c"]
    # c = 0 is the plain fusion, whatever the co-watch scores
    plain = fuse(cands, np.array([0.0, 0.0, 3.0]), k=3, fusion_weight=0.5)
    assert [h.item_id for h in plain] == ["a", "c", "b"]
    with pytest.raises(ConfigError, match="cowatch_weight"):
        fuse(cands, np.zeros(3), k=3, cowatch_weight=-1.0)


def test_rerank_batch_equals_per_request(reranker):
    requests = [
        (REQUEST, _candidates()),
        ("cell protein gene study", _candidates(TEXTS[::-1], scores=[0.3, 0.2, 0.9, 0.4, 0.1])),
        ("love story", _candidates(TEXTS[:2])),
    ]
    batched = reranker.rerank_batch(requests, k=4, fusion_weight=0.3)
    assert len(batched) == len(requests)
    for (text, cands), hits in zip(requests, batched, strict=True):
        single = reranker.rerank(text, cands, k=4, fusion_weight=0.3)
        assert [h.item_id for h in hits] == [h.item_id for h in single]
        np.testing.assert_allclose([h.score for h in hits], [h.score for h in single], atol=1e-4)


def test_bad_arguments_raise(reranker):
    cands = _candidates()
    with pytest.raises(ConfigError, match="fusion_weight"):
        reranker.rerank(REQUEST, cands, k=3, fusion_weight=1.5)
    with pytest.raises(ConfigError, match="k must be"):
        reranker.rerank(REQUEST, cands, k=0)
    with pytest.raises(InputError, match="appears twice"):
        reranker.rerank(REQUEST, [*cands, cands[0]], k=3)
    assert reranker.rerank(REQUEST, [], k=3) == []


def test_missing_model_raises_not_found(tmp_path):
    from twostage.errors import NotFoundError

    with pytest.raises(NotFoundError, match="not found"):
        load_cross_encoder(str(tmp_path / "no-such-model"))


def test_mmr_lambda_one_is_relevance_order():
    rng = np.random.default_rng(0)
    vecs = rng.normal(size=(8, 4)).astype(np.float32)
    rel = rng.normal(size=8)
    assert mmr(vecs, rel, k=8, lam=1.0) == list(np.argsort(-rel))
    assert mmr(vecs, rel, k=3, lam=1.0) == list(np.argsort(-rel)[:3])


def test_mmr_small_lambda_skips_near_duplicate():
    # Items 0 and 1 are near-duplicates; item 2 is orthogonal but less relevant.
    vecs = np.array([[1.0, 0.0], [0.99, 0.01], [0.0, 1.0]], dtype=np.float32)
    rel = np.array([1.0, 0.95, 0.5])
    # Normalised relevance is [1, 0.9, 0]. After picking 0, item 1 gains 0.3*0.9 - 0.7*cos(0,1) ≈ -0.43,
    # item 2 gains 0.3*0 - 0.7*0 = 0, so item 2 comes next.
    assert mmr(vecs, rel, k=3, lam=0.3) == [0, 2, 1]
    # With lam = 0.7: item 1 gains 0.63 - 0.3*0.99995 ≈ 0.33 > 0, relevance wins.
    assert mmr(vecs, rel, k=3, lam=0.7) == [0, 1, 2]
    assert mmr(vecs, rel, k=2, lam=0.0) == [0, 2]


def test_mmr_rejects_bad_input():
    with pytest.raises(InputError):
        mmr(np.zeros((3, 2)), np.zeros(2), k=2, lam=0.5)
    with pytest.raises(ConfigError):
        mmr(np.zeros((3, 2)), np.zeros(3), k=2, lam=1.5)


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
