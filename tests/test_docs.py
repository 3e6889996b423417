"""Documentation stays true: every CLI command has help with an example and is in the README, the README's
library example runs, the CLI starts without importing torch, and the README results generator renders."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from twostage.cli import cli

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def _commands(group: click.Group, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], click.Command]]:
    """Every command and sub-command under ``group``, depth first, with its path of names."""
    found = []
    for name, command in sorted(group.commands.items()):
        if command.hidden:  # an old name kept for scripts, not documented
            continue
        found.append(((*path, name), command))
        if isinstance(command, click.Group):
            found.extend(_commands(command, (*path, name)))
    return found


COMMANDS = _commands(cli)
LEAVES = [(path, c) for path, c in COMMANDS if not isinstance(c, click.Group)]
GROUPS = [(path, c) for path, c in COMMANDS if isinstance(c, click.Group)]


def _ids(items: list[tuple[tuple[str, ...], click.Command]]) -> list[str]:
    return [" ".join(path) for path, _ in items]


def _readme_block(heading: str, language: str) -> str:
    """The first fenced ``language`` block after ``## heading`` in README.md."""
    match = re.search(
        rf"^## {re.escape(heading)}.*?^```{language}\n(.*?)^```", README.read_text("utf-8"), re.S | re.M
    )
    if match is None:
        raise AssertionError(f"README.md has no ```{language} block under '## {heading}'")
    return match.group(1)


def test_walk_finds_the_documented_commands():
    names = set(_ids(COMMANDS))
    assert {"init", "datasets load", "train retriever", "train reranker", "index build", "search"} <= names
    assert len(LEAVES) >= 15


# click re-flows a docstring paragraph, so "Example:" must start its own paragraph to show as its own line
HELP_CASES = [
    pytest.param(path, command, id=" ".join(path) or "twostage")
    for path, command in [((), cli), *LEAVES, *GROUPS]
]


@pytest.mark.parametrize(("path", "command"), HELP_CASES)
def test_command_help_has_an_example(path, command):
    result = CliRunner().invoke(cli, [*path, "--help"], prog_name="twostage")
    assert result.exit_code == 0, result.output
    assert (command.help or "").strip(), f"twostage {' '.join(path)} has no help text"
    example = re.search(r"^\s*Example:\s*(twostage\b.*)$", result.output, re.M)
    assert example, f"'twostage {' '.join(path)} --help' has no 'Example: twostage ...' line"
    # the example runs the command it documents (options like -p may come first)
    assert " ".join(path) in example.group(1), example.group(1)


@pytest.mark.parametrize(("path", "command"), GROUPS, ids=_ids(GROUPS))
def test_group_help_is_not_empty(path, command):
    result = CliRunner().invoke(cli, [*path, "--help"], prog_name="twostage")
    assert result.exit_code == 0, result.output
    assert (command.help or "").strip()
    for name in command.commands:
        assert name in result.output


@pytest.mark.parametrize("path", _ids(COMMANDS))
def test_command_is_in_the_readme(path):
    assert re.search(rf"\btwostage {re.escape(path)}\b", README.read_text("utf-8")), (
        f"README.md never shows 'twostage {path}'"
    )


def test_cli_walk_through_uses_only_real_commands():
    names = set(_ids(COMMANDS))
    for line in _readme_block("CLI walk-through", "bash").splitlines():
        words = line.split("#", 1)[0].split()
        if words[:1] != ["twostage"]:
            continue
        first = words[1]
        assert first in names, f"walk-through line uses unknown command: {line.strip()}"
        if isinstance(cli.commands[first], click.Group):
            assert f"{first} {words[2]}" in names, f"unknown sub-command: {line.strip()}"


def test_cli_import_does_not_import_torch():
    code = (
        "import sys, twostage.cli\n"
        "heavy = [m for m in ('torch', 'sentence_transformers', 'faiss', 'pandas') if m in sys.modules]\n"
        "print(heavy)\n"
        "sys.exit(1 if heavy else 0)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60, check=False
    )
    assert result.returncode == 0, f"heavy modules imported by 'import twostage.cli': {result.stdout}"


