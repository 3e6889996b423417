"""Offline evaluation: results ⋈ held-out targets in DuckDB → per-request metrics → means, intervals, reports.

The join is SQL over the store (``results`` ⋈ ``splits``), so every number stays queryable afterwards in the
``request_metrics`` and ``metrics`` tables. Formulas live in :mod:`twostage.metrics`.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from twostage import metrics as M

if TYPE_CHECKING:
    from twostage.store import Store


@dataclass(frozen=True)
class StageMetrics:
    """One evaluated ranking (a stage of a run, or a baseline): mean and per-request values per metric."""

    name: str
    run_id: str
    stage: str
    n_requests: int
    means: dict[str, float]
    per_request: dict[str, np.ndarray] = field(repr=False, compare=False)
    beyond: dict[str, float] = field(default_factory=dict)
    seconds: float | None = None
    request_ids: tuple[str, ...] = field(default=(), repr=False, compare=False)

    def subset(self, name: str, keep: Collection[str]) -> StageMetrics:
        """The same ranking's metrics over the requests in ``keep`` only (a slice of the evaluated requests)."""
        mask = np.asarray([r in keep for r in self.request_ids], dtype=bool)
        per_request = {label: v[mask] for label, v in self.per_request.items()}
        means = {label: float(np.mean(v)) if len(v) else 0.0 for label, v in per_request.items()}
        ids = tuple(r for r, m in zip(self.request_ids, mask, strict=True) if m)
        return StageMetrics(name, self.run_id, self.stage, len(ids), means, per_request, {}, None, ids)


@dataclass(frozen=True)
class EvalReport:
    """Everything ``twostage evaluate`` shows: rows of metrics, paired comparisons, trade-off points."""

    split: str
    part: str
    rows: list[StageMetrics]
    comparisons: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "split": self.split,
            "part": self.part,
            "rows": [
                {
                    "name": r.name,
                    "run_id": r.run_id,
                    "stage": r.stage,
                    "n_requests": r.n_requests,
                    "metrics": r.means,
                    "beyond_accuracy": r.beyond,
                    "seconds": r.seconds,
                }
                for r in self.rows
            ],
            "comparisons": self.comparisons,
            **self.extra,
        }

    def table(self, columns: Sequence[str] | None = None) -> str:
        """A fixed-width text table: rows = rankings, columns = metrics@k (and beyond-accuracy)."""
        if not self.rows:
            return "(nothing evaluated)"
        cols = list(columns or self.rows[0].means)
        beyond = [c for c in self.rows[0].beyond if any(c in r.beyond for r in self.rows)]
        header = ["ranking", *cols, *beyond]
        lines = [header]
        for r in self.rows:
            lines.append(
                [
                    r.name,
                    *(f"{r.means.get(c, float('nan')):.4f}" for c in cols),
                    *(_fmt(r.beyond.get(c)) for c in beyond),
                ]
            )
        widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
        out = [
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(line, widths, strict=True))
            )
            for line in lines
        ]
        out.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(out)


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


# ---------------------------------------------------------------------- the join
def judged_gains(
    store: Store,
    *,
    run_id: str,
    stage: str,
    split: str,
    part: str,
    depth: int,
    request_ids: Sequence[str] | None = None,
) -> tuple[list[str], np.ndarray, list[np.ndarray]]:
    """Join a ranking to the held-out targets in SQL.

    Returns the evaluated request ids (every request with targets in ``split/part``, or those of them in
    ``request_ids`` when given; requests the ranking has nothing for are kept and score 0), the gains matrix (requests × depth: the relevance grade of the
    item at each rank, 0 when not relevant or missing), and each request's relevant grades.
    """
    cur = store.cursor()
    targets = cur.execute(
        """
        SELECT request_id, list(relevance ORDER BY relevance DESC) FROM (
            SELECT request_id, item_id, max(relevance) AS relevance FROM splits
            WHERE split = ? AND part = ? AND relevance > 0 GROUP BY 1, 2)
        GROUP BY 1 ORDER BY 1
        """,
        [split, part],
    ).fetchall()
    if request_ids is not None:
        # exactly the requests that were run, in their order; one without targets would score 0 on nothing
        by_id = {r[0]: r for r in targets}
        targets = [by_id[r] for r in request_ids if r in by_id]
    request_ids = [r[0] for r in targets]
    position = {r: n for n, r in enumerate(request_ids)}
    gains = np.zeros((len(request_ids), depth), dtype=np.float64)
    rows = cur.execute(
        """
        SELECT r.request_id, r.rank, s.relevance
        FROM results r
        JOIN (SELECT request_id, item_id, max(relevance) AS relevance FROM splits
              WHERE split = ? AND part = ? AND relevance > 0 GROUP BY 1, 2) s
          ON s.request_id = r.request_id AND s.item_id = r.item_id
        WHERE r.run_id = ? AND r.stage = ? AND r.rank <= ?
        """,
        [split, part, run_id, stage, depth],
    ).fetchall()
    for request_id, rank, relevance in rows:
        n = position.get(request_id)
        if n is not None:
            gains[n, rank - 1] = relevance
    relevant = [np.asarray(r[1], dtype=np.float64) for r in targets]
    return request_ids, gains, relevant


