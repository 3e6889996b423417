"""Fill README.md's Results section from the benchmark JSON, so the README never shows numbers nobody measured.

Reads whichever of tools/bench/results/{quality_scifact,quality_movielens,ingest_eval,encode,ann,latency,serve}.json
exist, renders markdown tables (quality per dataset, performance, ANN) with the machine and date, and replaces
the text between ``<!-- results:start -->`` and ``<!-- results:end -->``.

Usage: python tools/bench/readme_tables.py [--results DIR] [--readme PATH] [--dry-run]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "tools" / "bench" / "results"
START, END = "<!-- results:start -->", "<!-- results:end -->"

KNOWN = (
    "quality_scifact",
    "quality_movielens_today",
    "quality_movielens_published",
    "quality_movielens",
    "predict_movielens",
    "ingest_eval",
    "encode",
    "ann",
    "latency",
    "serve",
    "scale",
)
QUALITY_RUNS = {  # bench_quality.py keys, in the order the story is told
    "eval": "",
    "zero_shot_eval": "zero-shot bi-encoder",
    "fine_tuned_eval": "fine-tuned bi-encoder + trained reranker",
    "untrained_reranker_eval": "fine-tuned bi-encoder + untrained reranker",
}
BASELINES = {"bm25", "popularity", "itemknn", "ease"}  # do not depend on the run they were evaluated in
QUALITY_METRICS = ("nDCG@10", "R@10", "R@100", "RR@10")
DATASET_TITLES = {
    "quality_scifact": "SciFact (search)",
    "quality_movielens_today": "MovieLens (recommendation), learned stage 2",
    "quality_movielens_published": "MovieLens (recommendation), published protocol, learned stage 2",
    "quality_movielens": "MovieLens (recommendation), earlier run: cross-encoder and the weight grid",
}
META_KEYS = {"machine", "when", "bench", "note", "quick", "config", "dataset"}


def load_results(results_dir: Path, names: tuple[str, ...] = KNOWN) -> tuple[dict[str, dict], list[str]]:
    """The parsed ``<name>.json`` files that exist in ``results_dir``, and the names that do not."""
    results, missing = {}, []
    for name in names:
        path = Path(results_dir) / f"{name}.json"
        if path.exists():
            results[name] = json.loads(path.read_text(encoding="utf-8"))
        else:
            missing.append(name)
    return results, missing


def _secs(x: float) -> str:
    if x < 1:
        return f"{x:.3f}"
    return f"{x:.2f}" if x < 100 else f"{x:.0f}"


def _median(value: Any) -> float:
    return float(value["median"]) if isinstance(value, dict) else float(value)


def _is_number(cell: str) -> bool:
    try:
        float(cell.strip("*").replace(",", ""))
    except ValueError:
        return cell == "–"
    return True


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A markdown table; columns holding only numbers are right-aligned."""
    align = ["---:" if rows and all(_is_number(r[i]) for r in rows) else "---" for i in range(len(header))]
    return ["| " + " | ".join(r) + " |" for r in (header, align, *rows)]


def machine_line(results: dict[str, dict]) -> str:
    """``Measured on <cpu>, <n> cores, torch <v>, faiss <v>`` for each distinct machine, and the dates."""
    machines: list[str] = []
    for data in results.values():
        m = data.get("machine") or {}
        parts = [str(m.get("cpu") or "unknown CPU")]
        if m.get("cores"):
            parts.append(f"{m['cores']} cores")
        parts.append("GPU" if m.get("cuda") else "no GPU")
        parts += [f"{lib} {m[lib]}" for lib in ("torch", "faiss") if m.get(lib)]
        line = ", ".join(parts)
        if line not in machines:
            machines.append(line)
    dates = sorted(str(d["when"])[:10] for d in results.values() if d.get("when"))
    when = "" if not dates else f"; {dates[0]}" if dates[0] == dates[-1] else f"; {dates[0]} to {dates[-1]}"
    return f"Measured on {' / '.join(machines)}{when}."


