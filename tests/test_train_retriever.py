"""Retriever fine-tuning on a tiny synthetic task: weights change, the best model is saved and measured right."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from conftest import _WORDS

from twostage.encoders import BiEncoder, model_fingerprint
from twostage.errors import ConfigError, InputError
from twostage.train.retriever import read_training_record, train_retriever

N = 16


@pytest.fixture(scope="module")
def model_path(tiny_bert_path) -> Path:
    return tiny_bert_path


@pytest.fixture(scope="module")
def task() -> dict:
    """Each request is one word; its relevant item is two other words: an arbitrary map a random model cannot know."""
    words = sorted(set(_WORDS))
    random.Random(0).shuffle(words)
    queries = {f"q{i}": words[i] for i in range(N)}
    corpus = {f"d{i}": f"{words[N + 2 * i]} {words[N + 2 * i + 1]}" for i in range(N)}
    relevant = {f"q{i}": {f"d{i}"} for i in range(N)}
    pairs = [(queries[f"q{i}"], corpus[f"d{i}"]) for i in range(N)]
    return {"pairs": pairs, "queries": queries, "corpus": corpus, "relevant": relevant}


def _recall_at(k: int, model_dir: Path, task: dict) -> float:
    """recall@k computed here with NumPy, independently of sentence-transformers' evaluator."""
    encoder = BiEncoder(model_dir, device="cpu")
    qids, dids = list(task["queries"]), list(task["corpus"])
    scores = (
        encoder.encode([task["queries"][q] for q in qids])
        @ encoder.encode([task["corpus"][d] for d in dids]).T
    )
    top = np.argsort(-scores, axis=1)[:, :k]
    hits = [
        len({dids[j] for j in row} & task["relevant"][q]) / len(task["relevant"][q])
        for q, row in zip(qids, top, strict=True)
    ]
    return float(np.mean(hits))


def test_training_changes_weights_saves_a_loadable_model_and_leaves_cwd_alone(
    tmp_path, monkeypatch, model_path, task
):
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    output_dir = tmp_path / "models" / "retriever"

    result = train_retriever(
        task["pairs"],
        base_model=model_path,
        output_dir=output_dir,
        batch_size=8,
        learning_rate=1e-3,
        epochs=2,
    )

    assert list(workdir.iterdir()) == []
    assert sorted(p.name for p in output_dir.parent.iterdir()) == ["retriever"]  # no temp or checkpoint dirs
    assert result.model_path == output_dir.resolve()
    assert result.steps == 4 and result.seconds > 0
    assert result.best_metric is None and dict(result.metrics) == {}

    base, tuned = BiEncoder(model_path, device="cpu"), BiEncoder(output_dir, device="cpu")
    assert tuned.fingerprint == result.fingerprint != base.fingerprint
    base_weights, tuned_weights = base.model.state_dict(), tuned.model.state_dict()
    assert any(not np.allclose(base_weights[k].numpy(), tuned_weights[k].numpy()) for k in base_weights)

    record = read_training_record(output_dir)
    assert record["base_fingerprint"] == base.fingerprint
    assert record["fingerprint"] == tuned.fingerprint
    assert record["config"]["learning_rate"] == 1e-3 and record["config"]["base_model"] == str(model_path)
    assert record["train_pairs"] == N and record["steps"] == 4 and record["validation"] is None


def test_validation_picks_best_model_and_records_recall(tmp_path, model_path, task):
    output_dir = tmp_path / "retriever"
    before = _recall_at(1, model_path, task)

    result = train_retriever(
        task["pairs"],
        base_model=model_path,
        output_dir=output_dir,
        val_queries=task["queries"],
        val_corpus=task["corpus"],
        val_relevant=task["relevant"],
        epochs=10,
        batch_size=8,
        learning_rate=3e-3,
        warmup_ratio=0.0,
        eval_k=1,
        patience=3,
    )

    after = _recall_at(1, output_dir, task)
    assert result.base_metrics["recall@1"] == pytest.approx(before)
    assert result.best_metric == pytest.approx(after)  # the saved model is the one that was measured
    assert after >= before + 0.25
    assert set(result.metrics) >= {"recall@1", "ndcg@10", "mrr@10"}
    record = json.loads((output_dir / "training.json").read_text())
    assert record["metrics"]["recall@1"] == pytest.approx(after)
    assert record["best_metric"] == pytest.approx(after)
    assert record["validation"] == {"queries": N, "corpus": N, "metric": "recall@1"}


