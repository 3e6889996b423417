"""Stage 2's ordering rules without a model: fusion of z-scored signals, tie-breaking, MMR."""

from __future__ import annotations

import numpy as np
import pytest

from twostage.errors import ConfigError, InputError
from twostage.ranker import Candidate, fuse, mmr


def _candidates(scores=(1.0, 0.9, 0.8, 0.7, 0.6)) -> list[Candidate]:
    return [Candidate(f"i{i}", s) for i, s in enumerate(scores)]


def test_fusion_weight_zero_orders_by_the_rerank_score_and_keeps_what_each_stage_said():
    cands = _candidates()
    rerank = np.array([0.2, 1.5, -0.3, 0.9, 0.0])
    hits = fuse(cands, rerank, k=3)
    assert [h.item_id for h in hits] == ["i1", "i3", "i0"]
    assert [h.rank for h in hits] == [1, 2, 3]
    for h in hits:
        i = int(h.item_id[1:])
        assert h.score == rerank[i] == h.rerank_score  # w = 0: the raw logit
        assert h.stage1_rank == i + 1 and h.stage1_score == cands[i].stage1_score
    assert len(fuse(cands, rerank, k=50)) == len(cands)


def test_fusion_weight_one_is_the_stage1_order_in_its_own_units():
    cands = _candidates(scores=(0.1, 0.5, 0.3, 0.9, 0.7))
    stage1 = fuse(cands, np.full(5, np.nan), k=5, fusion_weight=1.0)
    assert [h.item_id for h in stage1] == ["i3", "i4", "i1", "i2", "i0"]
    assert [h.score for h in stage1] == [0.9, 0.7, 0.5, 0.3, 0.1]


def test_ties_break_by_stage1_rank_then_item_id_whatever_the_input_order():
    # rerank scores equal to TIE_DECIMALS decimals (float32 batch noise) are ties: stage-1 rank decides
    cands = [Candidate("b", 0.2), Candidate("a", 0.9), Candidate("c", 0.5)]
    noisy = np.array([1.0, 1.0 + 1e-7, 1.0 - 1e-7])
    assert [h.item_id for h in fuse(cands, noisy, k=3)] == ["a", "c", "b"]
    cands = [Candidate("z", 0.5), Candidate("y", 0.5), Candidate("x", 0.1)]
    hits = fuse(cands, np.ones(3), k=3)
    assert [h.item_id for h in hits] == ["y", "z", "x"]  # y and z share stage-1 rank 1: item_id decides
    assert [h.stage1_rank for h in hits] == [1, 1, 3]
    again = fuse(cands[::-1], np.ones(3), k=3)
    assert [(h.item_id, h.rank, h.stage1_rank) for h in again] == [
        (h.item_id, h.rank, h.stage1_rank) for h in hits
    ]


def test_fused_score_is_weighted_sum_of_zscores():
    cands = [Candidate("a", 3.0), Candidate("b", 2.0), Candidate("c", 1.0)]
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
    cands = [Candidate("a", 3.0, 0), Candidate("b", 2.0, 2), Candidate("c", 1.0, 1)]
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


def test_bad_arguments_raise():
    cands = _candidates()
    with pytest.raises(ConfigError, match="fusion_weight"):
        fuse(cands, np.zeros(5), k=3, fusion_weight=1.5)
    with pytest.raises(ConfigError, match="k must be"):
        fuse(cands, np.zeros(5), k=0)
    with pytest.raises(InputError, match="appears twice"):
        fuse([*cands, cands[0]], np.zeros(6), k=3)
    with pytest.raises(InputError, match="6 rerank scores for 5"):
        fuse(cands, np.zeros(6), k=3)
    assert fuse([], np.zeros(0), k=3) == []


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