def ranked_lists(
    store: Store, *, run_id: str, stage: str, k: int, request_ids: Sequence[str]
) -> list[list[str]]:
    """The top-k item ids per request, in ``request_ids`` order (empty lists for missing requests)."""
    rows = (
        store.cursor()
        .execute(
            "SELECT request_id, list(item_id ORDER BY rank) FROM results WHERE run_id = ? AND stage = ? AND rank <= ? "
            "GROUP BY 1",
            [run_id, stage, k],
        )
        .fetchall()
    )
    found = dict(rows)
    return [found.get(r, []) for r in request_ids]


def evaluate_ranking(
    store: Store,
    *,
    name: str,
    run_id: str,
    stage: str,
    split: str,
    part: str,
    ks: Sequence[int],
    metric_names: Sequence[str],
    request_ids: Sequence[str] | None = None,
    beyond: Callable[[list[list[str]]], dict[str, float]] | None = None,
    beyond_k: int = 10,
    seconds: float | None = None,
) -> StageMetrics:
    """Evaluate one stored ranking and write its per-request and mean metrics back to the store."""
    depth = max(ks)
    request_ids, gains, relevant = judged_gains(
        store, run_id=run_id, stage=stage, split=split, part=part, depth=depth, request_ids=request_ids
    )
    values = M.ranking_metrics(gains, relevant, ks=tuple(ks), metrics=tuple(metric_names))
    per_request = {M.metric_label(m, k): v for (m, k), v in values.items()}
    means = {label: float(np.mean(v)) if len(v) else 0.0 for label, v in per_request.items()}
    extra = (
        beyond(ranked_lists(store, run_id=run_id, stage=stage, k=beyond_k, request_ids=request_ids))
        if beyond
        else {}
    )
    _write_metrics(store, run_id, name, request_ids, values, extra)
    return StageMetrics(
        name, run_id, stage, len(request_ids), means, per_request, extra, seconds, tuple(request_ids)
    )


def _write_metrics(
    store: Store,
    run_id: str,
    name: str,
    request_ids: list[str],
    values: Mapping[tuple[str, int], np.ndarray],
    extra: Mapping[str, float],
) -> None:
    import pyarrow as pa

    n = len(request_ids)
    cols: dict[str, list] = {"request_id": [], "metric": [], "k": [], "value": []}
    for (metric, k), v in values.items():
        cols["request_id"] += request_ids
        cols["metric"] += [metric] * n
        cols["k"] += [k] * n
        cols["value"] += [float(x) for x in v]
    table = pa.table(
        {
            "run_id": pa.array([run_id] * len(cols["value"]), pa.string()),
            "stage": pa.array([name] * len(cols["value"]), pa.string()),
            "request_id": pa.array(cols["request_id"], pa.string()),
            "metric": pa.array(cols["metric"], pa.string()),
            "k": pa.array(cols["k"], pa.int32()),
            "value": pa.array(cols["value"], pa.float64()),
        }
    )
    with store.transaction() as cur:
        cur.execute("DELETE FROM request_metrics WHERE run_id = ? AND stage = ?", [run_id, name])
        cur.execute("DELETE FROM metrics WHERE run_id = ? AND stage = ?", [run_id, name])
        cur.register("_rm", table)
        cur.execute("INSERT INTO request_metrics SELECT * FROM _rm")
        cur.execute(
            "INSERT INTO metrics SELECT run_id, stage, metric, k, avg(value) FROM _rm GROUP BY ALL ORDER BY metric, k"
        )
        for metric, value in extra.items():
            cur.execute("INSERT INTO metrics VALUES (?, ?, ?, NULL, ?)", [run_id, name, metric, float(value)])


def beyond_accuracy(
    lists: list[list[str]],
    *,
    catalogue_size: int,
    popularity: Mapping[str, float] | None,
    n_users: int,
    categories: Mapping[str, set[str]] | None = None,
    vectors: Callable[[Sequence[str]], np.ndarray] | None = None,
) -> dict[str, float]:
    """Coverage, exposure entropy and Gini, intra-list diversity (embeddings and categories), novelty."""
    out = {
        "coverage": M.catalogue_coverage(lists, catalogue_size),
        "exposure_entropy": M.exposure_entropy(lists),
        "exposure_gini": M.exposure_gini(lists, catalogue_size),
    }
    if popularity is not None:
        out["novelty"] = M.novelty(lists, popularity, n_users)
    if categories is not None:
        out["ild_categories"] = M.intra_list_diversity_categories(lists, categories)
    if vectors is not None:
        out["ild_embeddings"] = M.intra_list_diversity_embeddings(
            [vectors(lst) for lst in lists if len(lst) > 1]
        )
    return {k: float(v[0] if isinstance(v, tuple) else v) for k, v in out.items()}


