"""Speed against the plain sentence-transformers pipeline, in the same process on the same models (issue 7).

The plain pipeline is what users write by hand: ``SentenceTransformer.encode`` + ``faiss.IndexFlatIP`` +
``CrossEncoder.predict`` on every one of the 100 candidates, then the same score fusion with the stage-1 score
that ours applies (the model's tuned fusion weight), so both rank by the same rule and only the work differs.
Ours is ``Engine.search``/``recommend`` with the rerank depth chosen on validation (the smallest depth whose
nDCG@10 is within 1% of reranking all 100, as the engine chooses): for search on plain's candidates, which are
ours too; for recommendation the depth the engine chose at training (ours adds the popularity prior).

1. search latency (SciFact test queries, stage-1 depth 100 → top 10): p50/p99, nDCG@10 of both
2. recommendation latency (ml-latest-small users): p50/p99, nDCG@10 of both
3. batch throughput (requests/s) when evaluating: ours batches across requests
4. index build: items/s, encode + index, ours (cold cache) vs plain; incremental 1% update vs full rebuild
5. the ceiling: measured GEMM GFLOP/s on reranker-shaped matrices and FLOPs per reranked pair

Needs the projects left by ``bench_quality.py scifact`` and ``bench_quality.py movielens``.
Usage: python tools/bench/bench_latency.py [--queries 60]  → tools/bench/results/latency.json
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import RESULTS, percentiles, repeat, write

from twostage import Engine
from twostage.cowatch import shared_history
from twostage.metrics import mean_metric
from twostage.ranker import Candidate, fuse
from twostage.requests import Request
from twostage.tuning import shallowest_depth

BENCH = Path(tempfile.gettempdir()) / "twostage-bench"
DEPTH = 100
K = 10


def ndcg10(rankings: list[list[str]], targets: list[dict[str, float]]) -> float:
    return mean_metric(rankings, targets, "ndcg", K)


class Plain:
    """The hand-written glue: encode, exact inner-product search, cross-encode every candidate, then the same
    fusion as ours (the tuned fusion and co-watch weights, the same stage-2 item texts)."""

    def __init__(self, engine: Engine, split: str | None = None):
        import faiss

        settings, project = engine.pipeline().settings, engine.project
        self.fusion_weight = settings.fusion_weight
        self.cowatch_weight = settings.cowatch_weight
        self.cowatched = project.cowatch_lists(split) if self.cowatch_weight > 0 else {}
        self.history_size = engine.config.text.history_size
        self.depth_tolerance = engine.config.reranker.depth_tolerance
        self.texts = project.rerank_texts(split)
        from sentence_transformers import CrossEncoder, SentenceTransformer

        self.catalogue = project.catalogue()
        self.ids = self.catalogue.item_ids
        self.bi = SentenceTransformer(str(project.models_dir("retriever")), device="cpu")
        self.ce = CrossEncoder(str(project.models_dir("reranker")), device="cpu")
        # item vectors from the same fine-tuned model (query latency does not include building the index)
        vecs = project.index().vectors(self.ids)
        self.index = faiss.IndexFlatIP(vecs.shape[1])
        self.index.add(np.ascontiguousarray(vecs, dtype=np.float32))

    def candidates(self, request: Request) -> list[Candidate]:
        qv = self.bi.encode([request.text], normalize_embeddings=True)
        exclude, recent = request.exclude, request.history[: self.history_size]
        scores, rows = self.index.search(np.ascontiguousarray(qv, dtype=np.float32), DEPTH + len(exclude))
        found = [
            Candidate(i, float(s), len(shared_history(recent, i, self.cowatched)))
            for i, s in ((self.ids[r], s) for r, s in zip(rows[0], scores[0], strict=True) if r >= 0)
            if i not in exclude
        ]
        return found[:DEPTH]

    def rerank_scores(self, text: str, cands: list[Candidate]) -> np.ndarray:
        return np.asarray(self.ce.predict([(text, self.texts[c.item_id]) for c in cands], batch_size=32))

    def order(self, cands: list[Candidate], scores: np.ndarray, depth: int) -> list[str]:
        """Fuse the top ``depth`` candidates' scores (the rest keep stage-1 order below them)."""
        weights = {"fusion_weight": self.fusion_weight, "cowatch_weight": self.cowatch_weight}
        head = fuse(cands[:depth], scores[:depth], k=depth, **weights)
        return ([h.item_id for h in head] + [c.item_id for c in cands[depth:]])[:K]

    def query(self, request: Request) -> list[str]:
        cands = self.candidates(request)
        return self.order(cands, self.rerank_scores(request.text, cands), DEPTH)


