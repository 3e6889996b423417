"""Co-watch lists for stage 2's item text: counted in DuckDB, never from held-out events or the request's user."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from test_engine import make_movielens

from twostage import Engine
from twostage.config import RelevanceConfig, SplitConfig, from_dict
from twostage.cowatch import MIN_USERS, co_watched, shared_history, training_folds
from twostage.engine import COWATCH_GRID, FUSION_GRID
from twostage.errors import ConfigError, NotFoundError
from twostage.requests import Catalogue, split_requests
from twostage.rerank import Reranker
from twostage.store import Store
from twostage.train.examples import reranker_requests


def _store(tmp_path: Path, events: list[tuple[str, str, int]]) -> Store:
    items = tmp_path / "items.csv"
    items.write_text("item_id,title\n" + "".join(f"{i},Film {i}\n" for i in "12345"))
    log = tmp_path / "events.csv"
    log.write_text("user_id,item_id,ts\n" + "".join(f"{u},{i},{t}\n" for u, i, t in events))
    store = Store(tmp_path / "p.duckdb")
    store.ingest(items, "items")
    store.ingest(log, "events")
    return store


def _events() -> list[tuple[str, str, int]]:
    """Users u1–u6 watch 1 then 2; u1–u5 also 3 (last); u7 watches 1 and 4 (4 has one user)."""
    events = []
    for n in range(1, 7):
        events += [(f"u{n}", "1", 10), (f"u{n}", "2", 20)]
        if n <= 5:
            events.append((f"u{n}", "3", 30))
    return [*events, ("u7", "1", 10), ("u7", "4", 20), ("u7", "5", 30)]


def test_lists_rank_by_cosine_and_skip_items_with_few_users(tmp_path):
    store = _store(tmp_path, _events())
    lists = co_watched(store, top=5)
    # cos(1,2) = 6/sqrt(7·6) = 0.93 > cos(1,3) = 5/sqrt(7·5) = 0.85; 4 and 5 have one user each (< MIN_USERS)
    assert lists["1"] == ["2", "3"]
    assert lists["3"] == ["2", "1"]  # 5/sqrt(5·6) = 0.91 > 5/sqrt(5·7) = 0.85
    assert "4" not in lists["1"] and MIN_USERS > 1
    assert co_watched(store, top=1)["1"] == ["2"]


def test_excluded_users_and_held_out_events_are_not_counted(tmp_path):
    store = _store(tmp_path, _events())
    # without u1, item 3 has 4 users (< MIN_USERS): it drops out of every list
    assert "3" not in co_watched(store, top=5, exclude_users=["u1"])["1"]
    # leave-last-out holds out each user's last event (item 3 for u1–u5): only training events count
    store.split(SplitConfig(strategy="leave-last-out", min_events=3), RelevanceConfig())
    lists = co_watched(store, top=5, split="leave-last-out")
    assert all("3" not in v for v in lists.values())
    assert "3" not in lists


def test_cowatched_is_for_stage_two_only():
    with pytest.raises(ConfigError, match="reranker"):
        from_dict({"text": {"item_template": "{title}. {cowatched}"}})
    config = from_dict({"reranker": {"item_template": "{title}. Watched with: {cowatched}"}})
    assert config.reranker.cowatched_size == 8


def test_catalogue_renders_cowatched_titles_and_drops_an_empty_field():
    catalogue = Catalogue([{"item_id": "1", "title": "Heat"}, {"item_id": "2", "title": "Casino"}], "{title}")
    texts = catalogue.texts_with("{title}. Watched with: {cowatched}", {"1": ["2"]})
    assert texts == {"1": "Heat. Watched with: Casino", "2": "Casino."}
    assert catalogue.texts_with("{title}") is catalogue.texts


def test_shared_history_keeps_history_order():
    lists = {"x": ["c", "a", "z"]}
    assert shared_history(["a", "b", "c"], "x", lists) == ["a", "c"]
    assert shared_history(["a", "b"], "unknown", lists) == []
    assert shared_history(["a", "c", "a"], "x", lists) == ["a", "c"]  # a re-watch counts once


def test_folds_deal_every_user_once():
    folds = training_folds([f"u{n}" for n in range(10)] * 2, 5, seed=0)
    assert sorted(folds) == sorted(f"u{n}" for n in range(10))
    assert sorted(folds.values()) == sorted([0, 1, 2, 3, 4] * 2)


def test_engine_reads_split_lists_in_evaluation_and_other_folds_in_training(tmp_path):
    project = tmp_path / "project"
    Engine.init(project)
    (project / "twostage.toml").write_text(
        '[reranker]\nitem_template = "{title}. Watched with: {cowatched}"\ncowatched_size = 3\n'
    )
    engine = Engine.open(project)
    engine.load_dataset("movielens", make_movielens(tmp_path / "data", n_users=60))
    engine.split()
    split = engine.default_split()
    served, held_out = engine.rerank_texts(), engine.rerank_texts(split)
    expected = co_watched(engine.store, top=3, split=split)
    assert expected and all(len(ids) == 3 for ids in expected.values())
    catalogue = engine.catalogue()
    for item_id, ids in expected.items():
        titles = "; ".join(catalogue.title(i) for i in ids)
        assert held_out[item_id] == f"{catalogue.title(item_id)}. Watched with: {titles}"
    assert served != held_out  # serving counts every event, evaluation only those before the cut-offs

    labelled = reranker_requests(engine.store, catalogue, engine.config, split=split, max_requests=30, seed=0)
    groups = engine._training_groups(labelled, split)
    assert sorted(id(x) for _, group in groups for x in group) == sorted(id(x) for x in labelled)
    folds = training_folds([x.user_id for x in labelled], 5, engine.config.reranker.seed)
    for texts, group in groups:
        for x in group:
            mates = [u for u, f in folds.items() if f == folds[x.user_id]]
            assert x.user_id in mates
            assert texts == engine.rerank_texts(split, exclude_users=mates)
    engine.close()


def test_a_project_trains_and_evaluates_with_cowatched_texts(tmp_path, tiny_bert_path):
    project = tmp_path / "project"
    Engine.init(project)
    (project / "twostage.toml").write_text(
        f"""
