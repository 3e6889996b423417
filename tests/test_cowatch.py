"""Co-watch lists for stage 2's item text: counted in DuckDB, never from held-out events or the request's user."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import make_movielens

import twostage.cowatch as cowatch
from twostage import Engine
from twostage.config import RelevanceConfig, RerankerConfig, SplitConfig, from_dict
from twostage.cowatch import cached_co_watched, co_watched, co_watched_folds, shared_history, training_folds
from twostage.errors import ConfigError, NotFoundError
from twostage.requests import Catalogue
from twostage.rerank import Reranker
from twostage.store import USER_CUTOFFS, Store
from twostage.train.examples import reranker_requests
from twostage.train.lists import training_lists

DEFAULTS = RerankerConfig()
FUSION_GRID, COWATCH_GRID, MIN_USERS = DEFAULTS.fusion_grid, DEFAULTS.cowatch_grid, DEFAULTS.cowatch_min_users


def _lists(store: Store, **options) -> dict[str, list[str]]:
    return co_watched(store, min_users=MIN_USERS, recent_items=DEFAULTS.cowatch_recent_items, **options)


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
    lists = _lists(store, top=5)
    # cos(1,2) = 6/sqrt(7·6) = 0.93 > cos(1,3) = 5/sqrt(7·5) = 0.85; 4 and 5 have one user each (< MIN_USERS)
    assert lists["1"] == ["2", "3"]
    assert lists["3"] == ["2", "1"]  # 5/sqrt(5·6) = 0.91 > 5/sqrt(5·7) = 0.85
    assert "4" not in lists["1"] and MIN_USERS > 1
    assert _lists(store, top=1)["1"] == ["2"]


def test_excluded_users_and_held_out_events_are_not_counted(tmp_path):
    store = _store(tmp_path, _events())
    # without u1, item 3 has 4 users (< MIN_USERS): it drops out of every list
    assert "3" not in _lists(store, top=5, exclude_users=["u1"])["1"]
    # leave-last-out holds out each user's last event (item 3 for u1–u5): only training events count
    store.split(SplitConfig(strategy="leave-last-out", min_events=3), RelevanceConfig())
    lists = _lists(store, top=5, split="leave-last-out")
    assert all("3" not in v for v in lists.values())
    assert "3" not in lists


def _co_watched_sql(store: Store, *, top, split=None, exclude_users=(), min_users, recent_items):
    """The reference: the all-pairs self-join co_watched ran in DuckDB before it moved to scipy.sparse."""
    import pyarrow as pa

    cur = store.cursor()
    cur.register("_excluded", pa.table({"user_id": pa.array(sorted(set(exclude_users)), pa.string())}))
    rows = cur.execute(
        f"""
        WITH cut AS ({USER_CUTOFFS}),
        ranked AS (
            SELECT e.user_id, e.item_id,
                   row_number() OVER (PARTITION BY e.user_id ORDER BY max(e.ts) DESC, e.item_id) AS n
            FROM events e LEFT JOIN cut c USING (user_id)
            WHERE (c.cts IS NULL OR (e.ts, e.seq) < (c.cts, c.cseq))
              AND e.user_id NOT IN (SELECT user_id FROM _excluded)
            GROUP BY e.user_id, e.item_id
        ),
        seen AS (SELECT user_id, item_id FROM ranked WHERE n <= {int(recent_items)}),
        users AS (SELECT item_id, count(*) AS n FROM seen GROUP BY 1),
        pairs AS (
            SELECT a.item_id AS a, b.item_id AS b, count(*) AS c
            FROM seen a JOIN seen b ON a.user_id = b.user_id AND a.item_id <> b.item_id
            GROUP BY 1, 2
        ),
        scored AS (
            SELECT p.a, p.b, p.c / sqrt(ua.n * ub.n) AS cos
            FROM pairs p JOIN users ua ON ua.item_id = p.a JOIN users ub ON ub.item_id = p.b
            WHERE ub.n >= {int(min_users)}
        )
        SELECT a, list(b ORDER BY cos DESC, b)[1:{int(top)}] FROM scored GROUP BY a
        """,
        [split],
    ).fetchall()
    cur.close()
    return dict(rows)


def _random_store(tmp_path: Path, seed: int) -> Store:
    """Skewed item choice, re-watches and equal timestamps (recent-item ties), ids that sort as strings."""
    rng = np.random.default_rng(seed)
    n_items = int(rng.integers(20, 60))
    weights = 1.0 / np.arange(1, n_items + 1) ** rng.uniform(0.3, 1.2)
    events = []
    for u in range(int(rng.integers(30, 80))):
        picks = rng.choice(n_items, size=int(rng.integers(1, 25)), p=weights / weights.sum())
        events += [(f"u{u}", f"i{i}", int(rng.integers(0, 15))) for i in picks]
    items = tmp_path / "items.csv"
    items.write_text("item_id,title\n" + "".join(f"i{i},Film {i}\n" for i in range(n_items)))
    log = tmp_path / "events.csv"
    log.write_text("user_id,item_id,ts\n" + "".join(f"{u},{i},{t}\n" for u, i, t in events))
    store = Store(tmp_path / "p.duckdb")
    store.ingest(items, "items")
    store.ingest(log, "events")
    store.split(SplitConfig(strategy="leave-last-out", min_events=3), RelevanceConfig())
    return store


@pytest.mark.parametrize("seed", range(6))
def test_sparse_counts_equal_the_sql_self_join(tmp_path, seed, monkeypatch):
    store = _random_store(tmp_path, seed)
    rng = np.random.default_rng(seed)
    users = sorted({u for (u,) in store.cursor().execute("SELECT DISTINCT user_id FROM events").fetchall()})
    monkeypatch.setattr(cowatch, "BLOCK_NONZEROS", 50)  # many blocks, and rows alone in theirs
    for top, min_users, recent in [(1, 1, 200), (3, 2, 200), (5, 3, 6), (40, 1, 3)]:
        options = {"top": top, "min_users": min_users, "recent_items": recent}
        folds = [set(rng.choice(users, size=len(users) // 5, replace=False).tolist())]
        folds.append(set(rng.choice(sorted(set(users) - folds[0]), size=3, replace=False).tolist()))
        for split in (None, "leave-last-out"):
            assert co_watched(store, split=split, **options) == _co_watched_sql(store, split=split, **options)
            expected = [_co_watched_sql(store, split=split, exclude_users=f, **options) for f in folds]
            assert [co_watched(store, split=split, exclude_users=f, **options) for f in folds] == expected
            assert co_watched_folds(store, folds, split=split, **options) == expected
    store.close()


def test_lists_are_stored_per_events_version_and_split(tmp_path, monkeypatch, caplog):
    store = _random_store(tmp_path, 0)
    options = {"top": 3, "min_users": 2, "recent_items": 200}
    counts = tmp_path / "counts"
    counted = []
    real = cowatch._count
    monkeypatch.setattr(
        cowatch, "_count", lambda seen, folds, **kw: counted.append(folds) or real(seen, folds, **kw)
    )
    fold = {"u1", "u2", "u3"}
    first = cached_co_watched(store, counts, [(), fold], split="leave-last-out", **options)
    assert first == [
        _co_watched_sql(store, split="leave-last-out", **options),
        _co_watched_sql(store, split="leave-last-out", exclude_users=fold, **options),
    ]
    assert counted == [2] and len(list(counts.glob("cowatch-*.parquet"))) == 2  # both folds in one pass
    assert cached_co_watched(store, counts, [sorted(fold)], split="leave-last-out", **options) == first[1:]
    assert cached_co_watched(store, counts, split="leave-last-out", **options) == first[:1]
    assert counted == [2]  # read back, not counted again
    cached_co_watched(store, counts, split=None, **options)
    cached_co_watched(store, counts, split="leave-last-out", **{**options, "top": 4})
    assert counted == [2, 0, 0]
    # new events (or a split made again) are another version: counted again, never a stale read
    log = tmp_path / "more.csv"
    log.write_text("user_id,item_id,ts\nu1,i1,99\nu2,i1,99\nu3,i1,99\n")
    store.ingest(log, "events")
    again = cached_co_watched(store, counts, split=None, **options)
    assert counted == [2, 0, 0, 0] and again == [_co_watched_sql(store, **options)]
    store.split(SplitConfig(strategy="leave-last-out", min_events=3), RelevanceConfig())
    cached_co_watched(store, counts, split="leave-last-out", **options)
    assert counted[-1] == 0 and len(counted) == 5
    # a directory that cannot be written to: counted in memory, the failure only logged
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the directory should be")
    with caplog.at_level("DEBUG", logger="twostage.cowatch"):
        assert cached_co_watched(store, blocked, split=None, **options) == again
    assert "not stored" in caplog.text
    store.close()


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


def test_engine_reads_split_lists_in_evaluation_and_other_folds_in_training(tmp_path, tiny_bert_path):
    project = tmp_path / "project"
    Engine.init(project)
    (project / "twostage.toml").write_text(
        f'[retriever]\nmodel = "{tiny_bert_path}"\n'
        '[reranker]\nitem_template = "{title}. Watched with: {cowatched}"\ncowatched_size = 3\n'
    )
    engine = Engine.open(project)
    engine.datasets_load("movielens", make_movielens(tmp_path / "data", n_users=60))
    engine.split()
    engine.index_build()
    split = engine.default_split()
    served, held_out = engine.project.rerank_texts(), engine.project.rerank_texts(split)
    expected = _lists(engine.store, top=3, split=split)
    assert expected and all(len(ids) == 3 for ids in expected.values())
    catalogue = engine.project.catalogue()
    for item_id, ids in expected.items():
        titles = "; ".join(catalogue.title(i) for i in ids)
        assert held_out[item_id] == f"{catalogue.title(item_id)}. Watched with: {titles}"
    assert served != held_out  # serving counts every event, evaluation only those before the cut-offs
    assert engine.pipeline(split).counts.rerank_texts is None  # no reranker: nothing of stage 2 is counted
    assert engine.project.pipeline(split, all_counts=True).rerank_texts == held_out

    labelled = reranker_requests(engine.store, catalogue, engine.config, split=split, max_requests=30, seed=0)
    left_out: list[list[str]] = []

    def fold_texts(users):
        left_out.append(sorted(users))
        return {
            i: f"fold {len(left_out)}: {t}"
            for i, t in engine.project.rerank_texts(split, exclude_users=users).items()
        }

    pipe = engine.project.pipeline(split, all_counts=True)
    lists = training_lists(pipe, labelled, engine.config.reranker, fold_texts=fold_texts)
    folds = training_folds([x.user_id for x in labelled], DEFAULTS.cowatch_folds, DEFAULTS.seed)
    assert sorted(u for users in left_out for u in users) == sorted(folds)  # each user left out once
    owners: dict[str, set[str]] = {}
    for x in labelled:
        owners.setdefault(x.request.text, set()).add(x.user_id)
    assert lists
    for rl in lists:
        fold = int(rl.docs[0].split(":")[0].removeprefix("fold "))
        assert all(doc.startswith(f"fold {fold}: ") for doc in rl.docs)
        assert owners[rl.request] & set(left_out[fold - 1])  # read lists counted without its user
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
    engine.datasets_load("movielens", make_movielens(tmp_path / "data", n_users=60))
    engine.split()
    engine.train_retriever()
    engine.index_build()
    engine.train_reranker()
    record = json.loads((project / "models" / "reranker" / "training.json").read_text())
    assert record["train_lists"] > 0 and "fusion_weight" in record
    pipe = engine.pipeline(engine.default_split())
    assert pipe.rerank_texts == engine.project.rerank_texts(engine.default_split())
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
    engine.datasets_load("movielens", make_movielens(tmp_path / "data", n_users=60))
    engine.split()
    engine.train_retriever()
    engine.index_build()
    engine.train_reranker()
    engine.close()
    return project


def test_cowatch_scores_reorder_stage_one_without_the_cross_encoder(tmp_path, tiny_bert_path, monkeypatch):
    project = _trained_with_cowatch(tmp_path, tiny_bert_path)
    engine = Engine.open(project, overrides={"reranker.fusion_weight": 1.0, "reranker.cowatch_weight": 1.0})
    split = engine.default_split()
    assert engine.pipeline(split).counts.cowatched == _lists(
        engine.store, top=4, split=split
    )  # before cut-offs
    assert engine.pipeline().counts.cowatched == _lists(engine.store, top=4)  # serving: every event

    def forbidden(*_args, **_kwargs):
        raise AssertionError("the cross-encoder ran although its weight is 0")

    monkeypatch.setattr(engine.pipeline().reranker, "score", forbidden)
    users = sorted(engine.store.targets(split, "test"))[:12]
    rankings = {u: engine.recommend(u, k=12, explain=u == users[0]) for u in users}
    stage1 = {u: engine.recommend(u, k=12, stage="recall").item_ids() for u in users}
    assert any(rankings[u].item_ids() != stage1[u] for u in users)  # co-watch changed some orders
    for ranking in rankings.values():
        assert {h.stage for h in ranking.hits} == {"rerank"}
        assert all(h.rerank_score is None for h in ranking.hits)
    history = engine.store.histories([users[0]])[users[0]][:4]
    for hit in rankings[users[0]].hits:
        shared = shared_history(history, hit.item_id, engine.pipeline().counts.cowatched)
        assert [w["item_id"] for w in hit.explanation["watched_with"]] == shared
    recalled = engine.recommend(users[0], k=5, stage="recall", explain=True)
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
    settings = engine.pipeline().settings
    assert (settings.fusion_weight, settings.cowatch_weight) == (
        tuned["fusion_weight"],
        tuned["cowatch_weight"],
    )
    engine.close()
    # a configured weight is the one served: only the other is searched
    pinned = Engine.open(project, overrides={"reranker.fusion_weight": 0.25})
    assert {w for w, _, _ in pinned.train_reranker(tune_only=True)["weight_grid"]} == {0.25}
    # tuning scores the split's stage-2 texts, also when the project has no reranker to serve with
    engine = Engine.open(
        project,
        overrides={"reranker.item_template": "{title}. Watched with: {cowatched}", "reranker.enabled": False},
    )
    scored = []
    monkeypatch.setattr(
        Reranker, "score", lambda self, pairs, **kw: scored.extend(pairs) or np.zeros(len(pairs))
    )
    engine.train_reranker(tune_only=True)
    texts = set(engine.project.rerank_texts(engine.default_split()).values())
    assert scored and all(item in texts for _, item in scored)
    assert any("Watched with:" in item for _, item in scored)
    # a new split drops the lists counted under the old cut-offs
    engine.split()
    assert not [key for key in engine.project._memo._values if key[0] in ("cowatch", "rerank_texts")]
    shutil.rmtree(project / "models" / "reranker")
    with pytest.raises(NotFoundError, match="no trained reranker"):
        Engine.open(project).train_reranker(tune_only=True)


def test_tuning_scores_only_requests_in_reach_and_chooses_as_if_it_scored_all(
    tmp_path, tiny_bert_path, monkeypatch
):
    import twostage.tuning as tuning

    project = _trained_with_cowatch(tmp_path, tiny_bert_path)
    skipping = Engine.open(project).train_reranker(tune_only=True)
    monkeypatch.setattr(tuning, "_in_reach", lambda candidates, positives: True)
    everything = Engine.open(project).train_reranker(tune_only=True)
    # requests without a positive among their candidates were not scored, and nothing chosen changed
    assert 0 < skipping["pairs_scored"] < everything["pairs_scored"]
    assert np.allclose(np.asarray(skipping["weight_grid"]), np.asarray(everything["weight_grid"]))
    for key in ("depth_sweep", "fusion_weight", "cowatch_weight", "rerank_depth"):
        assert skipping[key] == pytest.approx(everything[key]), key
