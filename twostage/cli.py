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


def output_options(func: Callable) -> Callable:
    """--json and --quiet for every command; maps TwostageError to a one-line error and exit code 1."""

    @click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON on stdout.")
    @click.option("--quiet", "-q", is_flag=True, help="No progress bars or chatter.")
    @functools.wraps(func)
    def wrapper(*args: Any, as_json: bool, quiet: bool, **kwargs: Any) -> Any:
        logging.basicConfig(level=logging.WARNING if quiet or as_json else logging.INFO, format="%(message)s")
        try:
            return func(*args, out=Output(as_json, quiet), **kwargs)
        except TwostageError as e:
            raise click.ClickException(str(e)) from e

    return wrapper


def _engine(ctx: click.Context, out: Output, *, overrides: dict[str, Any] | None = None):
    from twostage.engine import Engine

    return Engine.open(ctx.obj["project"], overrides=overrides, progress=not out.quiet and not out.as_json)


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
    "--project", "-p", default=".", envvar="TWOSTAGE_PROJECT", show_default=True, type=click.Path(file_okay=False),
    help="Project directory (holds twostage.toml and twostage.duckdb).",
)  # fmt: skip
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
            click.echo(f"{r.kind}: {r.rows} rows from {r.file}" + (f", {r.rejected} rejected" if r.rejected else "")
                       + f" ({r.seconds:.2f}s)")
            for r in reports
        ],
    )  # fmt: skip


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
    """Ingest a CSV, Parquet or JSONL file of items, events, queries or judgments (one transaction).

    Example: twostage ingest events ratings.csv --map user_id=userId --map item_id=movieId --map ts=timestamp
    """
    engine = _engine(ctx, out)
    report = engine.ingest(
        file, kind, mapping=_mapping(maps), keep_rejects=keep_rejects, event=event, part=part
    )
    _print_reports(out, [report])


@cli.group()
def datasets() -> None:
    """Known dataset layouts (MovieLens, BEIR) and the bundled sample."""


@datasets.command("load")
@click.argument("layout", type=click.Choice(["movielens", "beir", "sample"]))
@click.argument("path", required=False, type=click.Path())
@output_options
@click.pass_context
def datasets_load(ctx, layout, path, out: Output) -> None:
    """Ingest a MovieLens or BEIR folder, or the bundled sample.

    Example: twostage datasets load beir ../shared/data/scifact
    """
    _print_reports(out, _engine(ctx, out).load_dataset(layout, path))


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
    data = _engine(ctx, out).stats()
    out.result(data, lambda: [click.echo(f"{k:12} {v}") for k, v in data.items()])


@cli.command()
@click.argument("query")
@output_options
@click.pass_context
def sql(ctx, query, out: Output) -> None:
    """Run SQL on the project's store (items, events, splits, runs, results, metrics, ...).

    Example: twostage sql "SELECT stage, metric, k, value FROM metrics ORDER BY 1, 2, 3"
    """
    columns, rows = _engine(ctx, out).sql(query)
    out.result([dict(zip(columns, r, strict=True)) for r in rows], lambda: _table(columns, rows))


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
