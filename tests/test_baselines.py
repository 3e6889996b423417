"""Popularity and BM25 baselines."""

from __future__ import annotations

from twostage.baselines import BM25, popularity_rankings


def test_popularity_excludes_seen_and_breaks_ties_by_id():
    pop = {"a": 5, "b": 3, "c": 3, "d": 1}
    out = popularity_rankings(pop, {"u1": {"a"}, "u2": set()}, k=2)
    assert out["u1"] == [("b", 3.0), ("c", 3.0)]
    assert [i for i, _ in out["u2"]] == ["a", "b"]


def test_bm25_ranks_matching_document_first():
    ids = ["d1", "d2", "d3"]
    texts = [
        "Protein folding in yeast cells",
        "Cancer risk increases with smoking",
        "Movies about space travel",
    ]
    hits = BM25(ids, texts).search(["smoking and cancer", "yeast proteins fold"], k=3)
    assert hits[0][0][0] == "d2"
    assert hits[1][0][0] == "d1"  # stemming: proteins → protein, fold → fold
    assert all(score > 0 for _, score in hits[0])