def test_early_stopping_ends_training_when_recall_stalls(tmp_path, model_path, task):
    result = train_retriever(
        task["pairs"],
        base_model=model_path,
        output_dir=tmp_path / "retriever",
        val_queries=task["queries"],
        val_corpus=task["corpus"],
        val_relevant=task["relevant"],
        epochs=20,
        batch_size=8,
        learning_rate=1e-9,  # nothing improves, so the first evaluation stays best
        eval_k=1,
        eval_steps=1,
        patience=2,
    )
    assert result.steps == 3  # best at step 1, then two evaluations without improvement (40 steps otherwise)


def test_hard_negatives_never_include_known_positives(model_path):
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer

    from twostage.train.retriever import _mine

    positives = {"the heat": ["heat drama", "heat crime"], "toy story": ["toy story animation"]}
    others = ["space war", "love story", "city night", "drama heat crime", "comedy film"]
    anchors = [a for a, ps in positives.items() for _ in ps]
    dataset = Dataset.from_dict({"anchor": anchors, "positive": [p for ps in positives.values() for p in ps]})
    model = SentenceTransformer(str(model_path), device="cpu")
    mined = _mine(dataset, model, 2, others, 8, len(anchors))
    assert mined.column_names == ["anchor", "positive", "negative"]
    assert len(mined) > 0
    for anchor, negative in zip(mined["anchor"], mined["negative"], strict=True):
        assert negative not in positives[anchor]


def test_training_with_hard_negatives_runs(tmp_path, model_path, task):
    base = model_fingerprint(BiEncoder(model_path, device="cpu").model)
    result = train_retriever(
        task["pairs"],
        base_model=model_path,
        output_dir=tmp_path / "r",
        hard_negatives=1,
        batch_size=8,
        max_steps=2,
    )
    record = read_training_record(result.model_path)
    assert record["train_rows"] >= N // 2 and record["config"]["hard_negatives"] == 1
    assert result.steps == 2 and result.fingerprint != base


def test_retraining_replaces_the_output_dir(tmp_path, model_path, task):
    output_dir = tmp_path / "retriever"
    options = {"base_model": model_path, "output_dir": output_dir, "max_steps": 1, "warmup_ratio": 0.0}
    first = train_retriever(task["pairs"], seed=1, learning_rate=1e-4, **options)
    second = train_retriever(task["pairs"], seed=2, learning_rate=1e-3, **options)
    assert first.fingerprint != second.fingerprint
    assert BiEncoder(output_dir, device="cpu").fingerprint == second.fingerprint
    assert [p.name for p in tmp_path.iterdir()] == ["retriever"]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"train_pairs": []}, InputError, "no training pairs"),
        ({"train_pairs": [("a", 1)]}, InputError, r"train_pairs\[0\]"),
        ({"val_queries": {"q": "a"}}, InputError, "together"),
        (
            {"val_queries": {"q": "a"}, "val_corpus": {"d": "b"}, "val_relevant": {"q": {"x"}}},
            InputError,
            "no request",
        ),
        ({"batch_size": 1}, ConfigError, "retriever.train_batch_size"),
        ({"warmup_ratio": 1.5}, ConfigError, "retriever.warmup_ratio"),
        ({"epochs": 0}, ConfigError, "retriever.epochs"),
    ],
)
def test_bad_input_is_refused_before_loading_anything(tmp_path, kwargs, error, match):
    kwargs = {"train_pairs": [("a", "b")], **kwargs}
    with pytest.raises(error, match=match):
        train_retriever(base_model=tmp_path / "not-a-model", output_dir=tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_a_time_budget_cuts_the_steps_to_what_fits_and_records_the_plan(tmp_path, model_path, task, caplog):
    output_dir = tmp_path / "retriever"
    options = {"base_model": model_path, "output_dir": output_dir, "warmup_ratio": 0.0, "batch_size": 2}
    with caplog.at_level("INFO", logger="twostage.train.retriever"):
        result = train_retriever(task["pairs"], epochs=3, time_budget_seconds=1e-3, **options)
    budget = read_training_record(output_dir)["time_budget"]
    assert budget["planned_steps"] == 3 * -(-len(task["pairs"]) // 2) > budget["steps"] == result.steps == 1
    assert budget["step_seconds"] > 0 and budget["budget_seconds"] == 1e-3
    assert any(f"of {budget['planned_steps']} planned steps" in r.getMessage() for r in caplog.records)
    unbounded = train_retriever(task["pairs"], epochs=1, **{**options, "output_dir": tmp_path / "r2"})
    assert unbounded.steps == read_training_record(tmp_path / "r2")["time_budget"]["planned_steps"]