def choose_depth(plain: Plain, requests: list[Request], targets: list[dict[str, float]]) -> dict[str, Any]:
    """Score each validation request's 100 candidates once; nDCG@10 at depth d reranks only the top d."""
    per_request = []
    for request in requests:
        cands = plain.candidates(request)
        per_request.append((cands, plain.rerank_scores(request.text, cands)))
    table = {}
    for d in (10, 15, 20, 30, 50, 100):
        table[d] = ndcg10([plain.order(cands, scores, d) for cands, scores in per_request], targets)
    chosen = shallowest_depth(table, 100, plain.depth_tolerance)
    return {"ndcg_by_depth": table, "chosen": chosen}


def latency_pair(engine: Engine, plain: Plain, requests: list[Request], serve: Any) -> dict[str, Any]:
    """Per-request wall time, ours and plain, interleaved so load drifts hit both alike."""
    ours_t, plain_t, ours_lists, plain_lists = [], [], [], []
    for request in requests:
        started = time.perf_counter()
        ours_lists.append(serve(request))
        ours_t.append(time.perf_counter() - started)
        started = time.perf_counter()
        plain_lists.append(plain.query(request))
        plain_t.append(time.perf_counter() - started)
    ours, base = percentiles(ours_t), percentiles(plain_t)
    return {
        "ours_seconds": ours,
        "plain_seconds": base,
        "ratio_p50": ours["p50"] / base["p50"],
        "ratio_p99": ours["p99"] / base["p99"],
        "ours_lists": ours_lists,
        "plain_lists": plain_lists,
    }


def search_bench(n_queries: int, n_valid: int) -> dict[str, Any]:
    from twostage.train.examples import _validation_queries

    engine = Engine.open(BENCH / "scifact")
    plain = Plain(engine)
    store = engine.store
    # depth from held-out validation queries (never the test queries)
    val_targets, _ = _validation_queries(store, "given", engine.config.retriever.seed)
    val_ids = sorted(val_targets)[:n_valid]
    texts = store.query_texts(val_ids)
    depth = choose_depth(plain, [Request(q, texts[q]) for q in val_ids], [val_targets[q] for q in val_ids])
    engine = Engine.open(
        BENCH / "scifact", overrides={"reranker.serve_depth": depth["chosen"], "index.depth": DEPTH}
    )
    test = store.targets("given", "test")
    ids = sorted(test)
    random.Random(0).shuffle(ids)
    ids = ids[:n_queries]
    qtexts = store.query_texts(ids)
    reqs = [Request(q, qtexts[q]) for q in ids]
    engine.search(qtexts[ids[0]], K)  # warm-up both
    plain.query(reqs[0])
    out = latency_pair(engine, plain, reqs, lambda r: engine.search(r.text, K).item_ids())
    targets = [test[q] for q in ids]
    out["ours_ndcg10"] = ndcg10(out.pop("ours_lists"), targets)
    out["plain_ndcg10"] = ndcg10(out.pop("plain_lists"), targets)
    out["depth_selection"] = depth
    out["queries"] = len(ids)
    # batch throughput: ours reranks all requests' pairs in one batched pass; plain loops per query
    pipe = engine.pipeline()
    ours_batch = repeat(lambda: pipe.rank(reqs, K), 1)[0]
    out["throughput"] = {
        "ours_requests_per_s": len(reqs) / ours_batch,
        "plain_requests_per_s": 1.0 / out["plain_seconds"]["median"],
    }
    out["throughput"]["ratio"] = (
        out["throughput"]["ours_requests_per_s"] / out["throughput"]["plain_requests_per_s"]
    )
    return out


def recommend_bench(n_users: int) -> dict[str, Any]:
    from twostage.requests import split_requests

    engine = Engine.open(BENCH / "movielens")
    plain = Plain(engine, "leave-last-out")  # co-watch lists counted before the cut-offs, as ours
    store = engine.store
    # ours as served: the popularity prior and the rerank depth chosen on the validation users by
    # bench_quality.py (plain has no prior, so a depth chosen on plain's candidates would not be ours)
    prior = json.loads((RESULTS / "quality_movielens.json").read_text())["popularity_prior"]["best"]
    engine = Engine.open(
        BENCH / "movielens", overrides={"index.depth": DEPTH, "retriever.popularity_weight": prior}
    )
    pipe = engine.pipeline("leave-last-out")  # popularity and co-watch counted before the test cut-off
    depth = {"chosen": pipe.settings.rerank_depth, "from": "models/reranker/training.json (validation users)"}
    test = split_requests(store, pipe.catalogue, engine.config.text, split="leave-last-out", part="test")
    random.Random(0).shuffle(test)
    test = test[:n_users]
    tt = store.targets("leave-last-out", "test")
    # serving uses the user's whole history; for a held-out measurement we serve the test-time context, as
    # engine.recommend(user, split="leave-last-out") does

    def serve(request: Request) -> list[str]:
        return pipe.rank([request], K)[0].item_ids()

    serve(test[0])
    plain.query(test[0])
    out = latency_pair(engine, plain, test, serve)
    targets = [tt[r.request_id] for r in test]
    out["ours_ndcg10"] = ndcg10(out.pop("ours_lists"), targets)
    out["plain_ndcg10"] = ndcg10(out.pop("plain_lists"), targets)
    out["depth_selection"] = depth
    out["users"] = len(test)
    out["ours_popularity_prior"] = prior
    out["fusion_weight"] = pipe.settings.fusion_weight
    out["cowatch_weight"] = pipe.settings.cowatch_weight
    return out