def compare(
    a: StageMetrics, b: StageMetrics, labels: Sequence[str], *, n_resamples: int, seed: int
) -> list[dict[str, Any]]:
    """Paired comparison of b against a on the same requests: mean difference, bootstrap 95% CI, p-value."""
    out = []
    for label in labels:
        x, y = a.per_request.get(label), b.per_request.get(label)
        if x is None or y is None or len(x) != len(y) or not len(x):
            continue
        c = M.paired_comparison(x, y, metric=label, n_resamples=n_resamples, seed=seed)
        out.append({"a": a.name, "b": b.name, **_asdict(c)})
    return out


def _asdict(obj: Any) -> dict[str, Any]:
    import dataclasses

    return {k: (float(v) if isinstance(v, np.floating) else v) for k, v in dataclasses.asdict(obj).items()}


# ---------------------------------------------------------------------- reports
def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def write_html(report: EvalReport, path: str | Path) -> Path:
    """A self-contained HTML report: tables, Recall@k curves, metric bars with 95% intervals, beyond-accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report.rows
    figures: list[tuple[str, str]] = []
    # 1. Recall@k curves per ranking
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for r in rows:
        pts = sorted((int(lbl.split("@")[1]), v) for lbl, v in r.means.items() if lbl.startswith("R@"))
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=r.name)
    ax.set_xscale("log")
    ax.set_xlabel("k")
    ax.set_ylabel("Recall@k")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    figures.append(("Recall@k per ranking", _png(fig)))
    # 2. metric bars with bootstrap 95% intervals of the mean
    labels = [lbl for lbl in rows[0].means if lbl.split("@")[0] in ("nDCG", "R", "RR")] if rows else []
    if labels:
        fig, ax = plt.subplots(figsize=(max(6, len(labels) * 1.2), 3.5))
        width = 0.8 / max(len(rows), 1)
        for i, r in enumerate(rows):
            means, errs = [], [[], []]
            for lbl in labels:
                v = r.per_request.get(lbl, np.zeros(0))
                lo, hi = M.bootstrap_ci(v, n_resamples=1000, seed=0) if len(v) else (0.0, 0.0)
                m = r.means.get(lbl, 0.0)
                means.append(m)
                errs[0].append(max(m - lo, 0))
                errs[1].append(max(hi - m, 0))
            xs = np.arange(len(labels)) + i * width
            ax.bar(xs, means, width, yerr=errs, capsize=2, label=r.name)
        ax.set_xticks(np.arange(len(labels)) + width * (len(rows) - 1) / 2, labels, rotation=30, fontsize=8)
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        figures.append(("Metrics with bootstrap 95% intervals", _png(fig)))
    # 3. beyond accuracy
    beyond_keys = sorted({k for r in rows for k in r.beyond})
    if beyond_keys:
        fig, axes = plt.subplots(1, len(beyond_keys), figsize=(2.2 * len(beyond_keys), 3))
        for ax, key in zip(np.atleast_1d(axes), beyond_keys, strict=True):
            ax.bar([r.name for r in rows], [r.beyond.get(key, math.nan) for r in rows], color="tab:green")
            ax.set_title(key, fontsize=9)
            ax.tick_params(axis="x", labelrotation=60, labelsize=7)
        figures.append(("Beyond accuracy", _png(fig)))
    # 4. accuracy / diversity trade-off (MMR λ sweep) when present
    sweep = report.extra.get("mmr_sweep")
    if sweep:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot([p["ild"] for p in sweep], [p["ndcg"] for p in sweep], marker="o")
        for p in sweep:
            ax.annotate(f"λ={p['lambda']}", (p["ild"], p["ndcg"]), fontsize=7)
        ax.set_xlabel("intra-list diversity")
        ax.set_ylabel("nDCG@10")
        ax.grid(alpha=0.3)
        figures.append(("Accuracy / diversity trade-off (MMR)", _png(fig)))

    table = (
        "<table><tr><th>ranking</th>" + "".join(f"<th>{html.escape(c)}</th>" for c in rows[0].means)
        if rows
        else "<table><tr>"
    )
    table += "".join(f"<th>{html.escape(c)}</th>" for c in beyond_keys) + "</tr>"
    for r in rows:
        table += f"<tr><td>{html.escape(r.name)}</td>" + "".join(
            f"<td>{v:.4f}</td>" for v in r.means.values()
        )
        table += "".join(f"<td>{r.beyond.get(k, math.nan):.4f}</td>" for k in beyond_keys) + "</tr>"
    table += "</table>"
    comp = ""
    if report.comparisons:
        comp = "<h2>Paired comparisons (b − a)</h2><table><tr><th>a</th><th>b</th><th>metric</th><th>diff</th><th>95% CI</th><th>p</th></tr>"
        for c in report.comparisons:
            comp += (
                f"<tr><td>{html.escape(c['a'])}</td><td>{html.escape(c['b'])}</td><td>{html.escape(c['metric'])}</td>"
                f"<td>{c['diff']:+.4f}</td><td>[{c['ci_low']:+.4f}, {c['ci_high']:+.4f}]</td><td>{c['p_value']:.4g}</td></tr>"
            )
        comp += "</table>"
    imgs = "".join(
        f"<h2>{html.escape(t)}</h2><img alt='{html.escape(t)}' src='data:image/png;base64,{b}'>"
        for t, b in figures
    )
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>twostage evaluation</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1100px}}table{{border-collapse:collapse;font-size:13px}}
td,th{{border:1px solid #ccc;padding:3px 7px;text-align:right}}td:first-child{{text-align:left}}img{{max-width:100%}}</style>
</head><body><h1>twostage evaluation</h1><p>split <b>{html.escape(report.split)}</b>, part <b>{html.escape(report.part)}</b>,
{rows[0].n_requests if rows else 0} requests</p>{table}{comp}{imgs}
<script type="application/json" id="report-data">{html.escape(json.dumps(report.to_dict(), default=str))}</script>
</body></html>"""
    path = Path(path)
    path.write_text(page, encoding="utf-8")
    return path


