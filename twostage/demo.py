"""``twostage demo``: the whole pipeline on the bundled MovieLens sample, from nothing, in a few minutes.

The demo's settings are written into the demo project's ``twostage.toml`` so a user can read and rerun them.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twostage.config import CONFIG_FILE
from twostage.errors import TwostageError

MARKER = ".twostage-demo"

# Sized so the demo ends well inside 10 minutes on a 2-core CPU: short movie texts, a small rerank depth.
DEMO_TOML = """\
# The demo project's config: the bundled MovieLens sample, leave-last-out, both stages fine-tuned.
# Sized for a 2-core CPU: short texts, a small training budget and a shallow rerank depth.
[text]
item_template = "{title}. {categories}. Tags: {tags}"
user_template = "Recently watched: {history}"
history_item_template = "{title}"
history_size = 5

[split]
strategy = "leave-last-out"

[retriever]
max_seq_length = 64
epochs = 1
train_batch_size = 32
max_train_pairs = 1600
eval_requests = 100
learning_rate = 1e-4
# popularity prior (logQ correction of in-batch negatives), chosen on ml-latest-small's validation part
popularity_weight = 0.05

[index]
build = "flat"
depth = 100

[reranker]
max_length = 96
depth = 15
list_size = 8
max_train_requests = 200
eval_requests = 300
train_batch_size = 4
learning_rate = 5e-5

[ranker]
max_train_requests = 1500

[predictor]
# behaviour prediction: the rating a user would give, over user + item biases; a 2-minute budget here
max_train_examples = 4000
eval_every = 25
time_budget_minutes = 2

