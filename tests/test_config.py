"""Config loading: defaults, TOML, overrides, unknown keys with suggestions, type checks."""

from __future__ import annotations

import pytest

from twostage.config import DEFAULT_TOML, Config, load_config
from twostage.errors import ConfigError


def test_defaults_when_no_file(tmp_path):
    assert load_config(tmp_path) == Config()


def test_default_toml_is_the_defaults(tmp_path):
    (tmp_path / "twostage.toml").write_text(DEFAULT_TOML)
    assert load_config(tmp_path) == Config()


def test_values_and_tuples(tmp_path):
    (tmp_path / "twostage.toml").write_text(
        "[eval]\nks = [5, 20]\n[reranker]\ndepth = 20\nmmr_lambda = 0.7\n"
    )
    config = load_config(tmp_path)
    assert config.eval.ks == (5, 20)
    assert config.reranker.depth == 20
    assert config.reranker.mmr_lambda == 0.7


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("[reranker]\nlos = 'listnet'\n", "reranker.los: unknown key (did you mean 'loss'?)"),
        ("[rerankr]\ndepth = 3\n", "rerankr: unknown section (did you mean 'reranker'?)"),
        ("[reranker]\ndepth = 'ten'\n", "reranker.depth: expected an integer, got 'ten'"),
        ("[reranker]\nloss = 'listnett'\n", "reranker.loss: 'listnett' is not one of"),
        ("[split]\nratios = [0.5, 0.2, 0.2]\n", "split.ratios: ratios must sum to 1"),
        ("[index\n", "not valid TOML"),
        ("[split]\nratios = [1.5, -0.5, 0.0]\n", "split.ratios: each ratio must be in [0, 1]"),
        ("[text]\nhistory_size = -3\n", "text.history_size: must be at least 1, got -3"),
        ("[retriever]\nepochs = 0\n", "retriever.epochs: must be at least 1, got 0"),
        ("[reranker]\nlist_size = 1\n", "reranker.list_size: a listwise loss needs lists of at least 2"),
        ("[reranker]\nlearning_rate = 0.0\n", "reranker.learning_rate: must be above 0"),
        ("[retriever]\npopularity_weight = -0.1\n", "retriever.popularity_weight: must be at least 0"),
        ("[eval]\nks = [0, 10]\n", "eval.ks: cut-offs must be at least 1, got [0, 10]"),
        ("[eval]\nmetrics = ['ndgc']\n", "eval.metrics: unknown ranking metric 'ndgc'"),
        ("[text]\nuser_template = 'Likes: {hist}'\n", "text.user_template: the user template has only"),
        ("[eval]\nbootstrap = 0\n", "eval.bootstrap: must be at least 1, got 0"),
        ("[retriever]\nlearning_rate = inf\n", "retriever.learning_rate: must be a finite number, got inf"),
        ("[reranker]\ncowatch_weight = inf\n", "reranker.cowatch_weight: must be a finite number"),
    ],
)
def test_bad_config_names_key(tmp_path, toml, message):
    (tmp_path / "twostage.toml").write_text(toml)
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path)
    assert message in str(err.value)
    assert "twostage.toml" in str(err.value)


def test_replace_overrides_and_hash():
    base = Config()
    changed = base.replace({"reranker.depth": 10})
    assert changed.reranker.depth == 10
    assert base.hash("retriever") == changed.hash("retriever")
    assert base.hash("reranker") != changed.hash("reranker")
    with pytest.raises(ConfigError, match="did you mean 'depth'"):
        base.replace({"reranker.dept": 3})


def test_zero_validation_requests_means_training_without_validation(tmp_path):
    (tmp_path / "twostage.toml").write_text("[retriever]\neval_requests = 0\n[reranker]\neval_requests = 0\n")
    config = load_config(tmp_path)
    assert (config.retriever.eval_requests, config.reranker.eval_requests) == (0, 0)