def render_quality(name: str, data: dict[str, Any]) -> list[str]:
    """One table per dataset: rows = rankings (each run's, identical repeats shown once), columns = metrics."""
    runs = [(key, label) for key, label in QUALITY_RUNS.items() if data.get(key)]
    rows: list[tuple[str, str, dict[str, float]]] = []
    for key, label in runs:
        for ranking, values in data[key].items():
            shown = {m: values[m] for m in QUALITY_METRICS if m in values}
            if any(r == ranking and v == shown for _, r, v in rows):
                continue
            rows.append(("baseline" if ranking in BASELINES else label, ranking, shown))
    for variant, x in (data.get("stage2_ablation") or {}).items():
        shown = {m: x["eval"][m] for m in QUALITY_METRICS if m in x["eval"]}
        ranking = f"rerank: {variant} (w {x['fusion_weight']}, c {x['cowatch_weight']})"
        rows.append((runs[-1][1] if runs else "", ranking, shown))
    metrics = [m for m in QUALITY_METRICS if any(m in v for _, _, v in rows)]
    best = {m: max(v[m] for _, _, v in rows if m in v) for m in metrics}
    with_run = len(runs) > 1
    header = (["run"] if with_run else []) + ["ranking", *metrics]
    body = []
    for label, ranking, values in rows:
        cells = [
            "–" if m not in values else f"**{values[m]:.4f}**" if values[m] == best[m] else f"{values[m]:.4f}"
            for m in metrics
        ]
        body.append(([label] if with_run else []) + [ranking, *cells])
    title = DATASET_TITLES.get(name, name.removeprefix("quality_"))
    about = ", ".join(
        x
        for x in (
            data.get("dataset"),
            "quick settings" if data.get("quick") else "",
            str(data.get("when", "")),
        )
        if x
    )
    lines = [f"**{title}**" + (f" — {about}" if about else ""), "", *_table(header, body)]
    served = data.get("reranker_training") or {}
    if served.get("rerank_depth") is not None:
        lines += [
            "",
            f"Stage 2 as evaluated (chosen on validation): fusion weight w {served.get('fusion_weight')}, "
            f"co-watch weight c {served.get('cowatch_weight') or 0.0}, rerank depth {served['rerank_depth']}.",
        ]
    lines += _learned_lines(data)
    if data.get("stage_seconds"):
        times = ", ".join(
            f"{k.replace('_', ' ')} {_secs(float(v))} s" for k, v in data["stage_seconds"].items()
        )
        lines += ["", f"Stage times: {times}."]
    return lines


def _paired(comparisons: list[dict[str, Any]], b: str, metric: str = "nDCG@10") -> str:
    return "; ".join(
        f"vs {c['a']} {c['diff']:+.4f} (p = {c['p_value']:.3g})"
        for c in comparisons
        if c["b"] == b and c["metric"] == metric
    )


def _learned_lines(data: dict[str, Any]) -> list[str]:
    """The learned ranker's choices, its paired tests, the cold-start slice and the ablation table."""
    ranker = data.get("ranker")
    if not ranker:
        return []
    lines = [
        "",
        f"Learned stage 2 (chosen on validation): features {', '.join(ranker['features'])} "
        f"(dropped: {', '.join(ranker['dropped']) or 'none'}), {ranker['trees']} trees, {ranker['train_lists']} "
        f"training lists; EASE channel weight {ranker['items_weight']}. Paired tests of `rerank`, nDCG@10: "
        f"{_paired(data.get('comparisons') or [], 'rerank')}.",
    ]
    cold = data.get("cold_start")
    if cold and cold.get("rows"):
        metrics = ("nDCG@10", "R@10", "R@100")
        body = [[name, *(f"{v.get(m, 0.0):.4f}" for m in metrics)] for name, v in cold["rows"].items()]
        lines += [
            "",
            f"Cold-start slice ({cold['definition']}; {cold['n_requests']} requests); `rerank` "
            f"{_paired(cold.get('comparisons') or [], 'rerank')}:",
            "",
            *_table(["ranking", *metrics], body),
        ]
    ablation = data.get("ablation")
    if ablation:
        full = data.get("ablation_full") or (data.get("eval") or {}).get("rerank", {})
        body = [["full pipeline", f"{full.get('nDCG@10', 0.0):.4f}", f"{full.get('R@10', 0.0):.4f}"]]
        body += [[name, f"{x['nDCG@10']:.4f}", f"{x['R@10']:.4f}"] for name, x in ablation.items()]
        earlier = data.get("ablation_ranker_config")
        note = (
            f"; a separate run, with [ranker] request_tail = {earlier.get('request_tail')}, whose full "
            "pipeline is the first row"
            if earlier
            else ""
        )
        lines += [
            "",
            f"Ablation (each variant retrained on the same split{note}):",
            "",
            *_table(["variant", "nDCG@10", "R@10"], body),
        ]
    return lines


