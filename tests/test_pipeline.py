"""The one ranking path with deterministic fake models: every stage's rule, and that a top k never depends on k."""

from __future__ import annotations

import math

import numpy as np
import pytest
from fakes import FakeReranker, Forbidden, movie_titles, pipeline, words

from twostage.errors import ConfigError, TwostageError
from twostage.pipeline import LogCounts, Settings
from twostage.ranker import mmr
from twostage.requests import Request

ITEMS = movie_titles()
QUERIES = [
    Request("q1", "space robot night"),
    Request("q2", "love story in the city"),
    Request("q3", "war horse saga"),
]


def test_recall_is_the_index_order_and_respects_exclusions():
    pipe = pipeline(ITEMS, recall_depth=20)
    request = Request("q", "space robot night", exclude=frozenset({"m0", "m1"}))
    (ranking,) = pipe.rank([request], 10, stage="recall")
    vecs = pipe.encoder.encode([request.text])
    expected = [i for i, _ in pipe.index.search(vecs, 10, exclude=[request.exclude])[0]]
    assert ranking.item_ids() == expected and not {"m0", "m1"} & set(expected)
    assert all(h.stage == "recall" and h.rerank_score is None for h in ranking.hits)
    assert [h.rank for h in ranking.hits] == list(range(1, 11))


def test_stage_two_reorders_the_head_by_the_cross_encoder_and_keeps_the_tail():
    reranker = FakeReranker()
    pipe = pipeline(ITEMS, reranker=reranker, recall_depth=30, rerank_depth=8)
    request = QUERIES[1]
    stage1 = pipe.rank([request], 30, stage="recall")[0].item_ids()
    ranking = pipe.rank([request], 30)[0]
    head, tail = ranking.hits[:8], ranking.hits[8:]
    scores = reranker.score([(request.text, pipe.rerank_text(i)) for i in stage1[:8]])
    expected_head = [stage1[j] for j in np.argsort(-scores, kind="stable")]
    assert [h.item_id for h in head] == expected_head
    assert [h.item_id for h in tail] == stage1[8:]  # below the rerank depth: stage-1 order
    assert {h.stage for h in head} == {"rerank"} and {h.stage for h in tail} == {"recall"}
    assert all(h.rerank_score is not None for h in head)
    assert [h.score for h in ranking.hits] == sorted((h.score for h in ranking.hits), reverse=True)


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"mmr_lambda": 0.5},
        {"fusion_weight": 0.5, "mmr_lambda": 0.3},
        # pools deeper than the candidates: what k asks for must not widen them
        {"recall_depth": 12, "rerank_depth": 20, "mmr_depth": 30, "mmr_lambda": 0.5},
        {"recall_depth": 8, "popularity_weight": 0.3, "popularity_pool": 30, "popularity_pool_factor": 2},
    ],
)
def test_a_top_k_is_the_head_of_every_longer_ranking(settings):
    """Up to the deepest list stage 1 searches anyway (the popularity pool, with the prior on)."""
    popularity = {f"m{i}": float(i % 7) for i in range(60)}
    pipe = pipeline(
        ITEMS,
        reranker=FakeReranker(),
        counts=LogCounts(popularity=popularity),
        **{"recall_depth": 40, "rerank_depth": 10, "mmr_depth": 25, **settings},
    )
    deepest = 30 if "popularity_weight" in settings else 50
    for request in QUERIES:
        full = pipe.rank([request], deepest)[0]
        assert len(full.hits) == deepest
        for k in (1, 5, 8, 10, 12, 30):
            assert pipe.rank([request], k)[0].hits == full.hits[:k], k


def test_a_batch_ranks_each_request_as_alone():
    pipe = pipeline(ITEMS, reranker=FakeReranker(), recall_depth=20, rerank_depth=10, mmr_lambda=0.7)
    together = pipe.rank(QUERIES, 10, explain=True)
    alone = [pipe.rank([r], 10, explain=True)[0] for r in QUERIES]
    assert together == alone


def test_fusion_weight_one_never_runs_the_cross_encoder():
    pipe = pipeline(ITEMS, reranker=Forbidden(), recall_depth=20, fusion_weight=1.0)
    served = pipe.rank(QUERIES, 10)
    assert [r.item_ids() for r in served] == [r.item_ids() for r in pipe.rank(QUERIES, 10, stage="recall")]
    assert all(h.stage == "recall" for r in served for h in r.hits)  # stage 2 could not change anything


