"""An evaluation run with the fake models: every ranking it stores is the pipeline's own ranking of the
held-out requests (offline = online), next to the baselines, with paired comparisons."""

from __future__ import annotations

import pytest
from conftest import make_movielens
from fakes import FakeReranker, pipeline

from twostage.config import Config, RelevanceConfig, SplitConfig, from_dict
from twostage.datasets import load_movielens
from twostage.experiment import run_evaluation
from twostage.pipeline import LogCounts
from twostage.requests import Catalogue
from twostage.store import Store

SPLIT = "leave-last-out"


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Store:
    root = tmp_path_factory.mktemp("experiment")
    store = Store(root / "p.duckdb")
    load_movielens(store, make_movielens(root / "data", n_users=30))
    store.split(SplitConfig(), RelevanceConfig())
    return store


def _config() -> Config:
    return from_dict({"eval": {"ks": [1, 5, 10, 20], "bootstrap": 100}})


def _pipe(store: Store, **settings):
    catalogue = Catalogue.from_store(store, "{title}. {categories}")
    defaults = {"recall_depth": 20, "rerank_depth": 8, "mmr_depth": 12}
    return pipeline(catalogue, reranker=FakeReranker(), **{**defaults, **settings})


def _stored(store: Store, run_id: str, stage: str) -> dict[str, list[str]]:
    rows = store.sql(
        "SELECT request_id, list(item_id ORDER BY rank) FROM results WHERE run_id = ? AND stage = ? GROUP BY 1",
        [run_id, stage],
    )[1]
    return dict(rows)


def test_every_stored_ranking_is_what_the_pipeline_serves_at_the_cut_off(store):
    pipe = _pipe(store)
    report = run_evaluation(store, pipe, config=_config(), split=SPLIT, part="test", mmr_lambdas=(0.5,))
    assert [r.name for r in report.rows] == ["popularity", "itemknn", "recall", "rerank"]
    assert all(r.n_requests == 30 for r in report.rows)
    run_id = report.extra["run_id"]
    cutoffs = store.cutoffs(SPLIT, "test")
    users = sorted(cutoffs)
    histories = store.histories(users, cutoffs=cutoffs)
    for stage, options in (("recall", {"stage": "recall"}), ("rerank", {}), ("mmr-0.5", {"diversify": 0.5})):
        stored = _stored(store, run_id, stage)
        for user in users:
            served = pipe.rank([pipe.user_request(user, histories[user])], 20, **options)[0]
            assert stored[user] == served.item_ids(), (stage, user)
    assert report.extra["mmr_sweep"][0]["lambda"] == 0.5
    pairs = {(c["a"], c["b"]) for c in report.comparisons}
    assert {("recall", "rerank"), ("popularity", "recall")} <= pairs


def test_the_zero_shot_and_no_prior_rows_join_when_they_apply(store):
    popularity = store.popularity(SPLIT)
    pipe = _pipe(store, popularity_weight=0.05).replace(counts=LogCounts(popularity=popularity))
    zero = _pipe(store, rerank_depth=1).replace(reranker=None)
    report = run_evaluation(store, pipe, config=_config(), split=SPLIT, part="valid", zero_shot=lambda: zero)
    assert [r.name for r in report.rows] == [
        "popularity",
        "itemknn",
        "zero-shot",
        "recall-no-prior",
        "recall",
        "rerank",
    ]
    pairs = {(c["a"], c["b"]) for c in report.comparisons}
    assert {("zero-shot", "recall"), ("recall-no-prior", "recall")} <= pairs
    # a pipeline without a reranker evaluates stage 1 only, and no baselines when asked
    alone = run_evaluation(
        store, pipe.replace(reranker=None), config=_config(), split=SPLIT, part="test", baselines=False
    )
    assert [r.name for r in alone.rows] == ["recall-no-prior", "recall"]


def test_metrics_land_in_the_store_per_request_and_as_means(store):
    report = run_evaluation(store, _pipe(store), config=_config(), split=SPLIT, part="test", baselines=False)
    run_id = report.extra["run_id"]
    means = dict(
        store.sql(
            "SELECT metric || '@' || k, value FROM metrics WHERE run_id = ? AND stage = 'rerank' AND k IS NOT NULL",
            [run_id],
        )[1]
    )
    row = next(r for r in report.rows if r.name == "rerank")
    assert means["ndcg@10"] == pytest.approx(row.means["nDCG@10"])
    n = store.sql("SELECT count(DISTINCT request_id) FROM request_metrics WHERE run_id = ?", [run_id])[1][0][
        0
    ]
    assert n == 30