def _performance_rows(results: dict[str, dict]) -> list[list[str]]:
    rows = []
    if "ingest_eval" in results:
        d = results["ingest_eval"]
        if "ingest" in d:
            ing = d["ingest"]
            rows.append(
                [
                    f"ingest {ing['rows']:,} MovieLens ratings (CSV → DuckDB, one transaction)",
                    f"{_secs(_median(ing['seconds']))} s",
                    str(d.get("when", ""))[:10],
                ]
            )
            if "reload_events_seconds" in ing:
                first, again = _median(ing["seconds"]), _median(ing["reload_events_seconds"])
                rows.append(
                    [
                        f"load the same ratings and {ing['items']:,} movies again (all already stored)",
                        f"ratings {_secs(again)} s (ratio {again / first:.2f} to the first load, "
                        f"nothing added); movies {_secs(_median(ing['reload_items_seconds']))} s",
                        str(d.get("when", ""))[:10],
                    ]
                )
        if "evaluate" in d:
            ev = d["evaluate"]
            ours, ref = _median(ev["ours_seconds"]), _median(ev["ir_measures_seconds"])
            ratio = ev.get("ratio_ours_over_ir_measures", ours / ref)
            rows.append(
                [
                    f"evaluate {ev['requests']:,} requests × depth {ev['depth']} (nDCG, R, RR, AP)",
                    f"{_secs(ours)} s vs ir_measures {_secs(ref)} s (ratio {ratio:.2f})",
                    str(d.get("when", ""))[:10],
                ]
            )
    if "encode" in results:
        d = results["encode"]
        plain, ours = d["plain_sentence_transformers"], d["biencoder"]
        ratio = d.get("ratio_biencoder_over_plain", ours["seconds"] / plain["seconds"])
        text = (
            f"BiEncoder {_secs(ours['seconds'])} s vs plain sentence-transformers "
            f"{_secs(plain['seconds'])} s (time ratio {ratio:.2f})"
        )
        if "cache_warm" in d:
            text += f"; warm embedding cache {_secs(d['cache_warm']['seconds'])} s"
        rows.append(
            [
                f"encode {d.get('texts', '?')} SciFact abstracts with MiniLM (max_seq_length {d.get('max_seq_length', '?')})",
                text,
                str(d.get("when", ""))[:10],
            ]
        )
    if "latency" in results:
        rows += _latency_rows(results["latency"])
    return rows