def test_cowatch_scores_reorder_stage_one_without_the_cross_encoder():
    plain = pipeline(ITEMS, recall_depth=30)
    user = plain.user_request("u", ["m0", "m1", "m2"])
    stage1 = plain.rank([user], 30, stage="recall")[0]
    low = stage1.item_ids()
    lists = {
        low[20]: ["m0", "m1"],
        low[25]: ["m0"],
        low[29]: ["m1", "m2", "m9"],
    }  # co-watched with the history
    pipe = plain.replace(reranker=Forbidden(), counts=LogCounts(cowatched=lists)).with_settings(
        rerank_depth=30, fusion_weight=1.0, cowatch_weight=1.0
    )
    ranked = pipe.rank([user], 30, explain=True)[0]
    shared = np.array([len(pipe.watched_with(user, i)) for i in low], dtype=float)
    assert list(shared[[20, 25, 29]]) == [2, 1, 2]
    s1 = np.array([h.score for h in stage1.hits])
    fused = (s1 - s1.mean()) / s1.std() + (shared - shared.mean()) / shared.std()
    assert [h.score for h in ranked.hits] == pytest.approx(sorted(fused, reverse=True))
    assert {h.stage for h in ranked.hits} == {"rerank"} and all(h.rerank_score is None for h in ranked.hits)
    assert low[20] in ranked.item_ids()[:3]
    for hit in ranked.hits:
        assert [w["item_id"] for w in hit.explanation["watched_with"]] == pipe.watched_with(user, hit.item_id)
    # a query has no history to overlap: stage 1's order, nothing of stage 2 runs
    assert {h.stage for h in pipe.rank(QUERIES[:1], 5)[0].hits} == {"recall"}


def test_the_popularity_prior_is_added_to_stage_one_over_a_deeper_search():
    popularity = {f"m{i}": float(i * i) for i in range(60)}
    plain = pipeline(ITEMS, recall_depth=10)
    prior = plain.replace(counts=LogCounts(popularity=popularity)).with_settings(
        popularity_weight=0.5, popularity_pool=60
    )
    request = QUERIES[0]
    ranked = prior.rank([request], 10, stage="recall")[0]
    cosine = dict(plain.index.search(plain.encoder.encode([request.text]), 60)[0])  # the whole catalogue
    expected = sorted(cosine, key=lambda i: (-(cosine[i] + 0.5 * math.log1p(popularity[i])), i))[:10]
    assert ranked.item_ids() == expected
    assert ranked.item_ids() != plain.rank([request], 10, stage="recall")[0].item_ids()


def test_mmr_reorders_only_its_pool_by_rank_relevance_and_similarity():
    pipe = pipeline(ITEMS, recall_depth=40, mmr_depth=15)
    request = QUERIES[0]
    plain = pipe.rank([request], 40, stage="recall")[0].item_ids()
    diverse = pipe.rank([request], 40, stage="recall", diversify=0.3)[0].item_ids()
    pool = plain[:15]
    expected = [pool[j] for j in mmr(pipe.index.vectors(pool), np.linspace(1, 0, 15), k=15, lam=0.3)]
    assert diverse[:15] == expected and diverse[15:] == plain[15:]
    assert diverse[:15] != pool  # λ 0.3 trades relevance for variety
    assert pipe.rank([request], 40, stage="recall", diversify=1.0)[0].item_ids() == plain
    # the configured λ applies unless the call sets one
    assert pipe.with_settings(mmr_lambda=0.3).rank([request], 40, stage="recall")[0].item_ids() == diverse


def test_rankings_name_the_pipeline_that_made_them_and_variants_are_new_pipelines():
    pipe = pipeline(ITEMS)
    other = pipe.with_settings(recall_depth=50)
    assert other.version != pipe.version and pipe.settings.recall_depth == 100
    assert pipe.rank(QUERIES[:1], 3)[0].version == pipe.version
    with pytest.raises(AttributeError):
        pipe.settings = Settings()  # type: ignore[misc]


def test_user_requests_render_the_history_and_exclude_it_as_configured():
    pipe = pipeline(ITEMS)
    user = pipe.user_request("u7", ["m3", "m1"])
    assert user.text == f"Recently: {ITEMS['m3']}; {ITEMS['m1']}"
    assert user.exclude == {"m3", "m1"} and user.history == ("m3", "m1")
    assert not pipe.with_settings(exclude_seen=False).user_request("u7", ["m3"]).exclude
    ranked = pipe.rank([user], 59)[0].item_ids()
    assert "m3" not in ranked and "m1" not in ranked


def test_bad_calls_and_settings_are_one_line_errors():
    pipe = pipeline(ITEMS)
    for call, message in (
        (lambda: pipe.rank(QUERIES, 0), "k must be a positive integer"),
        (lambda: pipe.rank(QUERIES, 3, stage="both"), "unknown stage 'both'"),
        (lambda: pipe.rank(QUERIES, 3, diversify=1.5), r"MMR λ in \[0, 1\]"),
    ):
        with pytest.raises(TwostageError, match=message):
            call()
    with pytest.raises(ConfigError, match="fusion_weight"):
        Settings(fusion_weight=2.0)
    with pytest.raises(ConfigError, match="rerank_depth"):
        Settings(rerank_depth=0)
    assert pipe.rank([], 3) == []


def test_fake_models_are_what_the_tests_assume():
    assert words("Space, robots & 2 nights!") == ["space", "robots", "2", "nights"]
    scores = FakeReranker().score([("space robot", "space robot night"), ("space robot", "love story")])
    assert scores[0] > 10 > 1 > scores[1]