def learned_recommend_bench(project: Path, n_users: int) -> dict[str, Any]:
    """``recommend`` with the learned stage 2 (EASE channel + LightGBM over features, no cross-encoder) against
    stage 1 alone on the same pipeline, interleaved per request, on test users at their test cut-off."""
    from twostage.requests import split_requests

    prior = json.loads((project / "prior.json").read_text())["best"]
    engine = Engine.open(project, overrides={"retriever.popularity_weight": prior})
    pipe = engine.pipeline("leave-last-out")  # the log counted before the cut-offs, as evaluated
    if pipe.learned is None:
        raise SystemExit(f"{project} has no learned ranker: run bench_quality.py movielens first")
    test = split_requests(
        engine.store, pipe.catalogue, engine.config.text, split="leave-last-out", part="test"
    )
    random.Random(0).shuffle(test)
    test = test[:n_users]
    targets = engine.store.targets("leave-last-out", "test")
    full_t, recall_t, full_lists, recall_lists = [], [], [], []
    pipe.rank(test[:2], K)  # warm: models loaded, first-call allocations done
    for request in test:
        started = time.perf_counter()
        full_lists.append(pipe.rank([request], K)[0].item_ids())
        full_t.append(time.perf_counter() - started)
        started = time.perf_counter()
        recall_lists.append(pipe.rank([request], K, stage="recall")[0].item_ids())
        recall_t.append(time.perf_counter() - started)
    judged = [targets[r.request_id] for r in test]
    full, recall = percentiles(full_t), percentiles(recall_t)
    return {
        "users": len(test),
        "learned_seconds": full,
        "stage1_seconds": recall,
        "ratio_p50": full["p50"] / recall["p50"],
        "learned_ndcg10": ndcg10(full_lists, judged),
        "stage1_ndcg10": ndcg10(recall_lists, judged),
        "features": list(pipe.learned.features),
        "items_weight": pipe.settings.items_weight,
        "rerank_depth": pipe.settings.rerank_depth,
        "cross_encoder_runs": pipe.runs_reranker,
    }