def _latency_rows(d: dict[str, Any]) -> list[list[str]]:
    """Ours against the plain sentence-transformers pipeline, from bench_latency.py's parts (each dated when
    it was measured: a run of some parts keeps the others)."""

    def measured(part: dict[str, Any]) -> str:
        return str(part.get("measured", d.get("when", "")))[:10]

    rows = []
    for part, label in (("search", "SciFact search"), ("recommend", "MovieLens recommend")):
        if part in d:
            x = d[part]
            rows.append(
                [
                    f"{label} latency, stage-1 depth 100 → top 10 ({x.get('queries', x.get('users'))} requests)",
                    f"p50 {x['ours_seconds']['p50']:.2f} s vs plain {x['plain_seconds']['p50']:.2f} s (ratio {x['ratio_p50']:.2f}); "
                    f"p99 ratio {x['ratio_p99']:.2f}; rerank depth {x['depth_selection']['chosen']} chosen on validation; "
                    f"nDCG@10 ours {x['ours_ndcg10']:.4f} vs plain {x['plain_ndcg10']:.4f}"
                    + (
                        f"; ours with the popularity prior (β={x['ours_popularity_prior']}), plain without"
                        if x.get("ours_popularity_prior")
                        else ""
                    )
                    + (
                        "; the tuned fusion weight is 1, so ours skips the cross-encoder"
                        if x.get("fusion_weight", 0) >= 1
                        else ""
                    )
                    + (
                        f"; both fuse co-watch scores (weight {x['cowatch_weight']})"
                        if x.get("cowatch_weight")
                        else ""
                    ),
                    measured(x),
                ]
            )
            if "throughput" in x:
                t = x["throughput"]
                rows.append(
                    [
                        f"{label} batch throughput",
                        f"{t['ours_requests_per_s']:.2f} vs {t['plain_requests_per_s']:.2f} requests/s (ratio {t['ratio']:.2f})",
                        measured(x),
                    ]
                )
    if "recommend_learned" in d:
        x = d["recommend_learned"]
        rows.append(
            [
                f"MovieLens recommend with the learned stage 2 ({x['users']} test users, top 10 of "
                f"{x['rerank_depth']} candidates)",
                f"p50 {x['learned_seconds']['p50'] * 1000:.1f} ms, p99 {x['learned_seconds']['p99'] * 1000:.1f} ms "
                f"vs stage 1 alone {x['stage1_seconds']['p50'] * 1000:.1f} ms (ratio {x['ratio_p50']:.2f}); nDCG@10 "
                f"{x['learned_ndcg10']:.4f} vs {x['stage1_ndcg10']:.4f}; the cross-encoder "
                f"{'runs' if x['cross_encoder_runs'] else 'is not a feature and never runs'}",
                measured(x),
            ]
        )
    for part in ("build_scifact", "build_movielens"):
        if part in d:
            x = d[part]
            rows.append(
                [
                    f"index build, {x['items']:,} items ({part.split('_')[1]}), encode + FAISS",
                    f"{x['ours_items_per_s']:.1f} vs plain {x['plain_items_per_s']:.1f} items/s (ratio {x['ratio_ours_over_plain']:.2f}); "
                    f"1% incremental update {x['incremental_1pct_seconds']:.2f} s vs full rebuild {x['full_rebuild_seconds']:.0f} s "
                    f"({x['incremental_speedup']:.0f}× faster)",
                    measured(x),
                ]
            )
    if "ceiling" in d:
        x = d["ceiling"]
        rows.append(
            [
                f"reranker vs the machine's ceiling ({x['tokens_per_pair']} tokens/pair)",
                f"GEMM {x['gemm_gflops']:.0f} GFLOP/s; {x['gflop_per_pair']:.2f} GFLOP/pair; {x['pairs_per_s']:.1f} pairs/s = "
                f"{100 * x['fraction_of_ceiling']:.0f}% of the ceiling ({x['ceiling_pairs_per_s']:.1f} pairs/s)"
                + (
                    f"; tokenising is {100 * x['tokenize_share_of_scoring']:.1f}% of scoring time"
                    if "tokenize_share_of_scoring" in x
                    else ""
                ),
                measured(x),
            ]
        )
    return rows


