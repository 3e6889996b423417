"""The Engine end to end on a tiny synthetic catalogue with the tiny random BERT (fast)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import make_movielens

from twostage import Engine, Hit, Ranking
from twostage.errors import IndexMismatchError, NotFoundError, TwostageError
from twostage.tuning import shallowest_depth


@pytest.fixture(scope="module")
def trained_project(tmp_path_factory, tiny_bert_path) -> Path:
    root = tmp_path_factory.mktemp("engine")
    data = make_movielens(root / "data")
    project = root / "project"
    Engine.init(project)
    (project / "twostage.toml").write_text(
        f"""
[retriever]
model = "{tiny_bert_path}"
max_seq_length = 48
train_batch_size = 8
eval_requests = 10
[reranker]
model = "{tiny_bert_path}"
max_length = 64
depth = 12
list_size = 4
max_train_requests = 12
eval_requests = 6
[index]
depth = 20
[eval]
ks = [1, 5, 10]
bootstrap = 200
"""
    )
    engine = Engine.open(project)
    engine.datasets_load("movielens", data)
    engine.split()
    engine.train_retriever()
    engine.index_build()
    engine.train_reranker()
    engine.close()
    return project


def test_pipeline_trains_and_saves_models(trained_project):
    assert (trained_project / "models" / "retriever" / "training.json").exists()
    record = json.loads((trained_project / "models" / "reranker" / "training.json").read_text())
    assert 0.0 <= record["fusion_weight"] <= 1.0  # tuned on the validation requests
    assert Engine.open(trained_project).pipeline().settings.fusion_weight == record["fusion_weight"]
    assert (trained_project / "indexes" / "default" / "manifest.json").exists()


def test_rerank_depth_is_the_shallowest_without_validation_loss(trained_project):
    record = json.loads((trained_project / "models" / "reranker" / "training.json").read_text())
    sweep = {int(d): v for d, v in record["depth_sweep"].items()}
    assert sorted(sweep) == [10, 12]  # the grid up to reranker.depth, and the depth itself
    full = sweep[12]
    assert record["rerank_depth"] == min(d for d, v in sweep.items() if v >= full * 0.99)
    assert Engine.open(trained_project).pipeline().settings.rerank_depth == record["rerank_depth"]
    overridden = Engine.open(trained_project, overrides={"reranker.serve_depth": 3})
    assert overridden.pipeline().settings.rerank_depth == 3
    hits = overridden.search("comedy film", k=5).hits
    assert [h.stage for h in hits] == ["rerank"] * 3 + ["recall"] * 2  # below the rerank depth: stage 1


def test_the_depth_tolerance_is_relative_to_the_metric():
    # search-scale nDCG: 0.1% below the full depth is no loss; next-item scale: 4% below is a loss
    assert shallowest_depth({10: 0.786, 15: 0.7865, 20: 0.787}, 20, 0.01) == 10
    assert shallowest_depth({10: 0.0491, 30: 0.0497, 50: 0.0510}, 50, 0.01) == 50
    assert shallowest_depth({10: 0.0491, 30: 0.0506, 50: 0.0510}, 50, 0.01) == 30


def test_recommend_excludes_history_and_explains(trained_project):
    engine = Engine.open(trained_project)
    ranking = engine.recommend("3", k=5, explain=True)
    assert isinstance(ranking, Ranking)
    assert len(ranking.hits) == 5
    assert [h.rank for h in ranking.hits] == [1, 2, 3, 4, 5]
    history = set(engine.store.histories(["3"])["3"])
    assert not history & set(ranking.item_ids())
    assert all(isinstance(h, Hit) and h.stage == "rerank" for h in ranking.hits)
    drivers = ranking.hits[0].explanation["drivers"]
    assert drivers and {d["item_id"] for d in drivers} <= history
    # the explanation is faithful: the reported drop is the reranker's own score change
    assert all(isinstance(d["score_drop"], float) for d in drivers)


def test_recall_stage_only(trained_project):
    engine = Engine.open(trained_project)
    ranking = engine.recommend("3", k=3, stage="recall")
    assert all(h.stage == "recall" and h.rerank_score is None for h in ranking.hits)
    scores = [h.score for h in ranking.hits]
    assert scores == sorted(scores, reverse=True)


def test_search_and_errors(trained_project):
    engine = Engine.open(trained_project)
    assert len(engine.search("comedy film", k=3).hits) == 3
    with pytest.raises(TwostageError, match="empty query"):
        engine.search("   ")
    with pytest.raises(NotFoundError, match="unknown user 'nobody'"):
        engine.recommend("nobody")
    with pytest.raises(TwostageError, match=r"MMR λ in \[0, 1\]"):
        engine.recommend("3", diversify=2.0)
    with pytest.raises(NotFoundError, match="no index"):
        engine.index_info("missing")


def test_evaluate_writes_metrics_and_compares(trained_project, tmp_path):
    engine = Engine.open(trained_project)
    report = engine.evaluate(report=tmp_path / "r.html", mmr_lambdas=(0.5,))
    names = [r.name for r in report.rows]
    assert names[:3] == ["popularity", "itemknn", "zero-shot"]
    assert "recall" in names and "rerank" in names
    for row in report.rows:
        assert row.n_requests == 24
        assert 0.0 <= row.means["nDCG@10"] <= 1.0
    stored = engine.sql(
        "SELECT count(DISTINCT stage) FROM metrics WHERE run_id = '" + report.extra["run_id"] + "'"
    )[1][0][0]
    assert stored >= 4
    assert any(c["a"] == "recall" and c["b"] == "rerank" for c in report.comparisons)
    html = (tmp_path / "r.html").read_text()
    assert "<img" in html and "nDCG@10" in html
    assert report.extra["mmr_sweep"][0]["lambda"] == 0.5
    # the demo's summary lines: stage 2 against stage 1 and stage 1 against popularity, b − a
    from twostage.demo import _significance

    lines = _significance(report.comparisons)
    means = {r.name: r.means["nDCG@10"] for r in report.rows}
    assert [line.split(",")[0] for line in lines] == ["rerank vs recall", "recall vs popularity"]
    shown = [float(line.split(": ")[1].split(" ")[0]) for line in lines]
    assert shown[0] == pytest.approx(means["rerank"] - means["recall"], abs=1e-4)
    assert shown[1] == pytest.approx(means["recall"] - means["popularity"], abs=1e-4)


def test_index_refuses_other_model(trained_project, tiny_bert_path):
    engine = Engine.open(trained_project, overrides={"text.item_template": "{title} only"})
    with pytest.raises(IndexMismatchError, match=r"item_template .*, which is now '\{title\} only'"):
        engine.pipeline()
    # index info still shows the manifest, saying what does not fit
    assert "which is now '{title} only'" in engine.index_info()["mismatch"]
    # how users become text does not change item vectors: the index still serves
    engine = Engine.open(
        trained_project, overrides={"text.user_template": "Seen: {history}", "text.history_size": 3}
    )
    assert len(engine.recommend("3", k=2, stage="recall").hits) == 2


def test_popularity_prior_reorders_recall_and_is_reported(trained_project):
    engine = Engine.open(trained_project, overrides={"retriever.popularity_weight": 5.0})
    pop = engine.store.popularity()
    ranking = engine.recommend("3", k=5, stage="recall")
    # with a large β the prior dominates: items come out in popularity order among the candidates
    counts = [pop.get(i, 0) for i in ranking.item_ids()]
    assert counts == sorted(counts, reverse=True)
    report = engine.evaluate(baselines=False)
    names = [r.name for r in report.rows]
    assert "recall-no-prior" in names and "recall" in names
    # evaluation counts popularity only before the split's cut-offs (no leak of held-out events)
    split_pop = engine.store.popularity("leave-last-out")
    assert sum(split_pop.values()) < sum(pop.values())


def test_fusion_weight_one_skips_the_cross_encoder(trained_project, monkeypatch):
    engine = Engine.open(trained_project, overrides={"reranker.fusion_weight": 1.0})
    pipe = engine.pipeline()

    def forbidden(*_args, **_kwargs):
        raise AssertionError("the cross-encoder ran although it cannot change the order")

    monkeypatch.setattr(pipe.reranker, "score", forbidden)
    served = engine.search("comedy film", k=5)
    assert [h.stage for h in served.hits] == ["recall"] * 5
    assert served.item_ids() == engine.search("comedy film", k=5, stage="recall").item_ids()


def test_cli_train_reranker_reports_the_serving_choices(trained_project):
    from click.testing import CliRunner

    from twostage.cli import cli

    result = CliRunner().invoke(cli, ["-p", str(trained_project), "train", "reranker", "--quiet"])
    assert result.exit_code == 0, result.output
    settings = Engine.open(trained_project).pipeline().settings
    assert f"rerank depth {settings.rerank_depth}, fusion weight {settings.fusion_weight}" in result.output
    as_json = CliRunner().invoke(
        cli, ["-p", str(trained_project), "search", "comedy film", "-k", "3", "--json"]
    )
    assert as_json.exit_code == 0, as_json.output
    assert len(json.loads(as_json.stdout)["hits"]) == 3
    assert "Loading weights" not in as_json.stderr  # --json silences the libraries' bars too


def test_a_template_field_no_item_has_is_refused(trained_project):
    from twostage.errors import ConfigError
    from twostage.requests import Catalogue

    catalogue = Catalogue([{"item_id": "1", "title": "Heat", "attrs": {"tags": ["heist"]}}], "{title}")
    catalogue.check_templates({"reranker.item_template": "{title}. {tags}. {cowatched}"})  # attrs keys count
    with pytest.raises(ConfigError, match=r"text.item_template: no item has the field \{titel\}.*'title'"):
        catalogue.check_templates({"text.item_template": "{titel}. {tags}"})
    # the engine checks its templates before anything is rendered, encoded or indexed
    for key in ("text.item_template", "text.history_item_template", "reranker.item_template"):
        engine = Engine.open(trained_project, overrides={key: "{title} ({yeer})"})
        with pytest.raises(ConfigError, match=key):
            engine.index_build()


def test_index_add_re_encodes_items_whose_text_changed(trained_project, tmp_path):
    import shutil

    import numpy as np

    project = tmp_path / "copy"
    shutil.copytree(trained_project, project)
    engine = Engine.open(project)
    catalogue = engine.project.catalogue()
    assert engine.index_add()["count"] == len(catalogue)  # nothing stale: nothing changes
    item, untouched = catalogue.item_ids[0], catalogue.item_ids[1]
    before = engine.project.index().vectors([item])[0]
    kept = engine.project.index().vectors([untouched])[0]
    (tmp_path / "retitle.csv").write_text(f"item_id,title\n{item},A completely different film\n")
    engine.ingest(tmp_path / "retitle.csv", "items")
    engine.index_add()
    fresh = Engine.open(project)
    index = fresh.project.index()
    assert not np.allclose(before, index.vectors([item])[0], atol=1e-3)
    assert np.array_equal(kept, index.vectors([untouched])[0])
    text = fresh.project.catalogue().text(item)
    assert text.startswith("A completely different film")
    expected = fresh.project.retriever().encode([text])
    assert np.allclose(index.vectors([item])[0], np.asarray(expected)[0], atol=1e-4)
    gone = catalogue.item_ids[2]
    assert fresh.index_remove([gone])["count"] == len(catalogue) - 1
    assert gone not in Engine.open(project).project.index()


def test_training_on_a_handful_of_lists_is_warned_about(trained_project, tmp_path, caplog):
    import logging
    import shutil

    project = tmp_path / "copy"
    shutil.copytree(trained_project, project)
    with caplog.at_level(logging.WARNING, logger="twostage"):
        Engine.open(project).train_reranker()
    warned = [r.getMessage() for r in caplog.records if r.name == "twostage.train.lists"]
    assert any("training lists from 12 requests" in m and "max_train_requests" in m for m in warned)
    assert any("validation lists from" in m and "eval_requests" in m for m in warned)
