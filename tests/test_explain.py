"""Explanations are the ranking pipeline's own scores of edited requests: faithful by construction, checked here
against the fake models' exact scores."""

from __future__ import annotations

import pytest
from fakes import FakeReranker, movie_titles, pipeline

from twostage.explain import content_terms, raised_score
from twostage.pipeline import LogCounts
from twostage.requests import Request, user_text

ITEMS = movie_titles()


@pytest.mark.parametrize("stage", ["rerank", "recall"])
def test_recommendation_drivers_are_leave_one_out_score_drops(stage):
    categories = {i: ["Sci-Fi"] if "space" in t else ["Drama"] for i, t in ITEMS.items()}
    pipe = pipeline(ITEMS, reranker=FakeReranker(), categories=categories, recall_depth=20, rerank_depth=10)
    history = ["m0", "m6", "m13", "m2"]
    user = pipe.user_request("u", history)
    ranking = pipe.rank([user], 4, stage=stage, explain=True)[0]
    use_reranker = stage == "rerank"
    for hit in ranking.hits:
        note = hit.explanation
        # the explained score is the one that ranked the hit: the cross-encoder's logit, or stage 1's cosine
        (own,) = pipe.pair_scores([user.text], [hit.item_id], use_reranker=use_reranker)[0]
        assert own == pytest.approx(hit.rerank_score if use_reranker else hit.recall_score, abs=1e-5)
        assert note["method"].endswith("reranker score" if use_reranker else "bi-encoder score")
        assert "watched_with" not in note  # no co-watch scores took part
        assert len(note["drivers"]) == 3
        for driver in note["drivers"]:
            edited = user_text([h for h in history if h != driver["item_id"]], pipe.catalogue, pipe.text)
            full, without = pipe.pair_scores([user.text, edited], [hit.item_id], use_reranker=use_reranker)[
                :, 0
            ]
            assert driver["score_drop"] == pytest.approx(full - without, abs=1e-4)
            vecs = pipe.index.vectors([driver["item_id"], hit.item_id])
            assert driver["similarity"] == pytest.approx(float(vecs[0] @ vecs[1]), abs=1e-4)
            shared = set(categories[driver["item_id"]]) & set(categories[hit.item_id])
            assert driver["shared_categories"] == sorted(shared)
        drops = [d["score_drop"] for d in note["drivers"]]
        assert drops == sorted(drops, reverse=True)


def test_search_terms_are_content_words_and_their_score_drops():
    pipe = pipeline(ITEMS, reranker=FakeReranker(), recall_depth=20, rerank_depth=10)
    query = "the space robot, at night!"
    ranking = pipe.rank([Request("q", query)], 3, explain=True)[0]
    edited = {"space": "the robot, at night!", "robot": "the space at night!", "night": "the space robot, at"}
    for hit in ranking.hits:
        terms = hit.explanation["terms"]
        assert {t["term"] for t in terms} == set(edited)  # stopwords and punctuation are not terms
        scores = pipe.pair_scores([query, *edited.values()], [hit.item_id], use_reranker=True)[:, 0]
        expected = dict(zip(edited, scores[0] - scores[1:], strict=True))
        for t in terms:
            assert t["score_drop"] == pytest.approx(expected[t["term"]], abs=1e-4)


def test_cowatched_history_items_are_listed_where_cowatch_ranked_the_hits():
    lists = {i: ["m0", "m6"][: n % 3] for n, i in enumerate(ITEMS)}  # 0, 1 or 2 of the history each
    counts = LogCounts(cowatched=lists)
    pipe = pipeline(ITEMS, reranker=FakeReranker(), counts=counts, cowatch_weight=2.0, rerank_depth=5)
    user = pipe.user_request("u", ["m0", "m6", "m13"])
    ranking = pipe.rank([user], 8, explain=True)[0]
    without = pipe.with_settings(cowatch_weight=0.0).rank([user], 5)[0]
    assert [h.score for h in ranking.hits[:5]] != [h.score for h in without.hits]  # co-watch took part
    for hit in ranking.hits[:5]:
        assert [w["item_id"] for w in hit.explanation["watched_with"]] == lists[hit.item_id]
        assert hit.explanation["method"].endswith("reranker score")
    for hit in ranking.hits[5:]:  # below the rerank depth stage 1 ranked them, and explains them
        assert "watched_with" not in hit.explanation and hit.explanation["method"].endswith(
            "bi-encoder score"
        )
    recalled = pipe.rank([user], 3, stage="recall", explain=True)[0]
    assert all("watched_with" not in h.explanation for h in recalled.hits)  # co-watch did not rank these


def test_only_drivers_that_raised_the_score_are_worth_a_because():
    drivers = [
        {"term": "a", "score_drop": 0.2},
        {"term": "b", "score_drop": 0.0},
        {"term": "c", "score_drop": -0.1},
    ]
    assert raised_score(drivers) == drivers[:1]
    assert raised_score([{"term": "solo", "score_drop": None}]) == []


def test_content_terms_fall_back_to_every_token_when_all_are_stopwords():
    assert content_terms("space adventure with robots") == (
        ["space", "adventure", "with", "robots"],
        [0, 1, 3],
    )
    assert content_terms("The (Matrix)") == (["The", "(Matrix)"], [1])
    assert content_terms("to be or not") == (["to", "be", "or", "not"], [0, 1, 2, 3])


def test_a_one_word_query_has_nothing_to_leave_out():
    pipe = pipeline(ITEMS, reranker=FakeReranker())
    hit = pipe.rank([Request("q", "space")], 1, explain=True)[0].hits[0]
    assert hit.explanation["terms"] == [{"term": "space", "score_drop": None}]
