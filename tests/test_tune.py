"""``twostage tune``: Optuna over config keys on the validation part (issue 20, part)."""

from __future__ import annotations

import json
import shutil
import tomllib

import pytest
from click.testing import CliRunner
from conftest import make_served_project

from twostage import Engine
from twostage.cli import cli
from twostage.config import Config
from twostage.errors import ConfigError
from twostage.tune import check_space


def test_the_search_space_is_checked_against_the_config():
    config = Config()
    check_space({"ranker.num_leaves": {"int": [3, 31]}, "reranker.loss": {"choice": ["listnet"]}}, config)
    with pytest.raises(ConfigError, match="num_leafs"):
        check_space({"ranker.num_leafs": {"int": [3, 31]}}, config)
    with pytest.raises(ConfigError, match="low < high"):
        check_space({"ranker.learning_rate": {"uniform": [0.1, 0.01]}}, config)
    with pytest.raises(ConfigError, match="one of"):
        check_space({"ranker.learning_rate": {"gaussian": [0.1, 0.01]}}, config)
    with pytest.raises(ConfigError, match="empty"):
        check_space({}, config)


def test_two_trials_record_their_runs_and_write_the_best_config(tiny_bert_path, tmp_path):
    project = make_served_project(
        tmp_path,
        tiny_bert_path,
        "[ranker]\nmax_train_requests = 100\nmin_data_in_leaf = 5\nease_min_users = 1\n"
        '[tune.space]\n"ranker.num_leaves" = { int = [4, 16] }\n',
    )
    runner = CliRunner()
    trained = runner.invoke(cli, ["--project", str(project), "train", "ranker", "--quiet"])
    assert trained.exit_code == 0, trained.output
    result = runner.invoke(cli, ["--project", str(project), "tune", "--trials", "2", "--json", "--quiet"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["trials"] == 2 and data["stages"] == ["ranker"] and data["split"] == "leave-last-out"
    best = tomllib.loads((project / "tune-best.toml").read_text())
    assert set(best) == {"ranker"} and 4 <= best["ranker"]["num_leaves"] <= 16
    engine = Engine.open(project)
    _, rows = engine.store.sql("SELECT config FROM runs WHERE kind = 'tune-trial' ORDER BY created_at")
    params = [json.loads(r[0])["params"] for r in rows]
    assert len(params) == 2 and params[0] == {"ranker.num_leaves": 15}  # the first is the current config
    assert max(json.loads(r[0])["value"] for r in rows) == pytest.approx(data["best_value"])
    assert not (project / ".tune").exists()
    engine.close()
    shutil.rmtree(project, ignore_errors=True)