[retriever]
model = "{tiny_bert_path}"
max_seq_length = 32
train_batch_size = 8
eval_requests = 10
[reranker]
model = "{tiny_bert_path}"
item_template = "{{title}}. Watched with: {{cowatched}}"
cowatched_size = 3
max_length = 64
depth = 12
list_size = 4
max_train_requests = 20
eval_requests = 10
[index]
depth = 20
[eval]
ks = [10]
bootstrap = 50
"""
    )
    engine = Engine.open(project)
    engine.load_dataset("movielens", make_movielens(tmp_path / "data", n_users=60))
    engine.split()
    engine.train_retriever()
    engine.build_index()
    engine.train_reranker()
    record = json.loads((project / "models" / "reranker" / "training.json").read_text())
    assert record["train_lists"] > 0 and "fusion_weight" in record
    pipe = engine.split_pipeline(engine.default_split())
    assert pipe.rerank_texts == engine.rerank_texts(engine.default_split())
    assert any("Watched with:" in t for t in pipe.rerank_texts.values())
    assert record["cowatch_weight"] in COWATCH_GRID  # tuned with the fusion weight on validation
    assert {(w, c) for w, c, _ in record["weight_grid"]} == {
        (w, c) for w in FUSION_GRID for c in COWATCH_GRID
    }
    report = engine.evaluate(baselines=False)
    assert {r.name for r in report.rows} >= {"recall", "rerank"}
    engine.close()


def _trained_with_cowatch(tmp_path: Path, tiny_bert_path: Path) -> Path:
    project = tmp_path / "project"
    Engine.init(project)
    (project / "twostage.toml").write_text(
        f"""
