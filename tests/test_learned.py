"""The learned stage 2 (LightGBM over features) and the EASE items channel it ranks with (issue 16)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import make_served_project

from twostage import Engine
from twostage.cli import cli
from twostage.errors import IndexMismatchError
from twostage.features import FEATURES, candidate_features
from twostage.itemitem import EaseOptions, ItemItem, fit_ease, read_item_model, write_item_model
from twostage.ltr import BoostOptions, Group, LearnedRanker, select_features


def _pairs(rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    users = np.asarray([u for u, items in enumerate(rows) for _ in items], dtype=np.int32)
    items = np.asarray([i for items in rows for i in items], dtype=np.int32)
    return users, items


def test_ease_links_items_taken_by_the_same_users_and_never_returns_the_history():
    ids = ["a", "b", "c", "d", "e"]
    # a and b always together, c and d always together, e with everyone once
    users, items = _pairs([[0, 1], [0, 1], [0, 1, 4], [2, 3], [2, 3], [2, 3, 4]])
    model = fit_ease(ids, users, items, EaseOptions(reg=1.0, neighbours=4, min_users=1))
    top = model.top(["a"], 2)
    assert top[0][0] == "b" and all(i != "a" for i, _ in top)
    assert model.scores(["c"], ["d", "b", "unknown"])[0] > 0
    assert model.scores(["c"], ["d", "b", "unknown"])[1:].tolist() == [0.0, 0.0]
    assert model.top(["a"], 5, exclude={"b"})[0][0] != "b"
    assert model.popularity == {"a": 3, "b": 3, "c": 3, "d": 3, "e": 2}


def test_ease_keeps_only_eligible_items_and_each_rows_largest_weights():
    ids = [str(i) for i in range(6)]
    users, items = _pairs([[0, 1, 2, 3, 4], [0, 1, 2, 3], [0, 1, 2], [0, 1], [5]])
    model = fit_ease(ids, users, items, EaseOptions(reg=1.0, neighbours=2, min_users=2))
    assert "5" not in model.item_ids and "4" not in model.item_ids  # one user each
    assert max(np.diff(model.weights.indptr)) <= 2
    assert model.popularity["5"] == 1  # popularity still counts every item


def test_item_model_round_trips_through_its_file(tmp_path):
    ids = ["a", "b", "c"]
    users, items = _pairs([[0, 1], [0, 1, 2], [1, 2]])
    model = fit_ease(ids, users, items, EaseOptions(reg=1.0, min_users=1))
    write_item_model(tmp_path / "m.npz", model)
    back = read_item_model(tmp_path / "m.npz")
    assert back is not None and back.item_ids == model.item_ids and back.popularity == model.popularity
    assert (back.weights != model.weights).nnz == 0
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    assert read_item_model(tmp_path / "bad.npz") is None


def _groups(rng: np.random.Generator, n: int) -> list[Group]:
    out = []
    for _ in range(n):
        labels = np.zeros(20, dtype=np.int32)
        labels[rng.integers(20)] = 1
        informative = labels + 0.1 * rng.random(20)  # orders the positive first
        noise = rng.random(20)
        out.append(Group(np.column_stack([noise, informative]), labels))
    return out


def test_feature_selection_drops_a_costly_feature_that_earns_nothing_and_keeps_cheap_ties():
    rng = np.random.default_rng(0)
    train, valid = _groups(rng, 200), _groups(rng, 60)
    options = BoostOptions(min_data_in_leaf=5)
    # a cross-encoder score that is pure noise is not worth running
    ranker, record = select_features(train, valid, ["rerank", "signal"], options)
    assert ranker.features == ("signal",) and record["dropped"] == ["rerank"]
    assert record["valid_ndcg@10"] == pytest.approx(1.0)
    assert int(np.argmax(ranker.score(np.asarray([[0.1], [1.05], [0.2]])))) == 1
    # a cheap feature whose removal changes nothing stays: a tie on validation is not evidence
    ranker, record = select_features(train, valid, ["noise", "signal"], options)
    assert ranker.features == ("noise", "signal") and record["drop_gain"]["noise"] == pytest.approx(0.0)


def test_a_saved_ranker_loads_and_a_wrong_one_is_refused(tmp_path):
    rng = np.random.default_rng(1)
    ranker, _ = select_features(
        _groups(rng, 50), [], ["stage1", "dense"], BoostOptions(min_data_in_leaf=5, num_trees=5)
    )
    ranker.save(tmp_path / "ranker")
    back = LearnedRanker.load(tmp_path / "ranker")
    rows = rng.random((7, len(back.features)))
    assert np.allclose(back.score(rows), ranker.score(rows))
    record = json.loads((tmp_path / "ranker" / "ranker.json").read_text())
    record["features"] = ["stage1", "dense", "items"]
    (tmp_path / "ranker" / "ranker.json").write_text(json.dumps(record))
    with pytest.raises(IndexMismatchError):
        LearnedRanker.load(tmp_path / "ranker")


@pytest.fixture(scope="module")
def trained(tiny_bert_path, tmp_path_factory):
    """A served project (tiny BERTs) with a learned ranker trained by the CLI."""
    root = tmp_path_factory.mktemp("learned")
    project = make_served_project(
        root, tiny_bert_path, "[ranker]\nmax_train_requests = 200\nmin_data_in_leaf = 5\nease_min_users = 1\n"
    )
    result = CliRunner().invoke(cli, ["--project", str(project), "train", "ranker", "--json", "--quiet"])
    assert result.exit_code == 0, result.output
    return project, json.loads(result.output)


def test_train_ranker_records_its_choices_and_the_pipeline_ranks_with_it(trained):
    project, record = trained
    assert record["train_lists"] > 0 and record["valid_lists"] > 0
    assert set(record["features"]) <= set(FEATURES) and "rerank" not in record["features"]
    assert record["items_weight"] in (0.0, 0.25, 0.5, 0.75, 1.0)
    engine = Engine.open(project)
    pipe = engine.pipeline()
    assert pipe.learned is not None and pipe.settings.items_weight == record["items_weight"]
    assert not pipe.runs_reranker  # the cross-encoder is not a feature: it never runs
    hits = engine.recommend("1", k=5).hits
    assert all(h.stage == "rerank" for h in hits) and len(hits) == 5
    _, runs = engine.store.sql("SELECT config FROM runs WHERE kind = 'train-ranker'")
    assert json.loads(runs[0][0])["resolved"]["ranker.items_weight"] == record["items_weight"]


def test_evaluate_scores_what_recommend_returns_with_the_learned_ranker(trained, monkeypatch):
    from twostage import experiment

    monkeypatch.setattr(experiment, "COLD_USERS", 3)  # the tiny log has no item with 5 users
    project, _ = trained
    engine = Engine.open(project)
    split = engine.default_split()
    report = engine.evaluate()
    names = [r.name for r in report.rows]
    assert "ease" in names and "rerank" in names
    assert any(c["a"] == "ease" and c["b"] == "rerank" for c in report.comparisons)
    _, stored = engine.store.sql(
        "SELECT request_id, item_id FROM results WHERE run_id = ? AND stage = 'rerank' AND rank <= 5 "
        "ORDER BY request_id, rank",
        [report.extra["run_id"]],
    )
    assert "itemknn" in names and any(c["a"] == "itemknn" and c["b"] == "rerank" for c in report.comparisons)
    popularity = engine.store.popularity(split)
    targets = engine.store.targets(split, "test")
    cold = {q for q, t in targets.items() if any(popularity.get(i, 0) < 3 for i in t)}
    slice_ = report.extra["cold_start"]
    assert slice_["n_requests"] == len(cold) and 0 < len(cold) < len(targets)
    rerank = next(r for r in report.rows if r.name == "rerank")
    kept = [n for n, q in enumerate(rerank.request_ids) if q in cold]
    assert slice_["rows"]["rerank"]["nDCG@10"] == pytest.approx(rerank.per_request["nDCG@10"][kept].mean())
    user = stored[0][0]
    served = engine.recommend(user, k=5, split=split).item_ids()
    assert served == [i for u, i in stored if u == user]


def test_a_published_snapshot_ranks_as_the_project_does(trained):
    from twostage import snapshot

    project, _ = trained
    engine = Engine.open(project)
    engine.publish()
    served = snapshot.load(project)
    assert served.pipeline.learned is not None and served.pipeline.counts.items is not None
    request = served.pipeline.user_request("1", served.history("1"))
    ours = engine.pipeline().rank([engine.pipeline().user_request("1", served.history("1"))], 10)[0]
    theirs = served.pipeline.rank([request], 10)[0]
    assert theirs.item_ids() == ours.item_ids()


def test_features_are_nan_where_they_do_not_apply(trained):
    project, _ = trained
    pipe = Engine.open(project).pipeline()
    request = pipe.user_request("q", ())  # no history: no items, co-watch or category features
    [recalled] = pipe.recall([request], 5)
    rows = candidate_features(pipe, request, recalled.hits, recalled.vector, FEATURES)
    column = {n: c for c, n in enumerate(FEATURES)}
    assert np.isnan(rows[:, column["items"]]).all() and np.isnan(rows[:, column["rerank"]]).all()
    assert (rows[:, column["stage1_rank"]] == np.arange(1, 6)).all()
    assert np.allclose(rows[:, column["stage1"]], [s for _, s in recalled.hits])


def test_items_model_has_no_rows_for_items_nobody_took_together():
    empty = ItemItem(("a",), __import__("scipy.sparse").sparse.csr_matrix((1, 1), dtype=np.float32))
    assert empty.top(["a"], 3) == [] and empty.scores(["zzz"], ["a"]).tolist() == [0.0]


def test_itemknn_baseline_links_items_of_the_same_users():
    from twostage.logbaselines import fit_itemknn

    users, items = _pairs([[0, 1], [0, 1], [0, 1, 4], [2, 3], [2, 3], [2, 3, 4]])
    knn = fit_itemknn(["a", "b", "c", "d", "e"], users, items, k=2)
    assert knn.top(["a"], 1)[0][0] == "b" and knn.top(["c"], 1)[0][0] == "d"
    assert max(np.diff(knn.weights.indptr)) <= 2 and knn.weights.diagonal().sum() == 0
