"""A new user's search sequence through the CLI with default settings only (no twostage.toml edits):
init → datasets load beir → split → train retriever → index build → train reranker → evaluate.

Slow: it runs the default models (all-MiniLM-L6-v2 from the offline package) on a small BEIR-layout fixture.
"""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from twostage.cli import cli

TOPICS = {
    "cell": "cell division mitosis chromosome spindle",
    "heart": "cardiac arrest blood pressure artery",
    "brain": "neuron synapse cortex memory learning",
    "virus": "viral infection immune antibody vaccine",
    "gene": "gene expression transcription promoter enzyme",
    "bone": "bone density calcium vitamin fracture",
}


def _beir(root):
    """36 documents (6 topics × 6), 30 judged queries: 24 in train, 6 in test."""
    (root / "qrels").mkdir(parents=True)
    docs, queries, train, test = [], [], [], []
    for t, (topic, words) in enumerate(TOPICS.items()):
        vocab = words.split()
        for n in range(6):
            doc = f"{topic}-{n}"
            docs.append(
                {
                    "_id": doc,
                    "title": f"{topic} study {n}",
                    "text": f"{' '.join(vocab[n % 5 :])} {vocab[0]} trial {n}",
                }
            )
            if n < 5:
                query = f"q-{topic}-{n}"
                queries.append({"_id": query, "text": f"{vocab[(n + 1) % 5]} {topic} study {n}"})
                (test if t == 0 or n == 4 else train).append(f"{query}\t{doc}\t1\n")
    (root / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (root / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    (root / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(train))
    (root / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(test))
    return root


@pytest.mark.slow
def test_the_search_sequence_runs_with_default_settings(tmp_path):
    project = tmp_path / "p"

    def run(*args: str) -> dict | list:
        result = CliRunner().invoke(
            cli, ["-p", str(project), *args, "--json", "--quiet"], catch_exceptions=False
        )
        assert result.exit_code == 0, f"{args}: {result.output}"
        return json.loads(result.stdout)

    assert CliRunner().invoke(cli, ["init", str(project)]).exit_code == 0
    run("datasets", "load", "beir", str(_beir(tmp_path / "beir")))
    assert run("split") == {"test": 10, "train": 20}  # judgments and no events: the given split, unasked
    run("train", "retriever")
    run("index", "build")
    run("train", "reranker")
    report = run("evaluate")
    names = [row["name"] for row in report["rows"]]
    assert {"bm25", "recall", "rerank"} <= set(names)
    assert all(row["n_requests"] == 10 for row in report["rows"])
    found = run("search", "mitosis spindle", "-k", "3")
    assert len(found["hits"]) == 3
