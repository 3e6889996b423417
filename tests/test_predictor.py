"""The behaviour predictor: heads, training, ``predict``, its evaluation, and the random split (issue 20)."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import make_movielens

from twostage import Engine
from twostage.cli import cli
from twostage.errors import IndexMismatchError, NotFoundError
from twostage.outcomes import held_outcomes, train_outcomes
from twostage.prediction_eval import METRICS
from twostage.predictor import LISTNET, RATING, Biases, Predictor, build_net
from twostage.train.predictor import Examples, Lists, _Batches, _list_loss, _losses, oof_offsets

CONFIG = """
[retriever]
model = "{model}"
[reranker]
model = "{model}"
[split]
strategy = "ratio"
by = "{by}"
min_events = 3
[predictor]
model = "{model}"
tasks = {{ rating = 1.0, click = 1.0, listnet = 0.5 }}
list_size = 4
eval_lists = 20
max_length = 64
batch_size = 16
max_train_examples = 32
eval_examples = 32
eval_every = 4
learning_rate = 1e-4
bias_folds = 2
"""


def _project(tmp_path, tiny_bert_path, by: str = "time") -> Engine:
    root = tmp_path / "project"
    Engine.init(root)
    (root / "twostage.toml").write_text(CONFIG.format(model=tiny_bert_path, by=by))
    engine = Engine.open(root)
    data = make_movielens(tmp_path / "data", n_users=30)
    engine.datasets_load("movielens", data)
    rng = random.Random(1)
    clicks = ["user_id,item_id,ts"] + [
        f"{u},{rng.randint(1, 40)},{1_000_000 + u * 100 + 50 + t}" for u in range(1, 31) for t in range(3)
    ]
    (tmp_path / "clicks.csv").write_text("\n".join(clicks) + "\n")
    engine.ingest(tmp_path / "clicks.csv", "events", event="click")
    engine.split()
    return engine


def test_each_heads_loss_falls_after_one_step(tiny_bert_path):
    from transformers import AutoModel, AutoTokenizer

    torch.manual_seed(0)
    net = build_net(AutoModel.from_pretrained(str(tiny_bert_path)), (RATING, "click", LISTNET))
    predictor = Predictor(
        net,
        AutoTokenizer.from_pretrained(str(tiny_bert_path)),
        (RATING, "click", LISTNET),
        "rating",
        32,
        5,
        None,
    )
    ex = Examples(
        np.asarray(["u1", "u2", "u1", "u2"], dtype=object),
        np.asarray(["a", "b", "a", "b"], dtype=object),
        np.asarray([RATING, RATING, "click", "click"], dtype=object),
        np.asarray([4.5, 1.0, 1.0, 0.0]),
        np.asarray([3.0, 3.0, 0.0, 0.0]),
    )
    batches = _Batches(
        {"u1": [("b", "rating", 5.0)], "u2": [("a", "rating", 1.0)]},
        {"a": "toy story", "b": "heat"},
        {"a": "toy story animation", "b": "heat crime"},
        "rating",
        5,
    )
    lists = Lists(np.asarray(["u1", "u2"], dtype=object), np.asarray([["a", "b"], ["b", "a"]], dtype=object))

    def losses() -> dict:
        return {**_losses(predictor, batches, ex), LISTNET: _list_loss(predictor, batches, lists)}

    net.eval()  # no dropout: the same batch before and after the step
    before = {t: float(v.detach()) for t, v in losses().items()}
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05)
    loss = sum(losses().values())
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    after = {t: float(v.detach()) for t, v in losses().items()}
    assert set(before) == {RATING, "click", LISTNET}
    assert all(after[t] < before[t] for t in before), (before, after)


def test_out_of_fold_biases_never_see_their_own_rating():
    rng = np.random.default_rng(0)
    users = np.asarray([f"u{n % 6}" for n in range(40)], dtype=object)
    items = np.asarray([f"i{n % 7}" for n in range(40)], dtype=object)
    values = rng.integers(1, 6, size=40).astype(float)

    def offsets(v: np.ndarray) -> np.ndarray:
        ex = Examples(users, items, np.full(40, RATING, dtype=object), v, np.zeros(40))
        return oof_offsets(ex, folds=3, seed=0)[0]

    base = offsets(values)
    for j in (0, 17, 33):  # a rating's own value never moves its offset; the in-sample biases would
        changed = values.copy()
        changed[j] = 6.0 - values[j] + 10.0
        assert offsets(changed)[j] == pytest.approx(base[j])
        assert not np.allclose(offsets(changed), base)
    full = Biases.fit(users, items, values)
    moved = values.copy()
    moved[0] += 10.0
    assert Biases.fit(users, items, moved).predict(users[:1], items[:1])[0] != pytest.approx(
        full.predict(users[:1], items[:1])[0]
    )


def test_biases_round_trip(tmp_path):
    b = Biases(3.5, {"u": 0.25}, {"a": -0.5})
    b.save(tmp_path / "b.npz")
    assert Biases.load(tmp_path / "b.npz") == b
    assert b.predict(["u", "new"], ["a", "other"]).tolist() == [3.25, 3.5]


def test_random_split_holds_out_events_and_trains_on_every_other_one(tmp_path, tiny_bert_path):
    engine = _project(tmp_path, tiny_bert_path, by="event")
    store = engine.store
    total = store.count("events")
    train = train_outcomes(store, "ratio")
    held = {
        (u, i, e)
        for part in ("valid", "test")
        for u, i, e in zip(
            *(lambda o: (o.users, o.items, o.events))(held_outcomes(store, part=part, split="ratio")),
            strict=True,
        )
    }
    n_held = store.sql("SELECT count(*) FROM splits WHERE split = 'ratio'")[1][0][0]
    assert len(train) + n_held == total  # every event is either held out or trains
    assert 0.15 < n_held / total < 0.45
    # a held-out event is never the same event as a training one
    trained = set(zip(train.users, train.items, train.events, strict=True))
    assert not any(key in trained for key in held if key[2] == "rating")


def test_train_predict_evaluate_and_reload(tmp_path, tiny_bert_path):
    engine = _project(tmp_path, tiny_bert_path)
    record = engine.train_predictor()
    assert record["targets"] == [RATING, "click", LISTNET] and record["residual"]
    assert record["steps"] >= 1 and set(record["valid_at_start"]) == {RATING, "click", LISTNET}

    user = engine.store.sql("SELECT user_id FROM events LIMIT 1")[1][0][0]
    predicted = engine.predict(user, ["1", "2"])
    assert set(predicted) == {RATING, "click", LISTNET}
    assert all(0.0 < p < 1.0 for p in predicted["click"])
    assert all(0.0 < r < 6.0 for r in predicted[RATING])
    anonymous = engine.predict(history=[("1", 5.0), "2"], item_ids=["3"])
    assert len(anonymous[RATING]) == 1

    # the saved model gives the same predictions after a reload
    reloaded = Predictor.load(engine.project.models_dir("predictor"))
    engine.project.changed("models")
    assert engine.project.predictor() is not reloaded
    assert engine.predict(user, ["1", "2"]) == predicted

    result = engine.evaluate_predictions()
    names = {(r["name"], r["target"]) for r in result["rows"]}
    assert {
        ("predictor", RATING),
        ("global-mean", RATING),
        ("biases", RATING),
        ("biased-mf", RATING),
    } <= names
    assert {("predictor", "click"), ("base-rate", "click"), ("popularity", "click")} <= names
    assert {("predictor", LISTNET), ("popularity", LISTNET)} <= names
    assert all(math.isfinite(r.get("RMSE", 0.0)) for r in result["rows"])
    assert {(c["a"], c["target"]) for c in result["comparisons"]} == {
        ("global-mean", RATING),
        ("biases", RATING),
        ("biased-mf", RATING),
        ("base-rate", "click"),
        ("popularity", LISTNET),
    }
    stored = engine.store.sql("SELECT count(*) FROM metrics WHERE run_id = ?", [result["run_id"]])[1][0][0]
    assert stored == sum(len([m for m in METRICS if m in r]) for r in result["rows"])
    engine.close()


def test_predict_errors_are_one_line(tmp_path, tiny_bert_path):
    engine = _project(tmp_path, tiny_bert_path)
    with pytest.raises(NotFoundError, match="no behaviour predictor"):
        engine.predict("1", ["1"])
    root = engine.project.root
    engine.close()
    misspelt = Engine.open(root, overrides={"predictor.tasks": {"rating": 1.0, "clik": 1.0}})
    with pytest.raises(NotFoundError, match=r"no 'clik' events .* \(event types there: click, rating\)"):
        misspelt.train_predictor()
    misspelt.close()
    engine = Engine.open(root)
    engine.train_predictor()
    with pytest.raises(NotFoundError, match="unknown user 'nobody'") as e:
        engine.predict("nobody", ["1"])
    assert "\n" not in str(e.value)
    with pytest.raises(NotFoundError, match="unknown item 'nothing'") as e:
        engine.predict("1", ["1", "nothing"])
    assert "\n" not in str(e.value)
    root = str(engine.project.root)
    engine.close()
    runner = CliRunner()
    bad = runner.invoke(cli, ["-p", root, "predict", "1", "--item", "nothing"])
    assert bad.exit_code == 1, bad.output
    assert (
        bad.output.strip().splitlines()[-1]
        == "Error: unknown item 'nothing' (not in the items table); check the id"
    ), bad.output
    good = runner.invoke(cli, ["-p", root, "predict", "1", "--item", "1", "--json"])
    assert good.exit_code == 0, good.output
    assert set(json.loads(good.output)) == {"items", RATING, "click", LISTNET}
    history = runner.invoke(cli, ["-p", root, "predict", "--history", "1:5,2", "--item", "3", "--json"])
    assert history.exit_code == 0, history.output
    report = tmp_path / "predictions.html"
    scored = runner.invoke(cli, ["-p", root, "evaluate", "--predictions", "--report", str(report), "--json"])
    assert scored.exit_code == 0, scored.output
    rows = json.loads(scored.output)["rows"]
    assert {r["name"] for r in rows} >= {"predictor", "biases", "biased-mf", "global-mean"}
    page = report.read_text()
    assert "prediction evaluation" in page and "biased-mf" in page and "data:image/png;base64" in page


def test_a_changed_file_is_refused_on_load(tmp_path, tiny_bert_path):
    engine = _project(tmp_path, tiny_bert_path)
    path, root = engine.project.models_dir("predictor"), str(engine.project.root)
    engine.close()
    trained = CliRunner().invoke(cli, ["-p", root, "train", "predictor", "--json"])
    assert trained.exit_code == 0, trained.output
    assert json.loads(trained.output)["targets"] == [RATING, "click", LISTNET]
    human = CliRunner().invoke(cli, ["-p", root, "train", "predictor", "-q"])
    assert human.exit_code == 0 and "list cross-entropy" in human.output and "RMSE" in human.output
    with open(path / "heads.pt", "ab") as f:
        f.write(b"x")
    with pytest.raises(IndexMismatchError, match=r"heads\.pt"):
        Predictor.load(path)


def test_recommend_blends_expected_ratings_on_the_one_ranking_path(tmp_path, tiny_bert_path, monkeypatch):
    from conftest import make_served_project

    from twostage import experiment, snapshot

    monkeypatch.setattr(experiment, "COLD_USERS", 3)
    extra = (
        f'[predictor]\nmodel = "{tiny_bert_path}"\nmax_length = 64\nmax_train_examples = 64\neval_examples = 16\n'
        "eval_every = 2\nbias_folds = 2\nrecommend_weight = 1.0\nrecommend_depth = 6\n"
    )
    project = make_served_project(tmp_path, tiny_bert_path, extra)
    engine = Engine.open(project)
    plain = engine.recommend("1", k=10).item_ids()
    engine.train_predictor()
    pipe = engine.pipeline()
    assert pipe.predictor is not None and pipe.counts.ratings is not None
    blended = engine.recommend("1", k=10)
    # with weight 1 the top 6 are the plain top 6 ordered by expected rating; the rest keeps its order
    assert sorted(blended.item_ids()[:6]) == sorted(plain[:6]) and blended.item_ids()[6:] == plain[6:]
    history = engine.store.histories(["1"])["1"]
    rated = pipe.counts.ratings["1"]
    expected = pipe.predictor.expected_ratings(
        "1", [(i, rated.get(i, math.nan)) for i in history], plain[:6], pipe.catalogue
    )
    by_rating = [plain[n] for n in sorted(range(6), key=lambda n: -expected[n])]
    assert blended.item_ids()[:6] == by_rating
    # evaluate scores exactly what recommend returns at the split's cut-off
    split = engine.default_split()
    report = engine.evaluate(baselines=False)
    _, stored = engine.store.sql(
        "SELECT request_id, item_id FROM results WHERE run_id = ? AND stage = 'rerank' ORDER BY request_id, rank",
        [report.extra["run_id"]],
    )
    user = stored[0][0]
    assert engine.recommend(user, k=len([1 for u, _ in stored if u == user]), split=split).item_ids() == [
        i for u, i in stored if u == user
    ]
    # and a published snapshot serves the same blend
    engine.publish()
    served = snapshot.load(project)
    assert served.pipeline.predictor is not None
    theirs = served.pipeline.rank([served.pipeline.user_request("1", served.history("1"))], 10)[0]
    assert theirs.item_ids() == blended.item_ids()
    engine.close()


def test_the_server_predicts_what_the_library_predicts(tmp_path, tiny_bert_path):
    from conftest import make_served_project
    from fastapi.testclient import TestClient

    from twostage.serve import create_app

    extra = (
        f'[predictor]\nmodel = "{tiny_bert_path}"\nmax_length = 64\nmax_train_examples = 32\neval_examples = 16\n'
        "eval_every = 2\nbias_folds = 2\n[serve]\nmax_k = 5\n"
    )
    project = make_served_project(tmp_path, tiny_bert_path, extra)
    engine = Engine.open(project)
    engine.train_predictor()
    ours = engine.predict("1", ["1", "2"])
    anonymous = engine.predict(history=[("1", 4.0), "3"], item_ids=["2"])
    engine.publish()
    engine.close()
    with TestClient(create_app(project)) as client:
        answer = client.post("/predict", json={"user_id": "1", "items": ["1", "2"]})
        assert answer.status_code == 200, answer.text
        assert answer.json()[RATING] == ours[RATING] and answer.json()["items"] == ["1", "2"]
        session = client.post("/predict", json={"history": [["1", 4.0], "3"], "items": ["2"]})
        assert session.status_code == 200 and session.json()[RATING] == anonymous[RATING]
        for body, status, message in (
            ({"user_id": "1", "items": ["nothing"]}, 404, "unknown item 'nothing'"),
            ({"user_id": "nobody", "items": ["1"]}, 404, "unknown user 'nobody'"),
            ({"user_id": "1", "history": ["1"], "items": ["1"]}, 422, "either user_id or history"),
            ({"user_id": "1", "items": [str(i) for i in range(6)]}, 413, "at most 5"),
            ({"user_id": "1", "items": []}, 400, "at least one item"),
        ):
            bad = client.post("/predict", json=body)
            assert bad.status_code == status and message in bad.json()["error"], bad.text


def test_the_demo_reports_the_predictor_against_its_baselines():
    from twostage.demo import _prediction_lines

    scored = {
        "rows": [
            {"name": "biases", "target": RATING, "n": 50, "RMSE": 0.95},
            {"name": "predictor", "target": RATING, "n": 50, "RMSE": 0.91},
        ],
        "comparisons": [
            {
                "a": "biases",
                "target": RATING,
                "diff": -0.07,
                "ci_low": -0.1,
                "ci_high": -0.01,
                "p_value": 0.02,
            }
        ],
    }
    lines = _prediction_lines({"steps": 12, "stopped": "time budget"}, scored)
    assert lines[0].startswith(
        "Behaviour predictor (12 steps, time budget): test RMSE on 50 held-out ratings"
    )
    assert "biases 0.9500, predictor 0.9100" in lines[0]
    assert lines[1] == "predictor vs biases: MSE -0.0700 (95% CI [-0.1000, -0.0100], p = 0.02, paired)"