def build_bench(name: str) -> dict[str, Any]:
    """Encode + index the catalogue: ours (cold cache, Engine.build_index) vs plain; then 1% incremental."""
    import faiss
    from sentence_transformers import SentenceTransformer

    src = BENCH / name
    tmp = Path(tempfile.mkdtemp(prefix="bench-build-"))
    shutil.copytree(src, tmp / "p", ignore=shutil.ignore_patterns("cache", "indexes"))
    engine = Engine.open(tmp / "p")
    catalogue = engine.project.catalogue()
    texts = [catalogue.text(i) for i in catalogue.item_ids]
    model = SentenceTransformer(str(engine.project.models_dir("retriever")), device="cpu")
    model.max_seq_length = engine.config.retriever.max_seq_length
    started = time.perf_counter()
    vecs = model.encode(texts, normalize_embeddings=True)
    index = faiss.IndexFlatIP(vecs.shape[1])
    index.add(np.ascontiguousarray(vecs, dtype=np.float32))
    plain_s = time.perf_counter() - started
    started = time.perf_counter()
    engine.index_build()
    ours_full = time.perf_counter() - started
    # 1% of items change text: incremental update re-encodes only those
    ids = catalogue.item_ids
    changed = random.Random(0).sample(ids, max(1, len(ids) // 100))
    for i in changed:  # a new title, rendered into the memoised catalogue's text on the next read
        catalogue.records[i] = {**catalogue.records[i], "title": f"{catalogue.title(i)} (updated)"}
        catalogue.texts._done.pop(i, None)
    started = time.perf_counter()
    engine.index_add(changed)
    incremental = time.perf_counter() - started
    shutil.rmtree(tmp, ignore_errors=True)
    return {
        "items": len(texts),
        "plain_items_per_s": len(texts) / plain_s,
        "ours_items_per_s": len(texts) / ours_full,
        "ratio_ours_over_plain": plain_s / ours_full,
        "full_rebuild_seconds": ours_full,
        "incremental_1pct_seconds": incremental,
        "incremental_speedup": ours_full / incremental,
    }


def ceiling(engine_dir: Path, tokens: int) -> dict[str, Any]:
    """Measured GEMM throughput on reranker-shaped matrices, and what one pair costs."""
    import torch
    from sentence_transformers import CrossEncoder

    ce = CrossEncoder(str(engine_dir / "models" / "reranker"), device="cpu")
    cfg = ce.model.config
    h, inter, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    a = torch.randn(32 * tokens, h)
    w1 = torch.randn(h, inter)
    w2 = torch.randn(h, h)
    with torch.inference_mode():
        for _ in range(2):
            a @ w1
        times = repeat(lambda: (a @ w1, a @ w2), 10)
    flops = 2 * a.shape[0] * h * inter + 2 * a.shape[0] * h * h
    gflops = flops / percentiles(times)["median"] / 1e9
    # per pair: 4 h² (QKVO) + 2 h·inter (FFN) multiply-adds per token per layer, plus attention 2·tokens·h
    per_pair = 2 * tokens * layers * (4 * h * h + 2 * h * inter + 2 * tokens * h)
    pairs = [("what causes bone loss in older adults", "word " * (tokens - 12))] * 64
    ce.predict(pairs[:8])
    t = percentiles(repeat(lambda: ce.predict(pairs, batch_size=32), 3))["median"]
    achieved = len(pairs) * per_pair / t / 1e9
    # what caching item tokens could save at most: tokenising the pairs, as a share of scoring them
    tokenize = percentiles(
        repeat(lambda: ce.tokenizer(pairs, padding=True, truncation=True, max_length=tokens), 3)
    )["median"]
    return {
        "gemm_gflops": gflops,
        "tokens_per_pair": tokens,
        "gflop_per_pair": per_pair / 1e9,
        "pairs_per_s": len(pairs) / t,
        "achieved_gflops": achieved,
        "fraction_of_ceiling": achieved / gflops,
        "ceiling_pairs_per_s": gflops * 1e9 / per_pair,
        "tokenize_share_of_scoring": tokenize / t,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--queries", type=int, default=60)
    parser.add_argument("--valid", type=int, default=60)
    parser.add_argument(
        "--only",
        help="comma-separated parts (search, recommend, recommend_learned, build_scifact, build_movielens, ceiling)",
    )
    parser.add_argument(
        "--movielens-project",
        default=str(BENCH / "movielens-today"),
        help="recommend_learned: the project bench_quality.py movielens --protocol today left",
    )
    args = parser.parse_args()
    wanted = set(args.only.split(",")) if args.only else None
    previous = RESULTS / "latency.json"
    result: dict[str, Any] = {}
    if wanted and previous.exists():  # keep the parts measured in an earlier run, with their dates
        kept = json.loads(previous.read_text())
        result = {k: v for k, v in kept.items() if k not in ("machine", "when")}
        for part in result.values():
            part.setdefault("measured", kept.get("when"))
    for name, fn in (
        ("search", lambda: search_bench(args.queries, args.valid)),
        ("recommend", lambda: recommend_bench(args.queries)),
        (
            "recommend_learned",
            lambda: learned_recommend_bench(Path(args.movielens_project), args.queries * 5),
        ),
        ("build_scifact", lambda: build_bench("scifact")),
        ("build_movielens", lambda: build_bench("movielens")),
        ("ceiling", lambda: ceiling(BENCH / "scifact", 192)),
    ):
        if wanted is not None and name not in wanted:
            continue
        needs = Path(args.movielens_project) if name == "recommend_learned" else None
        needs = needs or BENCH / ("movielens" if "movielens" in name or name == "recommend" else "scifact")
        if not needs.exists():
            print(f"skip {name}: run bench_quality.py first")
            continue
        started = time.perf_counter()
        result[name] = {**fn(), "measured": time.strftime("%Y-%m-%d %H:%M:%S")}
        print(
            f"{name} ({time.perf_counter() - started:.0f}s):",
            {k: v for k, v in result[name].items() if not isinstance(v, dict | list)},
        )
        write("latency", result)
    if "search" in result:
        s = result["search"]
        print(
            f"search p50 ratio ours/plain {s['ratio_p50']:.3f}; nDCG@10 ours {s['ours_ndcg10']:.4f} plain {s['plain_ndcg10']:.4f}"
        )
    print(math.nan if not result else write("latency", result))


if __name__ == "__main__":
    main()