def _numeric_leaves(data: Any, prefix: str = "") -> list[tuple[str, float]]:
    """Flattened ``a.b.c`` → number pairs of a nested dict (medians collapse their percentile dicts)."""
    if isinstance(data, dict) and "median" in data:
        return [(prefix, float(data["median"]))]
    if isinstance(data, dict):
        out = []
        for k, v in data.items():
            out += _numeric_leaves(v, f"{prefix}.{k}" if prefix else str(k))
        return out
    if isinstance(data, int | float) and not isinstance(data, bool):
        return [(prefix, float(data))]
    return []


def render_ann(data: dict[str, Any]) -> list[str]:
    """One row per (vectors, index config): recall@k against exact search, latency, build time."""
    body = []
    k = None
    for case in data.get("cases", []):
        k = case.get("k", k)
        name = case["dataset"]
        vectors = f"{'SciFact MiniLM' if 'scifact' in name.lower() else name.split('(')[0]} ({case['items']:,}×{case['dim']})"
        for r in case["results"]:
            recall = next((v for key, v in r.items() if key.startswith("recall@")), None)
            body.append(
                [
                    vectors,
                    f"`{r['factory']}`"
                    + "".join(f" {key}={value}" for key, value in r.get("search_params", {}).items()),
                    "–" if recall is None else f"{recall:.4f}",
                    f"{r['batch_ms_per_query']:.3f}",
                    f"{r['single_query_ms']:.3f}",
                    f"{r['build_s']:.2f}",
                ]
            )
    header = ["vectors", "index", f"recall@{k}", "batch ms/query", "single query ms", "build s"]
    return [
        f"**ANN index configs** (`indexes/*.toml`) — recall against exact Flat search, {data.get('when', '')}",
        "",
        *_table(header, body),
    ]


def render_serve(data: dict[str, Any]) -> list[str]:
    """``twostage serve`` under load (bench_serve.py): per endpoint, stage and client count."""
    lines = [
        f"**Serving over HTTP** (`tools/bench/bench_serve.py`, a `twostage serve` process on 127.0.0.1 on the demo "
        f"project, {data.get('requests_per_endpoint')} distinct real requests per row, top {data.get('k')}), "
        f"{str(data.get('when', ''))[:10]}",
        "",
    ]
    body = []
    for name, row in (data.get("load") or {}).items():
        endpoint, stage = name.split("_", 1)
        for clients in (1, 4, 16):
            x = row.get(f"clients_{clients}")
            if not x or not x.get("latency_s"):
                continue
            body.append(
                [
                    f"`{endpoint}` {stage}",
                    str(clients),
                    f"{x['latency_s']['p50']:.3f}",
                    f"{x['latency_s']['p99']:.3f}",
                    f"{x['requests_per_s']:.1f}",
                    str(x["errors"]),
                    f"{row['served_over_library_p50']:.2f}" if clients == 1 else "",
                    str(row["answers_differing_from_library"]) if clients == 1 else "",
                ]
            )
    header = ["request", "clients", "p50 s", "p99 s", "req/s", "errors", "p50 / library", "answers ≠ library"]
    lines += _table(header, body)
    notes = []
    swap = data.get("swap")
    if swap:
        counts = ", ".join(f"{n} from {sid}" for sid, n in swap["responses_per_snapshot"].items())
        notes.append(
            f"- Hot swap under 4 clients: a snapshot published ({swap['publish_seconds']} s) and reloaded "
            f"({swap['reload_seconds']} s) mid-run; {swap['errors']} failed of {swap['sent']}; {counts}; "
            f"{swap['responses_from_other_snapshots']} from any other snapshot and "
            f"{swap['started_after_reload_from_old']} started after the reload answered by the old one."
        )
    workers = data.get("workers")
    if workers:
        during = workers.get("during_training") or {}
        notes.append(
            "- `--workers 2`"
            + (f" ({workers['worker_processes']} worker processes)" if "worker_processes" in workers else "")
            + " while `twostage train reranker` ran "
            f"in a third process ({workers.get('training_seconds')} s, exit code {workers.get('training_exit_code')}): "
            f"{during.get('sent')} requests, {during.get('errors')} errors; stage-1 p50 "
            f"{workers.get('p50_during_over_before', float('nan')):.2f}× that before training."
        )
    return lines + (["", *notes] if notes else [])


