"""Hybrid stage 1: BM25 fused with the bi-encoder (a convex combination of normalised scores, or RRF), its
weight chosen on validation, served by every path that ranks."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from fakes import FakeReranker, movie_titles, pipeline

from twostage.baselines import BM25
from twostage.cli import cli
from twostage.config import RetrieverConfig
from twostage.errors import ConfigError
from twostage.ranker import fuse_channels
from twostage.requests import Request
from twostage.tuning import choose_lexical_weight

ITEMS = movie_titles()


def _bm25(pipe) -> BM25:
    cat = pipe.catalogue
    return BM25(cat.item_ids, [cat.text(i) for i in cat.item_ids])


def test_convex_fusion_normalises_each_channel_and_counts_a_missing_item_as_its_worst():
    fused = dict(fuse_channels([("a", 0.9), ("b", 0.5)], [("b", 7.0), ("c", 3.0), ("d", 1.0)], weight=0.25))
    assert fused == pytest.approx({"a": 0.75, "b": 0.25, "c": 0.25 * 2 / 6, "d": 0.0})
    rrf = dict(fuse_channels([("a", 0.9), ("b", 0.5)], [("b", 7.0)], weight=0.5, method="rrf"))
    assert rrf == pytest.approx({"a": 0.5 / 61, "b": 0.5 / 62 + 0.5 / 61})
    with pytest.raises(ConfigError, match="lexical_fusion"):
        fuse_channels([], [], weight=0.5, method="max")


def test_hybrid_recall_is_the_fused_union_of_both_channels_without_excluded_items():
    dense = pipeline(ITEMS, recall_depth=10)
    lexical = _bm25(dense)
    hybrid = dense.replace(lexical=lexical).with_settings(lexical_weight=0.5)
    request = Request("q", "saga 17 crime", exclude=frozenset({"m1"}))
    got = hybrid.rank([request], 10, stage="recall")[0]
    d = dense.index.search(dense.encoder.encode([request.text]), 10, exclude=[request.exclude])[0]
    lex = [(i, s) for i, s in lexical.search([request.text], k=11)[0] if i != "m1"][:10]
    expected = fuse_channels(d, lex, weight=0.5)[:10]
    assert [(h.item_id, round(h.score, 9)) for h in got.hits] == [(i, round(s, 9)) for i, s in expected]
    assert "m17" in got.item_ids()  # BM25's best (the title number), below the dense top 10
    assert "m17" not in dense.rank([request], 10, stage="recall")[0].item_ids()
    assert "m1" not in got.item_ids()
    # weight 0 (or no channel) is the dense ranking, and a stage-2 ranking reorders the hybrid candidates
    assert hybrid.with_settings(lexical_weight=0.0).rank([request], 10, stage="recall")[0].item_ids() == [
        i for i, _ in sorted(d, key=lambda x: (-x[1], x[0]))
    ]
    reranked = hybrid.replace(reranker=FakeReranker()).with_settings(rerank_depth=10).rank([request], 10)[0]
    assert set(reranked.item_ids()) == set(got.item_ids())


def test_the_weight_is_chosen_on_validation_and_stays_zero_where_bm25_does_not_help():
    dense = pipeline(ITEMS, recall_depth=20)
    lexical = _bm25(dense)
    cfg = RetrieverConfig(lexical_grid=(0.0, 0.3, 0.7))
    # targets named by an exact title number: only the lexical channel ranks them first
    by_number = [Request(f"q{i}", f"film {i}") for i in range(10, 40, 3)]
    judged = [{f"m{i}": 1.0} for i in range(10, 40, 3)]
    chosen = choose_lexical_weight(dense, lexical, by_number, judged, cfg)
    assert chosen["lexical_weight"] > 0.0
    assert chosen["lexical_sweep"][chosen["lexical_weight"]] > chosen["lexical_sweep"][0.0]
    # targets the dense channel already ranks first: nothing to gain, so no BM25
    stage1 = dense.rank(by_number, 1, stage="recall")
    own = [{r.item_ids()[0]: 1.0} for r in stage1]
    assert choose_lexical_weight(dense, lexical, by_number, own, cfg)["lexical_weight"] == 0.0


def _search_project(root, tiny_bert_path):
    """A search project on which only words match: each query names its document's code word, which the tiny
    random BERT cannot see and BM25 can. 60 documents, 40 judged queries (a tenth held out for validation)."""
    from twostage import Engine

    words = ("alpha", "bravo", "delta", "echo", "foxtrot", "golf", "hotel", "india", "kilo", "lima")
    folder = root / "beir"
    (folder / "qrels").mkdir(parents=True)
    docs = [
        {
            "_id": f"d{n}",
            "title": f"report {words[n % 10]}{n}",
            "text": f"{words[(n * 3) % 10]} notes code{n}x",
        }
        for n in range(60)
    ]
    (folder / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    queries = [{"_id": f"q{n}", "text": f"where is code{n}x"} for n in range(60)]
    (folder / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    (folder / "qrels" / "train.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"q{n}\td{n}\t1\n" for n in range(40))
    )
    (folder / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"q{n}\td{n}\t1\n" for n in range(40, 60))
    )
    project = root / "project"
    Engine.init(project)
    (project / "twostage.toml").write_text(
        f'[retriever]\nmodel = "{tiny_bert_path}"\n[reranker]\nmodel = "{tiny_bert_path}"\nepochs = 1\n'
        "depth = 10\nlist_size = 4\n[index]\ndepth = 20\n[eval]\nks = [10]\nbootstrap = 50\n"
    )
    with Engine.open(project) as engine:
        engine.datasets_load("beir", folder)
        engine.split()
        engine.index_build()
    return project


def test_train_reranker_chooses_hybrid_recall_and_every_path_serves_it(tmp_path, tiny_bert_path):
    from twostage import Engine
    from twostage import snapshot as snapshots

    project = _search_project(tmp_path, tiny_bert_path)
    with Engine.open(project) as engine:
        engine.train_reranker()
        record = engine.project.reranker_record()
        assert record["lexical_weight"] > 0.0  # validation queries are found by BM25 only
        assert record["lexical_sweep"]["0.0"] < record["lexical_sweep"][str(record["lexical_weight"])]
        pipe = engine.project.pipeline()
        assert pipe.hybrid and pipe.settings.lexical_weight == record["lexical_weight"]
        # [reranker] max_length unset: sized from the (short) training pairs, stored, and served with
        assert record["max_length"] == 64 and pipe.reranker.max_length == 64
        # both stored with the run, as chosen from the data
        (config,) = engine.sql("SELECT config FROM runs WHERE kind = 'train-reranker'")[1][0]
        assert json.loads(config)["resolved"] == {
            "reranker.max_length": 64,
            "retriever.lexical_weight": record["lexical_weight"],
        }
        found = engine.search("where is code45x", k=5, stage="recall", explain=True)
        assert found.item_ids()[0] == "d45"
        channels = found.hits[0].explanation["channels"]  # the parts of the fused stage-1 score
        assert channels["bm25"] == max(h.explanation["channels"]["bm25"] for h in found.hits) > 0
        assert channels["lexical_weight"] == record["lexical_weight"]
        report = engine.evaluate()
        rows = {r.name: r for r in report.rows}
        assert {"bm25", "recall-dense", "recall", "rerank"} <= set(rows)
        assert rows["recall"].means["nDCG@10"] > rows["recall-dense"].means["nDCG@10"]
        assert any(c["a"] == "recall-dense" and c["b"] == "recall" for c in report.comparisons)
        engine.publish()
    served = snapshots.load(project).pipeline
    assert served.hybrid and served.settings.lexical_weight == record["lexical_weight"]
    assert served.reranker.max_length == 64
    query = [Request("q", "where is code45x")]
    assert served.rank(query, 10, stage="recall")[0].hits == pipe.rank(query, 10, stage="recall")[0].hits
    shown = CliRunner().invoke(
        cli, ["-p", str(project), "search", "where is code45x", "--stage", "recall", "--explain"]
    )
    assert shown.exit_code == 0 and "recall channels: dense" in shown.output and "bm25 weight" in shown.output


def test_a_configured_weight_is_served_without_tuning(tmp_path, tiny_bert_path):
    from twostage import Engine

    project = _search_project(tmp_path, tiny_bert_path)
    with Engine.open(project, overrides={"retriever.lexical_weight": 0.0}) as engine:
        engine.train_reranker()
        assert "lexical_weight" not in engine.project.reranker_record()
        assert not engine.project.pipeline().hybrid
    with Engine.open(project, overrides={"retriever.lexical_weight": 0.4}) as engine:
        assert engine.project.pipeline().settings.lexical_weight == 0.4


def test_hybrid_keeps_a_top_k_the_head_of_longer_lists_and_returns_only_indexed_items():
    dense = pipeline(ITEMS, recall_depth=8)
    hybrid = dense.replace(lexical=_bm25(dense)).with_settings(lexical_weight=0.5)
    request = Request("q", "saga 17 crime war")
    lists = {k: hybrid.rank([request], k, stage="recall")[0].item_ids() for k in (3, 8, 20, 40)}
    for short, long in ((3, 8), (8, 20), (20, 40)):
        assert lists[long][:short] == lists[short]
    # an item BM25 ranks first but the index no longer holds is never returned (nor diversified, nor explained)
    gone = hybrid.replace(lexical=hybrid.lexical)
    gone.index.remove(["m17"])
    ranked = gone.rank([request], 10, stage="recall", diversify=0.5, explain=True)[0]
    assert "m17" not in ranked.item_ids() and len(ranked.hits) == 10