[text]
history_size = 4
[retriever]
model = "{tiny_bert_path}"
max_seq_length = 32
train_batch_size = 8
eval_requests = 10
[reranker]
model = "{tiny_bert_path}"
cowatched_size = 4
max_length = 48
depth = 12
list_size = 4
max_train_requests = 12
eval_requests = 8
[index]
depth = 20
"""
    )
    engine = Engine.open(project)
    engine.load_dataset("movielens", make_movielens(tmp_path / "data", n_users=60))
    engine.split()
    engine.train_retriever()
    engine.build_index()
    engine.train_reranker()
    engine.close()
    return project


def test_cowatch_scores_reorder_stage_one_without_the_cross_encoder(tmp_path, tiny_bert_path, monkeypatch):
    project = _trained_with_cowatch(tmp_path, tiny_bert_path)
    engine = Engine.open(project, overrides={"reranker.fusion_weight": 1.0, "reranker.cowatch_weight": 1.0})
    split = engine.default_split()
    pipe = engine.split_pipeline(split)
    assert pipe.cowatched == co_watched(engine.store, top=4, split=split)  # counted before the cut-offs
    assert engine.pipeline().cowatched == co_watched(engine.store, top=4)  # serving: every event

    def forbidden(*_args, **_kwargs):
        raise AssertionError("the cross-encoder ran although its weight is 0")

    monkeypatch.setattr(pipe.reranker, "score", forbidden)
    requests = split_requests(engine.store, engine.catalogue(), engine.config.text, split=split, part="test")
    stage1 = pipe.recall(requests, 12)
    reordered = 0
    for request, cands, hits in zip(requests, stage1, pipe.rerank(requests, stage1, 12), strict=True):
        counts = np.array([len(shared_history(request.history[:4], i, pipe.cowatched)) for i, _ in cands])
        expected = _z(np.array([s for _, s in cands])) + _z(counts)
        assert {h.item_id: h.cowatch for h in hits} == {i: c for (i, _), c in zip(cands, counts, strict=True)}
        assert [h.score for h in hits] == pytest.approx(sorted(expected, reverse=True))
        reordered += [h.item_id for h in hits] != [i for i, _ in cands]
    assert reordered > 0  # the lists overlap the histories often enough to change some orders

    user = requests[0].request_id
    ranking = engine.recommend(user, k=5, explain=True)
    assert {h.stage for h in ranking.hits} == {"rerank"} and all(h.rerank_score is None for h in ranking.hits)
    history = engine.store.histories([user])[user][:4]
    for hit in ranking.hits:
        shared = shared_history(history, hit.item_id, engine.pipeline().cowatched)
        assert [w["item_id"] for w in hit.explanation["watched_with"]] == shared
    recalled = engine.recommend(user, k=5, stage="recall", explain=True)
    assert all("watched_with" not in h.explanation for h in recalled.hits)  # co-watch did not rank these
    # a query has no history to overlap: stage 1's order, the cross-encoder is not run either
    assert {h.stage for h in engine.search("comedy film", k=3).hits} == {"recall"}
    engine.close()


def test_tune_only_chooses_the_serving_weights_again(tmp_path, tiny_bert_path, monkeypatch):
    from click.testing import CliRunner

    from twostage.cli import cli

    project = _trained_with_cowatch(tmp_path, tiny_bert_path)
    record_path = project / "models" / "reranker" / "training.json"
    record = json.loads(record_path.read_text())
    record.update(fusion_weight=0.123, cowatch_weight=9.0)
    record_path.write_text(json.dumps(record))
    result = CliRunner().invoke(cli, ["-p", str(project), "train", "reranker", "--tune-only", "--json"])
    assert result.exit_code == 0, result.output
    tuned = json.loads(result.stdout)
    both = CliRunner().invoke(cli, ["-p", str(project), "train", "reranker", "--tune-only", "--epochs", "2"])
    assert both.exit_code == 2 and "--tune-only keeps the trained model" in both.output
    again = json.loads(record_path.read_text())
    assert again["fusion_weight"] == tuned["fusion_weight"] in FUSION_GRID
    assert again["cowatch_weight"] == tuned["cowatch_weight"] in COWATCH_GRID
    assert again["train_lists"] == record["train_lists"]  # the training record is kept
    engine = Engine.open(project)
    assert (engine.fusion_weight(), engine.cowatch_weight()) == (
        tuned["fusion_weight"],
        tuned["cowatch_weight"],
    )
    engine.close()
    # a configured weight is the one served: only the other is searched
    pinned = Engine.open(project, overrides={"reranker.fusion_weight": 0.25})
    assert {w for w, _, _ in pinned.tune_reranker()["weight_grid"]} == {0.25}
    # tuning scores the split's stage-2 texts, also when the project has no reranker to serve with yet
    engine = Engine.open(project, overrides={"reranker.item_template": "{title}. Watched with: {cowatched}"})
    scored = []
    monkeypatch.setattr(
        Reranker, "score", lambda self, pairs, **kw: scored.extend(pairs) or np.zeros(len(pairs))
    )
    monkeypatch.setattr(engine, "reranker", lambda **kw: None)
    engine.tune_reranker()
    texts = set(engine.rerank_texts(engine.default_split()).values())
    assert scored and all(item in texts for _, item in scored)
    assert any("Watched with:" in item for _, item in scored)
    # a new split drops the lists counted under the old cut-offs
    engine.split()
    assert not engine._cowatch_lists and not engine._rerank_texts
    shutil.rmtree(project / "models" / "reranker")
    with pytest.raises(NotFoundError, match="no trained reranker"):
        Engine.open(project).tune_reranker()


def _z(x: np.ndarray) -> np.ndarray:
    return (x - x.mean()) / x.std() if x.std() > 0 else np.zeros(len(x))


def test_tuning_scores_only_requests_in_reach_and_chooses_as_if_it_scored_all(
    tmp_path, tiny_bert_path, monkeypatch
):
    import twostage.engine as engine_module

    project = _trained_with_cowatch(tmp_path, tiny_bert_path)
    scored: list[int] = []
    real_score = Reranker.score

    def counting(self, pairs, **kw):
        scored.append(len(pairs))
        return real_score(self, pairs, **kw)

    monkeypatch.setattr(Reranker, "score", counting)
    skipping = Engine.open(project).tune_reranker()
    skipped_pairs = sum(scored)
    scored.clear()
    monkeypatch.setattr(engine_module, "_retrieved", lambda candidates, positives: True)
    everything = Engine.open(project).tune_reranker()
    # requests without a positive among their candidates were not scored, and nothing chosen changed
    assert 0 < skipped_pairs < sum(scored)
    assert np.allclose(np.asarray(skipping["weight_grid"]), np.asarray(everything["weight_grid"]))
    for key in ("depth_sweep", "fusion_weight", "cowatch_weight", "rerank_depth"):
        assert skipping[key] == pytest.approx(everything[key]), key