def write_prediction_html(result: Mapping[str, Any], path: str | Path) -> Path:
    """A self-contained HTML report of ``evaluate --predictions``: the error table, the paired comparisons
    and a bar chart of RMSE (ratings) or AUC (events) per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(result.get("rows", []))
    metrics = [m for m in ("RMSE", "MAE", "AUC", "log-loss", "nDCG@10", "MRR") if any(m in r for r in rows)]
    table = (
        "<table><tr><th>model</th><th>target</th><th>n</th>"
        + "".join(f"<th>{m}</th>" for m in metrics)
        + "</tr>"
    )
    for r in rows:
        cells = "".join(f"<td>{r[m]:.4f}</td>" if m in r else "<td></td>" for m in metrics)
        table += f"<tr><td>{html.escape(r['name'])}</td><td>{html.escape(r['target'])}</td><td>{r['n']}</td>{cells}</tr>"
    table += "</table>"
    comp = "<h2>Paired comparisons (b − a, per example)</h2><table><tr><th>a</th><th>b</th><th>target</th><th>metric</th><th>diff</th><th>95% CI</th><th>p</th></tr>"
    for c in result.get("comparisons", []):
        comp += (
            f"<tr><td>{html.escape(c['a'])}</td><td>{html.escape(c['b'])}</td><td>{html.escape(c['target'])}</td>"
            f"<td>{html.escape(c['metric'])}</td><td>{c['diff']:+.4f}</td><td>[{c['ci_low']:+.4f}, {c['ci_high']:+.4f}]</td>"
            f"<td>{c['p_value']:.4g}</td></tr>"
        )
    comp += "</table>"
    imgs = ""
    for metric in ("RMSE", "AUC", "nDCG@10"):
        shown = [r for r in rows if metric in r]
        if shown:
            fig, ax = plt.subplots(figsize=(6, 3))
            ax.bar(
                [f"{r['name']}\n{r['target']}" for r in shown], [r[metric] for r in shown], color="tab:blue"
            )
            ax.set_ylabel(metric)
            ax.grid(axis="y", alpha=0.3)
            imgs += f"<h2>{metric}</h2><img alt='{metric}' src='data:image/png;base64,{_png(fig)}'>"
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>twostage prediction evaluation</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1100px}}table{{border-collapse:collapse;font-size:13px}}
td,th{{border:1px solid #ccc;padding:3px 7px;text-align:right}}td:first-child{{text-align:left}}img{{max-width:100%}}</style>
</head><body><h1>twostage prediction evaluation</h1><p>split <b>{html.escape(str(result.get("split")))}</b>,
part <b>{html.escape(str(result.get("part")))}</b></p>{table}{comp}{imgs}
<script type="application/json" id="report-data">{html.escape(json.dumps(result, default=str))}</script>
</body></html>"""
    path = Path(path)
    path.write_text(page, encoding="utf-8")
    return path