def test_twostage_help_runs():
    result = subprocess.run(
        [sys.executable, "-m", "twostage", "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    for name in cli.commands:
        assert name in result.stdout


@pytest.mark.slow
def test_readme_library_example_runs(tmp_path):
    """Real MiniLM over the 1,500-item bundled sample: about 55 s on the shared 2-core box, hence slow."""
    code = _readme_block("Library", "python")
    assert 'Engine.init("/tmp/twostage-readme")' in code
    code = code.replace('Engine.init("/tmp/twostage-readme")', f"Engine.init({str(tmp_path / 'project')!r})")
    script = tmp_path / "readme_example.py"
    script.write_text(code, encoding="utf-8")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=900,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 6, result.stdout
    for rank, line in enumerate(lines[:5], start=1):
        assert line.startswith(f"{rank} "), line
        assert re.search(r" -?\d+\.\d+ ", line), f"no score in ranked line: {line}"
    titles = ast.literal_eval(lines[5])
    assert isinstance(titles, list) and len(titles) == 3
    assert all(isinstance(t, str) and t for t in titles)
    assert "Toy Story (1995)" in titles


# --- tools/bench/readme_tables.py ------------------------------------------------------------------------


def _readme_tables():
    spec = importlib.util.spec_from_file_location(
        "readme_tables", ROOT / "tools" / "bench" / "readme_tables.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


MACHINE = {"cpu": "Test CPU", "cores": 2, "torch": "2.13.0+cpu", "faiss": "1.15.1"}


def _synthetic_results() -> dict:
    return {
        "quality_scifact": {
            "machine": MACHINE,
            "when": "2026-01-02 03:04:05",
            "dataset": "BEIR SciFact test (300 queries)",
            "zero_shot_eval": {
                "bm25": {"nDCG@10": 0.6651, "R@10": 0.79, "R@100": 0.9253, "RR@10": 0.63, "seconds": 1.0},
                "stage1": {"nDCG@10": 0.6451, "R@10": 0.78, "R@100": 0.9250, "RR@10": 0.61},
            },
            "fine_tuned_eval": {
                "bm25": {"nDCG@10": 0.6651, "R@10": 0.79, "R@100": 0.9253, "RR@10": 0.63, "seconds": 1.0},
                "pipeline": {"nDCG@10": 0.7012, "R@10": 0.83, "R@100": 0.9400, "RR@10": 0.66},
            },
            "stage_seconds": {"ingest": 2.5, "train_retriever": 300.0},
        },
        "quality_movielens": {
            "machine": MACHINE,
            "when": "2026-01-02 04:00:00",
            "eval": {"popularity": {"nDCG@10": 0.0101, "R@100": 0.12}},
            "reranker_training": {"fusion_weight": 0.0, "cowatch_weight": 1.0, "rerank_depth": 50},
            "stage2_ablation": {
                "co-watch, no cross-encoder": {
                    "fusion_weight": 1.0,
                    "cowatch_weight": 2.0,
                    "eval": {"nDCG@10": 0.0456, "R@100": 0.3, "seconds": 9.0},
                }
            },
        },
        "ingest_eval": {
            "machine": MACHINE,
            "when": "2026-01-01 00:00:00",
            "ingest": {"rows": 100836, "seconds": {"median": 0.135}},
            "evaluate": {
                "requests": 10000,
                "depth": 100,
                "ours_seconds": {"median": 0.2},
                "ir_measures_seconds": {"median": 1.4},
                "ratio_ours_over_ir_measures": 0.1428,
            },
        },
    }


def test_readme_tables_render_quality_and_performance():
    rt = _readme_tables()
    text = rt.render(_synthetic_results())
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("| ranking") or "nDCG@10" in line)
    assert "nDCG@10" in header and "R@100" in header and "RR@10" in header
    # scifact: bm25 is identical in both runs and shown once; the pipeline row carries its numbers
    assert sum("bm25" in line for line in lines) == 1
    pipeline = next(line for line in lines if "pipeline" in line and line.startswith("|"))
    assert "0.7012" in pipeline and "0.9400" in pipeline
    # movielens has no R@10/RR@10 columns: only the ones present
    ml_start = lines.index(next(line for line in lines if "MovieLens" in line or "movielens" in line))
    ml_header = next(line for line in lines[ml_start:] if line.startswith("|"))
    assert "R@10 " not in ml_header and "RR@10" not in ml_header and "nDCG@10" in ml_header
    # stage-2 ablation rows carry their weights; the served weights are stated under the table
    ablation = next(line for line in lines if "no cross-encoder" in line)
    assert "w 1.0, c 2.0" in ablation and "**0.0456**" in ablation
    assert "fusion weight w 0.0, co-watch weight c 1.0, rerank depth 50" in text
    # performance: ingest seconds and the eval ratio against ir_measures
    assert any("100,836" in line and "0.135" in line for line in lines)
    assert any("ir_measures" in line and "1.40" in line and "0.14" in line for line in lines)
    # machine line and dates
    assert "Test CPU" in text and "2 cores" in text and "torch 2.13.0+cpu" in text
    assert "2026-01-02" in text


def test_readme_tables_replace_only_between_markers(tmp_path):
    rt = _readme_tables()
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n<!-- results:start -->\nold\n<!-- results:end -->\n\nafter\n", encoding="utf-8")
    results_dir = tmp_path / "results"
    results_dir.mkdir()
    data = _synthetic_results()["ingest_eval"]
    (results_dir / "ingest_eval.json").write_text(json.dumps(data), encoding="utf-8")
    results, missing = rt.load_results(results_dir)
    assert list(results) == ["ingest_eval"]
    assert "encode" in missing and "quality_scifact" in missing
    rt.update_readme(readme, rt.render(results))
    new = readme.read_text("utf-8")
    assert new.startswith("# x\n\n<!-- results:start -->\n") and new.endswith(
        "<!-- results:end -->\n\nafter\n"
    )
    assert "old" not in new and "100,836" in new
    # running twice gives the same file
    rt.update_readme(readme, rt.render(results))
    assert readme.read_text("utf-8") == new


def test_readme_tables_refuses_a_readme_without_markers(tmp_path):
    rt = _readme_tables()
    readme = tmp_path / "README.md"
    readme.write_text("# no markers\n", encoding="utf-8")
    with pytest.raises(ValueError, match="results:start"):
        rt.update_readme(readme, "table")
    assert readme.read_text("utf-8") == "# no markers\n"


def test_readme_tables_render_rating_prediction():
    rt = _readme_tables()

    def row(name, rmse, target="rating", **more):
        return {"name": name, "target": target, "n": 1234, "RMSE": rmse, "MAE": rmse - 0.2, **more}

    comparison = {"a": "biases", "b": "predictor", "target": "rating", "diff": -0.0287, "p_value": 1e-9}
    data = {
        "time": {
            "split": "ratio by time",
            "rows": [
                row("global-mean", 1.1),
                row("biases", 1.07),
                row("biased-mf", 1.06),
                row("predictor", 1.05),
            ],
            "comparisons": [comparison],
        },
        "multitask": {
            "budget_minutes": 12,
            "variants": {
                "multi-task": {
                    "tasks": {"rating": 1.0, "listnet": 0.3},
                    "training": {"steps": 7},
                    "rows": [
                        row("predictor", 1.04),
                        {"name": "predictor", "target": "listnet", "n": 9, "nDCG@10": 0.41, "MRR": 0.33},
                    ],
                }
            },
        },
    }
    lines = rt.render_prediction(data)
    table_row = next(line for line in lines if line.startswith("| ratio by time"))
    assert "1,234" in table_row and "**1.0500 / 0.8500**" in table_row and "Δ -0.0287, p=1e-09" in table_row
    assert table_row.endswith("| - |")  # no comparison with biased MF was given
    multi = next(line for line in lines if line.startswith("| multi-task"))
    assert "rating 1, listnet 0.3" in multi and "1.0400" in multi and "0.4100" in multi and "| 7 |" in multi