def render_scale(data: dict[str, Any]) -> list[str]:
    """Each step's cost at S, M, L (bench_scale.py): seconds and peak RSS per size, growth per 10× data."""
    sizes = data.get("sizes") or {}
    names = list(sizes)
    counts = ", ".join(f"{n} = {sizes[n]['items']:,} items / {sizes[n]['events']:,} events" for n in names)
    lines = [
        f"**Scale** (`tools/bench/bench_scale.py`, synthetic MovieLens-shaped logs: {counts}; a tiny random "
        f"2-layer BERT for both stages, so the model is not the subject; each step in its own process, "
        f"seconds without the process start, peak RSS of that process), {str(data.get('when', ''))[:10]}",
        "",
    ]
    growth = data.get("growth") or {}
    pairs = list(growth)
    header = [
        "step",
        *[f"{n} s" for n in names],
        *[f"{n} peak GB" for n in names],
        *[f"× {p}" for p in pairs],
    ]
    body = []
    for step in data.get("steps", []):
        cells = [step + (" (model)" if step == "encode" else "")]
        for n in names:
            x = sizes[n]["steps"].get(step, {})
            cells.append(_secs(x["seconds"]) if "seconds" in x else ("failed" if "error" in x else "–"))
        for n in names:
            x = sizes[n]["steps"].get(step, {})
            cells.append(f"{x['peak_rss_mb'] / 1024:.2f}" if "peak_rss_mb" in x else "–")
        cells += [f"{growth[p][step]:.1f}" if step in growth[p] else "–" for p in pairs]
        body.append(cells)
        if step == "recommend":
            modes = {
                "recall": "stage 1",
                "cowatch": "stage 2: co-watch fused, no cross-encoder",
                "rerank": "stage 2: tiny cross-encoder on the top 20 + co-watch",
            }
            for stage, label in modes.items():
                row = [f"recommend warm p50 ({label})"]
                for n in names:
                    x = sizes[n]["steps"].get(step, {}).get(stage)
                    row.append(f"{x['p50'] * 1000:.1f} ms" if x else "–")
                row += ["" for _ in names]
                row += [
                    f"{growth[p][f'recommend_{stage}_p50']:.2f}"
                    if f"recommend_{stage}_p50" in growth[p]
                    else "–"
                    for p in pairs
                ]
                body.append(row)
    lines += _table(header, body)
    return lines