[eval]
ks = [1, 5, 10, 20, 100]
max_requests = 200
"""


def run_demo(
    project_dir: str | Path, *, progress: bool = True, echo: Callable[[str], None] = print
) -> dict[str, Any]:
    """Run every stage on the bundled sample in ``project_dir`` (recreated if it is a demo project)."""
    from twostage.engine import Engine
    from twostage.explain import raised_score

    root = Path(project_dir)
    if root.exists() and any(root.iterdir()):
        if not (root / MARKER).exists():
            raise TwostageError(f"{root} exists and is not a demo project; pick another --project")
        shutil.rmtree(root)
    root.mkdir(parents=True)
    (root / MARKER).write_text("created by twostage demo; deleted and recreated by the next demo run\n")
    (root / CONFIG_FILE).write_text(DEMO_TOML, encoding="utf-8")

    timings: dict[str, float] = {}
    engine = Engine.open(root, progress=progress)

    def step(name: str, fn: Callable[[], Any]) -> Any:
        echo(f"[demo] {name} ...")
        started = time.perf_counter()
        value = fn()
        timings[name] = round(time.perf_counter() - started, 1)
        echo(f"[demo] {name}: {timings[name]:.1f}s")
        return value

    step("ingest sample", lambda: engine.datasets_load("sample"))
    counts = step("split", engine.split)
    retriever = step("fine-tune retriever", engine.train_retriever)
    step("build index", engine.index_build)
    reranker = step("train reranker", engine.train_reranker)
    ranker = step("train learned ranker", engine.train_ranker)
    report = step(
        "evaluate", lambda: engine.evaluate(report=root / "report.html", mmr_lambdas=(0.9, 0.7, 0.5))
    )
    predictor = step("train predictor", engine.train_predictor)
    predicted = step("evaluate predictions", engine.evaluate_predictions)
    user = sorted(engine.store.targets(engine.default_split(), "test"))[0]
    ranking = step("recommend (explained)", lambda: engine.recommend(user, 5, explain=True))
    expected = engine.predict(user, ranking.item_ids())["rating"]
    published = step("publish snapshot", engine.publish)

    settings = engine.project.settings(with_reranker=True)
    lines = [
        f"Demo project: {root}  (stats: {engine.stats()['items']} items, {engine.stats()['events']} events)",
        f"Split: {counts}",
        f"Retriever fine-tuned: best validation {retriever.best_metric:.4f}",
        f"Reranker trained: best validation nDCG@10 {reranker.best_metric:.4f}; rerank depth "
        f"{settings.rerank_depth}, fusion weight {settings.fusion_weight}, co-watch weight "
        f"{settings.cowatch_weight} (chosen on validation)",
        f"Learned ranker (stage 2 from now on): validation nDCG@10 {ranker['valid_ndcg@10']:.4f} on the lists "
        f"with a positive in reach, {ranker['trees']} trees; features {', '.join(ranker['features'])}; EASE "
        f"channel weight {ranker['items_weight']} (chosen on validation)",
        "",
        f"Test metrics ({report.extra['n_requests']} requests of split {report.split}, part {report.part}; "
        "full ranking over the items each user has not seen):",
        report.table(
            [
                c
                for c in report.rows[0].means
                if c.split("@")[0] in ("R", "nDCG", "RR") and not c.endswith("@1")
            ]
        ),
        *_significance(report.comparisons),
        "",
        f"HTML report: {root / 'report.html'}",
        "",
        *_prediction_lines(predictor, predicted),
        "",
        f"Recommendations for user {user} ({ranking.request_text[:100]}...):",
    ]
    serve_hint = (
        f"Published snapshot {published['snapshot_id']}: serve it with "
        f"'twostage -p {root} serve' and try "
        f"curl -s localhost:8000/recommend -H 'Content-Type: application/json' -d '{{\"user_id\": \"{user}\"}}'"
    )
    for hit, rating in zip(ranking.hits, expected, strict=True):
        lines.append(f"  {hit.rank}. {hit.title}  (predicted rating {rating:.1f})")
        for d in raised_score((hit.explanation or {}).get("drivers", []))[:2]:
            lines.append(f"       because you watched {d['title']} (score drop {d['score_drop']:+.3f})")
        watched_with = [w["title"] for w in (hit.explanation or {}).get("watched_with", [])]
        if watched_with:
            lines.append(f"       often watched with your {'; '.join(watched_with[:3])}")
    lines += [
        "",
        serve_hint,
        "",
        "Stage times (s): " + ", ".join(f"{k} {v}" for k, v in timings.items()),
        f"Total: {sum(timings.values()):.0f}s",
    ]
    engine.close()
    return {
        "project": str(root),
        "timings": timings,
        "snapshot": published["snapshot_id"],
        "report": report.to_dict(),
        "recommendations": ranking,
        "text": "\n".join(lines),
    }


def _prediction_lines(record: dict[str, Any], scored: dict[str, Any]) -> list[str]:
    """The behaviour predictor's test RMSE beside the rating baselines, with its paired tests."""
    rmse = {r["name"]: r["RMSE"] for r in scored["rows"] if r["target"] == "rating"}
    lines = [
        f"Behaviour predictor ({record['steps']} steps, {record['stopped']}): test RMSE on "
        f"{next(r['n'] for r in scored['rows'] if r['target'] == 'rating')} held-out ratings: "
        + ", ".join(f"{name} {value:.4f}" for name, value in rmse.items())
    ]
    lines += [
        f"predictor vs {c['a']}: MSE {c['diff']:+.4f} (95% CI [{c['ci_low']:+.4f}, {c['ci_high']:+.4f}], "
        f"p = {c['p_value']:.2g}, paired)"
        for c in scored["comparisons"]
        if c["target"] == "rating"
    ]
    return lines


def _significance(comparisons: list[dict[str, Any]], metric: str = "nDCG@10") -> list[str]:
    """The paired test a reader wants next to the table: does stage 2 beat stage 1 beyond chance?"""
    return [
        f"{c['b']} vs {c['a']}, {metric}: {c['diff']:+.4f} (95% CI [{c['ci_low']:+.4f}, {c['ci_high']:+.4f}], "
        f"p = {c['p_value']:.2f}, paired bootstrap)"
        for c in comparisons
        if c["metric"] == metric and (c["a"], c["b"]) in (("recall", "rerank"), ("popularity", "recall"))
    ]
