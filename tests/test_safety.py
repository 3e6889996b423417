"""Safety (issue 19): names stay inside the project, k is capped, crash leftovers are cleaned, ids are trimmed,
a mismatched index says what changed (and `index info` still shows it), and --json errors are JSON."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import make_movielens

from twostage import Engine
from twostage.atomic import clean_leftovers, replace_dir, staging_dir
from twostage.cli import cli
from twostage.config import load_config
from twostage.errors import ConfigError, TwostageError


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_bert_path) -> Path:
    """A small project with the tiny BERT and a built index (no reranker)."""
    root = tmp_path_factory.mktemp("safety")
    project = root / "project"
    Engine.init(project)
    (project / "twostage.toml").write_text(f'[retriever]\nmodel = "{tiny_bert_path}"\nmax_seq_length = 32\n')
    engine = Engine.open(project)
    engine.datasets_load("movielens", make_movielens(root / "data"))
    engine.index_build()
    engine.close()
    return project


@pytest.fixture
def project(built, tmp_path) -> Path:
    """A private copy of the built project inside tmp_path/work (so '../' names have somewhere to land)."""
    copy = tmp_path / "work" / "project"
    shutil.copytree(built, copy)
    return copy


def run(project: Path, *args: str):
    return CliRunner().invoke(cli, ["-p", str(project), *args])


def _tree(path: Path) -> dict[str, int]:
    return {str(p.relative_to(path)): p.stat().st_size for p in sorted(path.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------- 1. names stay in the project
@pytest.mark.parametrize("name", ["../../victim", "../project", "/tmp/elsewhere", "a/b", ".hidden", "..", ""])
def test_index_names_that_are_not_plain_are_refused_and_nothing_moves(project, tmp_path, name):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    before = _tree(tmp_path)
    result = run(project, "index", "build", "--name", name)
    assert result.exit_code == 1, result.output
    assert "is not a plain name" in result.output and "Traceback" not in result.output
    assert _tree(tmp_path) == before
    assert not list(tmp_path.glob("**/.*.old-*"))


def test_a_configured_index_name_must_be_plain_too(tmp_path):
    (tmp_path / "twostage.toml").write_text('[index]\nname = "../escape"\n')
    with pytest.raises(ConfigError, match=r"'\.\./escape' is not a plain name"):
        load_config(tmp_path)


def test_replace_dir_never_moves_aside_a_directory_holding_the_new_version(tmp_path):
    outer = tmp_path / "outer"
    (outer / "inner").mkdir(parents=True)
    staged = staging_dir(outer / "inner" / "x")
    with pytest.raises(ValueError, match="refusing to replace"):
        replace_dir(staged, outer)
    assert (outer / "inner").is_dir() and staged.is_dir() and not list(tmp_path.glob(".outer.old-*"))


# ---------------------------------------------------------------------- 4. k is capped
def test_k_beyond_the_cap_is_refused_with_the_key_to_raise(project):
    result = run(project, "recommend", "1", "-k", "100000")
    assert result.exit_code == 1
    assert "k is 100000; a ranking has at most 1000 items ([index] max_k)" in result.output
    assert run(project, "search", "comedy", "-k", "1001").exit_code == 1
    assert run(project, "search", "comedy", "-k", "1000").exit_code == 0


def test_depths_beyond_the_cap_are_refused_in_config(tmp_path):
    (tmp_path / "twostage.toml").write_text("[index]\nmax_k = 50\ndepth = 100\n")
    with pytest.raises(ConfigError, match=r"index.depth: must be at most \[index\] max_k \(50\)"):
        load_config(tmp_path)


# ---------------------------------------------------------------------- 5. smaller items
def test_crash_leftovers_are_cleaned_on_open_and_an_aside_copy_restored(project):
    indexes, models = project / "indexes", project / "models"
    (indexes / ".default.tmp-deadbeef").mkdir()
    (indexes / ".default.tmp-deadbeef" / "index.faiss").write_bytes(b"half")
    (indexes / ".default.old-cafe0001").mkdir()  # default exists: a stale aside copy
    shutil.copytree(indexes / "default", indexes / ".other.old-cafe0002")  # crash between the renames
    models.mkdir(exist_ok=True)
    (models / ".work-abc123").mkdir()
    (models / ".reranker.tmp-00000000").mkdir()
    (project / "snapshots").mkdir()
    (project / "snapshots" / ".20261202-000000-000000-ab12.tmp").mkdir()
    (project / "snapshots" / ".current.tmp-12345678").write_text("x")
    engine = Engine.open(project)
    engine.stats()
    assert sorted(p.name for p in indexes.iterdir()) == ["default", "other"]
    assert engine.index_info("other")["count"] == 40  # the restored copy is a whole index
    assert list(models.iterdir()) == [] and list((project / "snapshots").iterdir()) == []
    engine.close()


def test_cleaning_a_directory_that_has_no_leftovers_changes_nothing(tmp_path):
    (tmp_path / "visible").mkdir()
    assert clean_leftovers(tmp_path) == [] and clean_leftovers(tmp_path / "missing") == []
    assert [p.name for p in tmp_path.iterdir()] == ["visible"]


def test_user_ids_are_trimmed_like_ingest_trims_them(project):
    padded = json.loads(run(project, "recommend", " 1 ", "--json", "--stage", "recall").stdout)
    plain = json.loads(run(project, "recommend", "1", "--json", "--stage", "recall").stdout)
    assert padded["hits"] and padded["hits"] == plain["hits"] and padded["request_id"] == "1"


def test_a_mismatched_index_says_what_changed_and_index_info_still_shows_it(project):
    config = project / "twostage.toml"
    config.write_text(config.read_text() + '[text]\nitem_template = "{title}"\n')
    result = run(project, "search", "comedy")
    assert result.exit_code == 1
    assert (
        "the index was built with [text] item_template '{title}. {categories}. {body}', which is now '{title}'"
        in result.output
    )
    assert "rebuild the index (twostage index build)" in result.output
    info = run(project, "index", "info", "--json")
    assert info.exit_code == 0, info.output
    data = json.loads(info.stdout)
    assert data["count"] == 40 and "item_template" in data["mismatch"]
    assert data["provenance"]["item_template"] == "{title}. {categories}. {body}"
    human = run(project, "index", "info")
    assert human.exit_code == 0 and "warning: this index does not fit the current setup" in human.output


def test_a_retrained_model_is_named_in_the_mismatch(project, tiny_bert_path):
    engine = Engine.open(project)
    shutil.copytree(tiny_bert_path, project / "models" / "retriever")
    weights = next((project / "models" / "retriever").rglob("model.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-64:] = bytes(64)  # other weights
    weights.write_bytes(bytes(data))
    engine.close()
    result = run(project, "search", "comedy")
    assert result.exit_code == 1
    assert (
        f"the index was built with the bi-encoder {tiny_bert_path}, but the retriever is now" in result.output
    )


def test_errors_under_json_are_json_on_stdout_with_exit_code_1(project):
    result = run(project, "recommend", "nobody", "--json")
    assert result.exit_code == 1
    error = json.loads(result.stdout)
    assert error["type"] == "NotFoundError" and "unknown user 'nobody'" in error["error"]
    assert isinstance(TwostageError(error["error"]), Exception)
