"""The ``twostage`` command line: each command opens the Engine, calls one method and formats the result.

Exit codes: 0 success, 1 a TwostageError (one line on stderr), 2 bad usage (click).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from twostage.errors import TwostageError


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _jsonable(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


class Output:
    """Where a command writes: JSON to stdout with --json, human text otherwise; --quiet silences chatter."""

    def __init__(self, as_json: bool, quiet: bool):
        self.as_json, self.quiet = as_json, quiet

    def result(self, data: Any, human: Callable[[], None] | str | None = None) -> None:
        if self.as_json:
            click.echo(json.dumps(_jsonable(data), indent=2, default=str))
        elif callable(human):
            human()
        elif human is not None:
            click.echo(human)

    def info(self, message: str) -> None:
        if not self.quiet and not self.as_json:
            click.echo(message, err=True)


def configure_logging(*, verbose: bool) -> None:
    """Our progress lines at INFO when verbose; libraries' INFO chatter (faiss's loader, "No device provided")
    never, their warnings always."""
    logging.basicConfig(format="%(message)s")
    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("twostage").setLevel(logging.INFO if verbose else logging.WARNING)


def output_options(func: Callable) -> Callable:
    """--json and --quiet for every command; maps TwostageError to a one-line error and exit code 1 (with
    --json, ``{"error": ..., "type": ...}`` on stdout)."""

    @click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON on stdout.")
    @click.option("--quiet", "-q", is_flag=True, help="No progress bars or chatter.")
    @functools.wraps(func)
    def wrapper(*args: Any, as_json: bool, quiet: bool, **kwargs: Any) -> Any:
        configure_logging(verbose=not (quiet or as_json))
        try:
            return func(*args, out=Output(as_json, quiet), **kwargs)
        except TwostageError as e:
            if as_json:  # a script reading stdout gets JSON either way; the exit code still says it failed
                click.echo(json.dumps({"error": str(e), "type": type(e).__name__}))
                raise SystemExit(1) from e
            raise click.ClickException(str(e)) from e

    return wrapper


def _engine(
    ctx: click.Context, out: Output, *, overrides: dict[str, Any] | None = None, read_only: bool = False
):
    """The project's Engine; ``read_only`` for commands that only read, so they never take the write lock
    and any number of them can run side by side."""
    from twostage.engine import Engine

    progress = not out.quiet and not out.as_json
    if not progress:
        _silence_library_progress()
    return Engine.open(ctx.obj["project"], overrides=overrides, progress=progress, read_only=read_only)


def _silence_library_progress() -> None:
    """--quiet/--json: no bars from transformers (e.g. "Loading weights") or the Hugging Face hub either."""
    import huggingface_hub.utils
    import transformers.utils.logging

    transformers.utils.logging.disable_progress_bar()
    huggingface_hub.utils.disable_progress_bars()


def _mapping(pairs: tuple[str, ...]) -> dict[str, str]:
    mapping = {}
    for pair in pairs:
        target, sep, source = pair.partition("=")
        if not sep or not target or not source:
            raise click.BadParameter(
                f"'{pair}' is not TARGET=COLUMN (e.g. item_id=movieId)", param_hint="--map"
            )
        mapping[target.strip()] = source.strip()
    return mapping


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--project",
    "-p",
    default=".",
    envvar="TWOSTAGE_PROJECT",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Project directory (holds twostage.toml and twostage.duckdb).",
)
@click.version_option(package_name="twostage")
@click.pass_context
def cli(ctx: click.Context, project: str) -> None:
    """twostage: two-stage recommendation and search (bi-encoder + FAISS recall, listwise cross-encoder rerank).

    Example: twostage -p demo init && twostage -p demo datasets load sample && twostage -p demo split
    """
    ctx.ensure_object(dict)
    ctx.obj["project"] = project


@cli.command()
@click.argument("directory", required=False, type=click.Path(file_okay=False))
@output_options
@click.pass_context
def init(ctx: click.Context, directory: str | None, out: Output) -> None:
    """Create a project: a default twostage.toml and an empty store.

    Example: twostage init my-project
    """
    from twostage.engine import Engine

    engine = Engine.init(directory or ctx.obj["project"])
    out.result({"project": str(engine.project_dir)}, f"Created project in {engine.project_dir}")


def _print_reports(out: Output, reports: list) -> None:
    out.result(
        reports,
        lambda: [
            click.echo(
                f"{r.kind}: {r.rows} rows from {r.file}"
                + (f", {r.rejected} rejected" if r.rejected else "")
                + (f", {r.already_stored} already in the store (skipped)" if r.already_stored else "")
                + f" ({r.seconds:.2f}s)"
            )
            for r in reports
        ],
    )


@cli.command()
@click.argument("kind", type=click.Choice(["items", "events", "queries", "judgments"]))
@click.argument("file", type=click.Path())
@click.option(
    "--map", "maps", multiple=True, metavar="TARGET=COLUMN", help="Column mapping, e.g. item_id=movieId."
)
@click.option(
    "--event", default="interaction", show_default=True, help="Event type when the file has no event column."
)
@click.option(
    "--part", default="test", show_default=True, help="Split part of judgments without a part column."
)
@click.option("--keep-rejects", is_flag=True, help="Load good rows; put bad rows in the rejects table.")
@output_options
@click.pass_context
def ingest(ctx, kind, file, maps, event, part, keep_rejects, out: Output) -> None:
    """Ingest a CSV, Parquet or JSONL file of items, events, queries or judgments (one transaction); FILE may
    also be a directory of Parquet files (a partitioned export), all loaded in that one transaction.

    Example: twostage ingest events ratings.csv --map user_id=userId --map item_id=movieId --map ts=timestamp
    """
    engine = _engine(ctx, out)
    report = engine.ingest(
        file, kind, mapping=_mapping(maps), keep_rejects=keep_rejects, event=event, part=part
    )
    _print_reports(out, [report])


@cli.group()
def datasets() -> None:
    """Known dataset layouts (MovieLens, BEIR) and the bundled sample.

    Example: twostage datasets load movielens ../shared/data/ml-latest-small
    """


@datasets.command("load")
@click.argument("layout", type=click.Choice(["movielens", "beir", "sample"]))
@click.argument("path", required=False, type=click.Path())
@output_options
@click.pass_context
def datasets_load(ctx, layout, path, out: Output) -> None:
    """Ingest a MovieLens or BEIR folder, or the bundled sample.

    Example: twostage datasets load beir ../shared/data/scifact
    """
    _print_reports(out, _engine(ctx, out).datasets_load(layout, path))


@cli.command()
@click.option(
    "--strategy", type=click.Choice(["leave-last-out", "ratio", "given"]), help="Override [split] strategy."
)
@click.option("--name", help="Split name (default: the strategy).")
@output_options
@click.pass_context
def split(ctx, strategy, name, out: Output) -> None:
    """Split events (leave-last-out, ratio) or judgments (given) into train / valid / test.

    Example: twostage split --strategy leave-last-out
    """
    counts = _engine(ctx, out).split(strategy, name=name)
    out.result(counts, " ".join(f"{part}: {n} requests" for part, n in sorted(counts.items())))


@cli.command()
@output_options
@click.pass_context
def stats(ctx, out: Output) -> None:
    """Row counts, users, event types, splits and runs of the project.

    Example: twostage stats --json
    """
    data = _engine(ctx, out, read_only=True).stats()
    out.result(data, lambda: [click.echo(f"{k:12} {v}") for k, v in data.items()])


@cli.command()
@click.argument("query")
@click.option(
    "--write",
    is_flag=True,
    help="Allow one statement that changes the store (INSERT, UPDATE, DELETE, CREATE, DROP, ALTER, ...). "
    "Still nothing outside it: no ATTACH, COPY, EXPORT, INSTALL/LOAD, and no reading other files.",
)
@output_options
@click.pass_context
def sql(ctx, query, write, out: Output) -> None:
    """Run one SQL statement on the project's store (items, events, splits, runs, results, metrics, ...).

    Read-only unless --write: the store is opened read-only and with DuckDB's external access off, so no
    file, URL, database or extension outside the store can be reached either way.

    Example: twostage sql "SELECT stage, metric, k, value FROM metrics ORDER BY 1, 2, 3"
    """
    from twostage.engine import Engine
    from twostage.project import STORE_FILE
    from twostage.store import Store

    # the project's directory and config, checked; the Engine's own store stays closed (and no model loads,
    # so no need to import transformers to silence it)
    engine = Engine.open(ctx.obj["project"])
    # a connection of its own: external access off is permanent for a DuckDB database in this process
    with Store(engine.project_dir / STORE_FILE, read_only=not write, external_access=False) as store:
        columns, rows = store.sql(query, write=write)
    out.result([dict(zip(columns, r, strict=True)) for r in rows], lambda: _table(columns, rows))


@cli.group()
def train() -> None:
    """Fine-tune the stage-1 bi-encoder or the stage-2 cross-encoder on the project's split.

    Example: twostage train retriever && twostage index build && twostage train reranker
    """


@train.command("retriever")
@click.option("--split", "split_name", help="Split to train on (default: the config's).")
@click.option("--epochs", type=int, help="Override [retriever] epochs.")
@output_options
@click.pass_context
def train_retriever(ctx, split_name, epochs, out: Output) -> None:
    """Fine-tune the bi-encoder (MultipleNegativesRankingLoss, early stopping on validation recall@K).

    Example: twostage train retriever --epochs 2
    """
    engine = _engine(ctx, out, overrides={"retriever.epochs": epochs} if epochs else None)
    result = engine.train_retriever(split=split_name)
    out.result(
        result,
        f"Saved {result.model_path} (best validation {result.best_metric:.4f}, {result.steps} steps, {result.seconds:.0f}s)",
    )


_NO_PUBLISH = click.option(
    "--no-publish",
    is_flag=True,
    help="Do not publish a serving snapshot afterwards (see 'twostage publish').",
)


def _publish_after(engine, out: Output, no_publish: bool) -> dict[str, Any] | None:
    """Publish what was just built as the current snapshot, so a running server swaps it in."""
    if no_publish:
        return None
    manifest = engine.publish()
    out.info(f"Published snapshot {manifest['snapshot_id']} (servers swap to it on their next poll)")
    return {"snapshot_id": manifest["snapshot_id"]}


@train.command("reranker")
@click.option("--split", "split_name", help="Split to train on (default: the config's).")
@click.option(
    "--loss", type=click.Choice(["listnet", "lambdaloss", "listmle"]), help="Override [reranker] loss."
)
@click.option("--epochs", type=int, help="Override [reranker] epochs.")
@click.option(
    "--tune-only",
    is_flag=True,
    help="Keep the trained model; choose its fusion and co-watch weights and rerank depth again on validation.",
)
@_NO_PUBLISH
@output_options
@click.pass_context
def train_reranker(ctx, split_name, loss, epochs, tune_only, no_publish, out: Output) -> None:
    """Fine-tune the cross-encoder listwise on stage-1 candidate lists (early stopping on validation NDCG@10).

    Example: twostage train reranker --loss listnet
    """
    overrides = {k: v for k, v in {"reranker.loss": loss, "reranker.epochs": epochs}.items() if v}
    if tune_only and overrides:
        raise click.UsageError("--tune-only keeps the trained model; --loss and --epochs apply to training")
    engine = _engine(ctx, out, overrides=overrides)

    def serving() -> str:
        settings = engine.project.settings(with_reranker=True)
        return (
            f"serving: rerank depth {settings.rerank_depth}, fusion weight {settings.fusion_weight}, "
            f"co-watch weight {settings.cowatch_weight} (chosen on validation)"
        )

    if tune_only:
        tuned = engine.train_reranker(split=split_name, tune_only=True)
        published = _publish_after(engine, out, no_publish)
        out.result(
            {**tuned, "published": published}, f"Tuned {engine.project.models_dir('reranker')}; {serving()}"
        )
        return
    result = engine.train_reranker(split=split_name)
    published = _publish_after(engine, out, no_publish)
    out.result(
        {**_jsonable(result), "published": published},
        f"Saved {result.model_path} (best validation nDCG@10 {result.best_metric:.4f}, {result.steps} steps, "
        f"{result.seconds:.0f}s); {serving()}",
    )


@train.command("ranker")
@click.option("--split", "split_name", help="Split to train on (default: the config's).")
@_NO_PUBLISH
@output_options
@click.pass_context
def train_ranker(ctx, split_name, no_publish, out: Output) -> None:
    """Train the learned stage 2 (LightGBM LambdaMART over stage-1, EASE, co-watch, popularity and history
    features; early stopping on validation nDCG@10) and choose the EASE recall channel's weight.

    Example: twostage train ranker
    """
    engine = _engine(ctx, out)
    record = engine.train_ranker(split=split_name)
    published = _publish_after(engine, out, no_publish)
    dropped = ", ".join(record["dropped"]) or "none"
    out.result(
        {**record, "published": published},
        f"Saved {engine.project.models_dir('ranker')}: validation nDCG@10 {record['valid_ndcg@10']:.4f} "
        f"(stage 1 {record['valid_stage1_ndcg@10']:.4f}), {record['trees']} trees on {record['train_lists']} "
        f"lists; features {', '.join(record['features'])} (dropped: {dropped}); EASE channel weight "
        f"{record['items_weight']} (chosen on validation)",
    )


@train.command("predictor")
@click.option("--split", "split_name", help="Split to train on (default: the config's).")
@output_options
@click.pass_context
def train_predictor(ctx, split_name, out: Output) -> None:
    """Fine-tune the behaviour predictor: a cross-encoder over (the user's behaviour as text, the item's
    text) with a rating head and a head per [predictor] events type; early stopping on validation.

    Example: twostage train predictor && twostage evaluate --predictions
    """
    engine = _engine(ctx, out)
    record = engine.train_predictor(split=split_name)

    from twostage.train.predictor import loss_label

    def fmt(losses: dict) -> str:
        return ", ".join(f"{loss_label(t)} {v:.4f}" for t, v in losses.items())

    out.result(
        record,
        f"Saved {engine.project.models_dir('predictor')}: {record['steps']} steps ({record['stopped']}), "
        f"{record['examples']['train']} training examples; validation {fmt(record['valid_best'])} "
        f"(at start: {fmt(record['valid_at_start'])})",
    )


@cli.command()
@click.argument("user_id", required=False)
@click.option("--item", "items", multiple=True, required=True, help="Item id to predict for (repeatable).")
@click.option(
    "--history",
    help="Comma-separated item ids (newest first, 'id:rating' to give a rating) instead of a stored user.",
)
@output_options
@click.pass_context
def predict(ctx, user_id, items, history, out: Output) -> None:
    """Predict how a user would respond to items: their rating, and the probability of each event type.

    Example: twostage predict 42 --item 318 --item 296
    """
    parsed = None
    if history is not None:
        parsed = []
        for entry in (h.strip() for h in history.split(",") if h.strip()):
            item, sep, rating = entry.partition(":")
            try:
                parsed.append((item, float(rating)) if sep else item)
            except ValueError:
                raise click.BadParameter(
                    f"'{entry}' is not ID or ID:RATING", param_hint="--history"
                ) from None
    with _engine(ctx, out, read_only=True) as engine:
        result = engine.predict(user_id, list(items), history=parsed)

    def human() -> None:
        for n, item in enumerate(items):
            click.echo(f"{item}\t" + "\t".join(f"{t} {v[n]:.3f}" for t, v in result.items()))

    out.result({"items": list(items), **result}, human)


@cli.command()
@click.option("--trials", type=int, help="Override [tune] trials.")
@click.option("--timeout", "timeout_seconds", type=float, help="Override [tune] timeout_seconds.")
@click.option("--split", "split_name", help="Split to tune on (default: the config's); its validation part.")
@output_options
@click.pass_context
def tune(ctx, trials, timeout_seconds, split_name, out: Output) -> None:
    """Search the [tune.space] config keys with Optuna on the validation part; write tune-best.toml.

    Each trial retrains from the earliest stage its keys touch in a copy of the project; the first trial is
    the current configuration. Never reads the test part.

    Example: twostage tune --trials 10 --timeout 600
    """
    from twostage.tune import run_tune

    engine = _engine(ctx, out)
    result = run_tune(engine, trials=trials, timeout_seconds=timeout_seconds, split=split_name)
    current = result["current_value"]
    against = f" (current configuration {current:.4f})" if current is not None else ""
    out.result(
        result,
        f"Best validation {result['metric']} {result['best_value']:.4f}{against} after {result['trials']} trials "
        f"({result['pruned']} pruned): {result['best_params']}; written to {result['best_file']}",
    )


@cli.group()
def index() -> None:
    """Build, update and inspect the FAISS index of item embeddings.

    Example: twostage index build --build hnsw && twostage index info
    """


@index.command("build")
@click.option("--name", help="Index name (default: [index] name).")
@click.option(
    "--build", "build_name", help="Build config from indexes/ (flat, hnsw, ivf, ivfpq) or a factory string."
)
@_NO_PUBLISH
@output_options
@click.pass_context
def index_build(ctx, name, build_name, no_publish, out: Output) -> None:
    """Encode every item with the current bi-encoder and write the index atomically; then publish a serving
    snapshot when the index is the one served ([index] name).

    Example: twostage index build --build hnsw
    """
    engine = _engine(ctx, out)
    manifest = engine.index_build(name, build=build_name)
    served = name is None or name == engine.config.index.name
    published = _publish_after(engine, out, no_publish or not served)
    out.result(
        {**manifest, "published": published},
        f"Built {manifest.get('factory')} index of {manifest.get('count')} items",
    )


@index.command("add")
@click.argument("item_ids", nargs=-1)
@click.option("--name", help="Index name.")
@output_options
@click.pass_context
def index_add(ctx, item_ids, name, out: Output) -> None:
    """Add or re-encode items without a rebuild; with none named, every item of the catalogue that the index
    lacks or whose text changed.

    Example: twostage index add 193609 193587
    """
    manifest = _engine(ctx, out).index_add(list(item_ids) or None, name=name)
    out.result(manifest, f"Index now holds {manifest.get('count')} items")


@index.command("remove")
@click.argument("item_ids", nargs=-1, required=True)
@click.option("--name", help="Index name.")
@output_options
@click.pass_context
def index_remove(ctx, item_ids, name, out: Output) -> None:
    """Remove items from the index without a rebuild.

    Example: twostage index remove 193609
    """
    manifest = _engine(ctx, out).index_remove(list(item_ids), name=name)
    out.result(manifest, f"Index now holds {manifest.get('count')} items")


@index.command("info")
@click.option("--name", help="Index name.")
@output_options
@click.pass_context
def index_info(ctx, name, out: Output) -> None:
    """Show the index manifest (model fingerprint, factory, count, ...), checked against the current model.

    Example: twostage index info --json
    """
    manifest = _engine(ctx, out, read_only=True).index_info(name)

    def human() -> None:
        for k, v in manifest.items():
            if k != "mismatch":
                click.echo(f"{k:18} {v}")
        if manifest["mismatch"]:
            click.echo(
                f"warning: this index does not fit the current setup: {manifest['mismatch']}", err=True
            )

    out.result(manifest, human)


def _print_ranking(out: Output, ranking) -> None:
    from twostage.explain import raised_score

    def human() -> None:
        click.echo(f"request: {ranking.request_text}")
        for h in ranking.hits:
            rr = "" if h.rerank_score is None else f"  rerank {h.rerank_score:+.3f}"
            click.echo(f"{h.rank:3}. {h.item_id:>10}  {h.title[:60]:60}  recall {h.recall_score:.3f}{rr}")
            if h.explanation:
                # the JSON keeps every driver; the text shows those whose removal lowers the score
                for d in raised_score(h.explanation.get("drivers", [])):
                    click.echo(
                        f"       because: {d['title'][:50]} (score drop {d['score_drop']:+.3f}, similarity {d['similarity']:.2f})"
                    )
                if h.explanation.get("watched_with"):
                    titles = "; ".join(w["title"][:40] for w in h.explanation["watched_with"])
                    click.echo(f"       watched with: {titles}")
                for t in raised_score(h.explanation.get("terms", [])):
                    click.echo(f"       term: {t['term']} (score drop {t['score_drop']:+.3f})")
                if channels := h.explanation.get("channels"):
                    click.echo(
                        f"       recall channels: dense {channels['dense']:.3f}, bm25 {channels['bm25']:.2f} "
                        f"(bm25 weight {channels['lexical_weight']:g})"
                    )

    out.result(ranking, human)


_DIVERSIFY = click.option(
    "--diversify",
    type=click.FloatRange(0, 1),
    help="MMR λ (1 = none, lower = more diverse; default [reranker] mmr_lambda).",
)


@cli.command()
@click.argument("text")
@click.option("-k", default=10, show_default=True, help="Results to return.")
@click.option("--stage", type=click.Choice(["rerank", "recall"]), default="rerank", show_default=True)
@click.option("--explain", is_flag=True, help="Show the query terms that drive each hit.")
@_DIVERSIFY
@output_options
@click.pass_context
def search(ctx, text, k, stage, explain, diversify, out: Output) -> None:
    """Search the catalogue with a text query (both stages by default).

    Example: twostage search "vitamin D and bone density" -k 5 --explain
    """
    _print_ranking(
        out,
        _engine(ctx, out, read_only=True).search(text, k, stage=stage, explain=explain, diversify=diversify),
    )


# the command's first name, kept so scripts that call it keep working
cli.add_command(
    click.Command("query", callback=search.callback, params=search.params, help=search.help, hidden=True)
)


@cli.command()
@click.argument("user_id", required=False)
@click.option("-k", default=10, show_default=True, help="Items to return.")
@click.option(
    "--history",
    "history",
    help="An anonymous session instead of a user: item ids, newest first, comma-separated.",
)
@click.option("--stage", type=click.Choice(["rerank", "recall"]), default="rerank", show_default=True)
@click.option("--explain", is_flag=True, help="Show which history items drove each recommendation.")
@_DIVERSIFY
@click.option(
    "--split",
    "split_name",
    help="Recommend as evaluation saw it: the user's history before this split's cut-off.",
)
@click.option(
    "--part", default="test", show_default=True, help="With --split: the held-out part whose cut-off applies."
)
@output_options
@click.pass_context
def recommend(ctx, user_id, k, history, stage, explain, diversify, split_name, part, out: Output) -> None:
    """Recommend items for a user from their history, or for an anonymous --history (both stages by default).

    Example: twostage recommend 42 -k 5 --explain
    """
    if (user_id is None) == (history is None):
        raise click.UsageError("give a USER_ID or --history ITEM,ITEM,... (one of them)")
    items = [i for i in history.split(",") if i.strip()] if history is not None else None
    ranking = _engine(ctx, out, read_only=True).recommend(
        user_id,
        k,
        history=items,
        stage=stage,
        explain=explain,
        diversify=diversify,
        split=split_name,
        part=part,
    )
    _print_ranking(out, ranking)


@cli.command()
@click.option(
    "--switch", "switch_to", metavar="ID", help="Make this published snapshot current (a rollback)."
)
@click.option("--list", "list_only", is_flag=True, help="List the published snapshots; change nothing.")
@output_options
@click.pass_context
def publish(ctx, switch_to, list_only, out: Output) -> None:
    """Freeze what serving reads (items, histories, co-watch lists, index, models, settings) into a new snapshot
    under snapshots/ and make it current; running servers swap to it.

    Example: twostage publish && twostage publish --switch 20261202-101500-123456-ab12
    """
    from twostage import snapshot

    if list_only:
        if switch_to:
            raise click.UsageError("--list changes nothing; leave out --switch")
        root = ctx.obj["project"]
        current, ids = snapshot.current_id(root), snapshot.list_snapshots(root)
        out.result(
            {"current": current, "snapshots": ids},
            lambda: [click.echo(f"{'*' if i == current else ' '} {i}") for i in ids] or click.echo("none"),
        )
        return
    engine = _engine(ctx, out)
    result = engine.publish(switch=switch_to)
    verb = "Switched to" if switch_to else "Published"
    out.result(result, f"{verb} snapshot {result['snapshot_id']} (kept: {len(result['snapshots'])})")


@cli.command()
@click.option(
    "--host", default="127.0.0.1", show_default=True, help="Address to bind (localhost by default)."
)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1, 64), help="Server processes.")
@click.option(
    "--snapshot", "snapshot_id", metavar="ID", help="Serve this snapshot (default: the current one)."
)
@click.option(
    "--api-key",
    envvar="TWOSTAGE_API_KEY",
    help="Require 'Authorization: Bearer KEY' on everything but /healthz and /readyz (env TWOSTAGE_API_KEY).",
)
@click.option("--log-level", default="warning", show_default=True, help="uvicorn's log level.")
@output_options
@click.pass_context
def serve(ctx, host, port, workers, snapshot_id, api_key, log_level, out: Output) -> None:
    """Serve search and recommendation over HTTP from the current published snapshot (FastAPI on uvicorn); a
    newly published snapshot is swapped in without dropping requests. OpenAPI docs at /docs.

    Example: twostage serve --port 8000 --workers 2
    """
    import os

    from twostage import snapshot
    from twostage.errors import MissingDependencyError

    try:
        import uvicorn
    except ImportError as e:
        raise MissingDependencyError("serving needs the serve extra: pip install 'twostage[serve]'") from e
    root = str(Path(ctx.obj["project"]).resolve())
    chosen = snapshot.check(root, snapshot_id)  # fail here, in one line, not in every worker
    # uvicorn's workers import the app themselves: the options travel in the environment
    os.environ.update({"TWOSTAGE_PROJECT": root, "TWOSTAGE_SNAPSHOT": snapshot_id or ""})
    os.environ["TWOSTAGE_API_KEY"] = api_key or ""
    out.info(
        f"Serving snapshot {chosen} of {root} on http://{host}:{port} ({workers} worker(s)); docs at /docs"
    )
    uvicorn.run(
        "twostage.serve:app_from_env",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level=log_level,
    )


@cli.command()
@click.option("--split", "split_name", help="Split (default: the config's).")
@click.option("--part", help="Held-out part (default: [eval] part, 'test').")
@click.option("--max-requests", type=int, help="Evaluate only the first N requests.")
@click.option("--no-baselines", is_flag=True, help="Skip popularity / BM25 / zero-shot baselines.")
@click.option(
    "--mmr", "mmr_lambdas", multiple=True, type=float, help="Also evaluate MMR at this λ (repeatable)."
)
@click.option("--report", type=click.Path(dir_okay=False), help="Write an HTML report with plots here.")
@click.option("--output", type=click.Path(dir_okay=False), help="Write the JSON report here.")
@click.option(
    "--predictions",
    is_flag=True,
    help="Evaluate the behaviour predictor (RMSE/MAE, AUC/log-loss) against rating baselines instead.",
)
@click.option("--max-examples", type=int, help="With --predictions: a seeded sample of N held-out ratings.")
@output_options
@click.pass_context
def evaluate(
    ctx,
    split_name,
    part,
    max_requests,
    no_baselines,
    mmr_lambdas,
    report,
    output,
    predictions,
    max_examples,
    out: Output,
) -> None:
    """Evaluate baselines, stage 1 and the full pipeline; metrics table, JSON, optional HTML report.

    Example: twostage evaluate --report report.html --mmr 0.9 --mmr 0.7
    """
    if predictions:
        from twostage.prediction_eval import table

        scored = _engine(ctx, out).evaluate_predictions(
            split=split_name, part=part, max_examples=max_examples
        )
        if output:
            Path(output).write_text(json.dumps(_jsonable(scored), indent=2, default=str), encoding="utf-8")
        if report:
            from twostage.evaluate import write_prediction_html

            write_prediction_html(scored, report)
        out.result(scored, lambda: click.echo(table(scored)))
        return
    result = _engine(ctx, out).evaluate(
        split=split_name,
        part=part,
        baselines=not no_baselines,
        max_requests=max_requests,
        mmr_lambdas=tuple(mmr_lambdas),
        report=report,
    )
    if output:
        Path(output).write_text(
            json.dumps(_jsonable(result.to_dict()), indent=2, default=str), encoding="utf-8"
        )
    out.result(result.to_dict(), lambda: _print_eval(result))


def _print_eval(result) -> None:
    click.echo(
        f"split {result.split}/{result.part}: {result.rows[0].n_requests if result.rows else 0} requests"
    )
    click.echo(result.table())
    for c in result.comparisons:
        if c["metric"].startswith(("nDCG@10", "R@100")):
            click.echo(
                f"{c['b']} vs {c['a']}: {c['metric']} {c['diff']:+.4f} [{c['ci_low']:+.4f}, {c['ci_high']:+.4f}] p={c['p_value']:.3g}"
            )
    cold = result.extra.get("cold_start")
    if cold:
        click.echo(f"cold-start slice ({cold['definition']}): {cold['n_requests']} requests")
        for name, means in cold["rows"].items():
            shown = "  ".join(f"{m} {means[m]:.4f}" for m in ("nDCG@10", "R@10", "R@100") if m in means)
            click.echo(f"  {name:16} {shown}")


@cli.command()
@click.option(
    "--project",
    "demo_dir",
    default=None,
    type=click.Path(file_okay=False),
    help="Demo project directory (or the group's -p/--project).  [default: demo-project]",
)
@output_options
@click.pass_context
def demo(ctx, demo_dir, out: Output) -> None:
    """Run the whole pipeline on the bundled sample and print metrics and explained recommendations.

    Ingest → split → fine-tune retriever → build index → train reranker → evaluate against baselines.

    Example: twostage demo --project /tmp/demo
    """
    from click.core import ParameterSource

    from twostage.demo import run_demo

    if demo_dir is None:
        given = ctx.parent.get_parameter_source("project") not in (ParameterSource.DEFAULT, None)
        demo_dir = ctx.obj["project"] if given else "demo-project"
    result = run_demo(demo_dir, progress=not out.quiet and not out.as_json, echo=out.info)
    out.result(result, lambda: click.echo(result["text"]))


def _table(columns: list[str], rows: list[tuple]) -> None:
    cells = [[str(c) for c in columns]] + [[_fmt(v) for v in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    for n, row in enumerate(cells):
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        if n == 0:
            click.echo("  ".join("-" * w for w in widths))


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def main() -> None:  # pragma: no cover
    cli(prog_name="twostage")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