def render_prediction(data: dict[str, Any]) -> list[str]:
    """Rating prediction (bench_predict.py): RMSE/MAE per split and model, the predictor's paired tests against
    each baseline, and the multi-task comparison when it was run."""
    lines = [
        "**Rating prediction, ml-latest-small** (`bench_predict.py`; 70/15/15; the predictor with default "
        "`[predictor]` settings; paired tests on per-rating squared errors, Δ = MSE(predictor) − MSE(baseline))",
        "",
    ]
    header = [
        "split",
        "ratings",
        "global mean",
        "biases",
        "biased MF",
        "predictor",
        "predictor vs biases",
        "vs biased MF",
    ]
    body = []
    for key in ("time", "event"):
        run = data.get(key)
        if not run:
            continue
        rmse = {r["name"]: r for r in run["rows"] if r["target"] == "rating"}
        versus = {c["a"]: c for c in run["comparisons"] if c["target"] == "rating"}

        cells = {name: f"{r['RMSE']:.4f} / {r['MAE']:.4f}" for name, r in rmse.items()}
        tests = {name: f"Δ {c['diff']:+.4f}, p={c['p_value']:.2g}" for name, c in versus.items()}
        n = next(iter(rmse.values()))["n"] if rmse else 0
        body.append(
            [
                run["split"],
                f"{n:,}",
                cells.get("global-mean", "-"),
                cells.get("biases", "-"),
                cells.get("biased-mf", "-"),
                f"**{cells.get('predictor', '-')}**",
                tests.get("biases", "-"),
                tests.get("biased-mf", "-"),
            ]
        )
    if body:
        lines += _table(header, body)
        lines += ["", "Cells are RMSE / MAE on the test ratings."]
    multi = data.get("multitask")
    if multi:
        lines += [
            "",
            f"**Multi-task vs single-task** (time split, {multi['budget_minutes']:g} minutes of training each, "
            "the same test ratings and ranking lists):",
            "",
        ]
        rows = []
        for name, v in multi["variants"].items():
            ours = {r["target"]: r for r in v["rows"] if r["name"] == "predictor"}
            rating = ours.get("rating")
            ranking = ours.get("listnet")
            rows.append(
                [
                    name,
                    ", ".join(f"{k} {w:g}" for k, w in v["tasks"].items()),
                    f"{rating['RMSE']:.4f}" if rating else "-",
                    f"{ranking['nDCG@10']:.4f}" if ranking else "-",
                    f"{ranking['MRR']:.4f}" if ranking else "-",
                    str(v["training"]["steps"]),
                ]
            )
        lines += _table(
            ["model", "tasks (loss weights)", "rating RMSE", "list nDCG@10", "list MRR", "steps"], rows
        )
        popular = [
            r
            for v in multi["variants"].values()
            for r in v["rows"]
            if r["name"] == "popularity" and r["target"] == "listnet"
        ]
        if popular:
            lines += [
                "",
                "Ranking lists: a held-out item among 15 the user never touched; item popularity orders the same "
                f"lists at nDCG@10 {popular[0]['nDCG@10']:.4f}, MRR {popular[0]['MRR']:.4f}.",
            ]
    return lines


def render(results: dict[str, dict]) -> str:
    """The whole Results section (without the markers) for whichever benchmark results are present."""
    if not results:
        return "No benchmark results yet: run `make bench`, then `python tools/bench/readme_tables.py`."
    lines = [
        "<!-- generated by tools/bench/readme_tables.py from tools/bench/results/*.json; do not edit -->",
        machine_line(results),
    ]
    quality = [n for n in results if n.startswith("quality_")]
    if quality:
        lines += ["", "### Quality", ""]
        for n, name in enumerate(quality):
            lines += ([""] if n else []) + render_quality(name, results[name])
    if "predict_movielens" in results:
        lines += ["", "### Behaviour prediction", "", *render_prediction(results["predict_movielens"])]
    perf = _performance_rows(results)
    if perf or "ann" in results:
        lines += ["", "### Performance", ""]
    if perf:
        lines += _table(["benchmark", "result", "measured"], perf)
    if "ann" in results:
        lines += ([""] if perf else []) + render_ann(results["ann"])
    if "serve" in results:
        lines += ["", *render_serve(results["serve"])]
    if "scale" in results:
        lines += ["", *render_scale(results["scale"])]
    return "\n".join(lines)


def update_readme(readme: Path, section: str) -> None:
    """Replace the text between the results markers of ``readme`` with ``section``; nothing else changes."""
    text = Path(readme).read_text(encoding="utf-8")
    start, end = text.find(START), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"{readme}: no '{START}' ... '{END}' markers; add them where the results go")
    new = text[: start + len(START)] + "\n" + section.strip("\n") + "\n" + text[end:]
    Path(readme).write_text(new, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=RESULTS, help="directory of benchmark JSON files")
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    parser.add_argument("--dry-run", action="store_true", help="print the section instead of writing it")
    args = parser.parse_args(argv)
    # 1. read whatever results exist
    results, missing = load_results(args.results)
    print(f"rendered: {', '.join(results) or 'nothing'}", file=sys.stderr)
    if missing:
        print(f"skipped (no JSON): {', '.join(missing)}", file=sys.stderr)
    # 2. render and write between the markers
    section = render(results)
    if args.dry_run:
        print(section)
    else:
        update_readme(args.readme, section)
        print(f"updated {args.readme}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
