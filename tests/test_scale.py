"""Tests for twostage.scale: Ray Data encoding and shard-by-shard index builds give the local path's result.

Ray runs in local mode, one cluster of 2 CPUs for the whole session. Recall is measured against brute-force
NumPy on clustered synthetic vectors (as in tests/test_index.py); encoding uses the tiny random BERT.
"""

from __future__ import annotations

import json
import random
import sys

import numpy as np
import pytest

from twostage.config import ScaleConfig, load_config
from twostage.errors import ConfigError, IndexMismatchError, InputError, MissingDependencyError
from twostage.index import IndexSpec, VectorIndex, load_spec
from twostage.scale import (
    ShardedIndex,
    ShardSet,
    _ray,
    build_index_from_shards,
    build_shard_indexes,
    encode_items_ray,
    write_shards,
)

WORDS = "space war love heat casino toy story night day city life world crime drama comedy film movie".split()
RAY_CFG = ScaleConfig(engine="ray", actors=2, batch_size=64, num_gpus_per_actor=0, shard_rows=150)


@pytest.fixture(scope="session")
def ray_cluster():
    ray = pytest.importorskip("ray")
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        object_store_memory=200 * 1024**2,
        configure_logging=False,
    )
    assert ray.util.get_node_ip_address() == "127.0.0.1"  # test traffic stays on loopback
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def items() -> list[tuple[str, str]]:
    rng = random.Random(0)
    return [(f"item-{i}", " ".join(rng.choices(WORDS, k=rng.randint(2, 12)))) for i in range(500)]


@pytest.fixture(scope="module")
def local_encoder(tiny_bert_path):
    from twostage.encoders import BiEncoder

    return BiEncoder(tiny_bert_path, device="cpu", max_seq_length=48, batch_size=32)


@pytest.fixture(scope="module")
def ray_shards(ray_cluster, tiny_bert_path, items, local_encoder, tmp_path_factory) -> ShardSet:
    out = tmp_path_factory.mktemp("scale") / "shards"
    return encode_items_ray(
        tiny_bert_path,
        items,
        out,
        RAY_CFG,
        max_seq_length=48,
        encode_batch_size=32,
        model_fingerprint=local_encoder.fingerprint,
    )


def clustered(n: int, n_queries: int, *, dim: int = 64, centres: int = 50, seed: int = 0):
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centres, dim)).astype(np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)

    def points(m: int) -> np.ndarray:
        x = c[rng.integers(0, centres, m)] + 2.0 * rng.standard_normal((m, dim)).astype(np.float32) / np.sqrt(
            dim
        )
        return np.ascontiguousarray(x / np.linalg.norm(x, axis=1, keepdims=True), dtype=np.float32)

    return points(n), points(n_queries)


def exact_top(x: np.ndarray, q: np.ndarray, k: int) -> list[set[int]]:
    return [set(row) for row in np.argsort(-(q @ x.T), axis=1)[:, :k].tolist()]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    x, q = clustered(12_000, 100)
    ids = [f"v{i}" for i in range(len(x))]
    shards = write_shards(
        ids, x, tmp_path_factory.mktemp("synthetic") / "shards", model_fingerprint="fp", shard_rows=2500
    )
    return ids, x, q, shards


# -- encoding ----------------------------------------------------------------------------------------------


def test_ray_encoding_equals_local_encoding(ray_shards, items, local_encoder):
    local = local_encoder.encode([text for _, text in items])
    assert ray_shards.rows == len(items) and len(ray_shards) >= 4
    assert all(rows <= RAY_CFG.shard_rows for _, rows in ray_shards.shards)
    assert ray_shards.item_ids() == [i for i, _ in items]  # input order
    got = np.concatenate([ray_shards.vectors(s) for s in range(len(ray_shards))])
    np.testing.assert_allclose(got, local, atol=1e-5)
    manifest = json.loads((ray_shards.root / "manifest.json").read_text())
    assert manifest["model_fingerprint"] == local_encoder.fingerprint
    assert manifest["dim"] == local_encoder.dim and manifest["rows"] == len(items)
    assert sorted(p.name for p in ray_shards.root.iterdir()) == sorted(
        ["manifest.json"] + [f"{name}{ext}" for name, _ in ray_shards.shards for ext in (".npy", ".ids")]
    )


def test_parquet_input_and_a_failed_run_keeps_the_old_shards(ray_shards, tiny_bert_path, items, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "items.parquet"
    pq.write_table(
        pa.table({"item_id": [i for i, _ in items[:200]], "text": [t for _, t in items[:200]]}), path
    )
    out = tmp_path / "shards"
    got = encode_items_ray(tiny_bert_path, path, out, RAY_CFG, max_seq_length=48, encode_batch_size=32)
    assert got.item_ids() == [i for i, _ in items[:200]]
    want = np.concatenate([ray_shards.vectors(s) for s in range(len(ray_shards))])[:200]
    np.testing.assert_allclose(np.concatenate([got.vectors(s) for s in range(len(got))]), want, atol=1e-5)
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(IndexMismatchError, match="model_fingerprint"):
        encode_items_ray(tiny_bert_path, path, out, RAY_CFG, model_fingerprint="another-model")
    assert sorted(p.name for p in out.iterdir()) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left


def test_ray_needs_the_scale_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(MissingDependencyError, match=r"pip install 'twostage\[scale\]'"):
        _ray(RAY_CFG)


# -- building from shards -------------------------------------------------------------------------------------


def test_flat_from_ray_shards_equals_the_local_build(ray_shards, items, local_encoder, tmp_path):
    spec = load_spec("flat")
    from_shards = build_index_from_shards(ray_shards, spec, vectors_path=tmp_path / "vectors.npy")
    local_vecs = local_encoder.encode([text for _, text in items])
    local = VectorIndex.build(
        [i for i, _ in items], local_vecs, spec, model_fingerprint=local_encoder.fingerprint
    )
    queries = local_encoder.encode(["space war", "a love story", "crime in the city at night", "toy"])
    got, want = from_shards.search(queries, 10), local.search(queries, 10)
    assert [[i for i, _ in r] for r in got] == [[i for i, _ in r] for r in want]
    np.testing.assert_allclose([[s for _, s in r] for r in got], [[s for _, s in r] for r in want], atol=1e-5)
    assert from_shards.manifest["model_fingerprint"] == local_encoder.fingerprint
    assert from_shards.item_ids == local.item_ids
    # and exactly the index VectorIndex.build makes from the same (concatenated) vectors, saved and loaded
    same = VectorIndex.build(
        ray_shards.item_ids(), from_shards.vectors(from_shards.item_ids), spec, model_fingerprint="x"
    )
    _assert_same_hits(from_shards.search(queries, 50), same.search(queries, 50))
    from_shards.save(tmp_path / "index")
    _assert_same_hits(VectorIndex.load(tmp_path / "index").search(queries, 50), same.search(queries, 50))


def _assert_same_hits(got, want):
    """Same items in the same order; scores equal up to float32 rounding (unit vectors normalised again)."""
    assert [[i for i, _ in r] for r in got] == [[i for i, _ in r] for r in want]
    np.testing.assert_allclose([[s for _, s in r] for r in got], [[s for _, s in r] for r in want], atol=1e-6)


def test_ivfpq_from_shards_reaches_recall_and_matches_the_local_build(synthetic, tmp_path):
    ids, x, q, shards = synthetic
    # 64 lists (each >= 39 training vectors), 32 probed; PQ32x4fs codes refined exactly over 16 x k candidates
    spec = IndexSpec(
        factory="IVF{nlist},PQ{pq_m}x4fs,RFlat", nlist=64, pq_m=32, nprobe=32, k_factor=16, train_size=5000
    )
    from_shards = build_index_from_shards(shards, spec, vectors_path=tmp_path / "v.npy")
    local = VectorIndex.build(ids, x, spec, model_fingerprint="fp")
    truth = exact_top(x, q, 100)

    def recall(index) -> float:
        found = [{int(i[1:]) for i, _ in r} for r in index.search(q, 100)]
        return float(np.mean([len(f & t) / 100 for f, t in zip(found, truth, strict=True)]))

    def overlap(a, b) -> float:
        ra, rb = a.search(q, 100), b.search(q, 100)
        return float(
            np.mean([len({i for i, _ in u} & {i for i, _ in v}) / 100 for u, v in zip(ra, rb, strict=True)])
        )

    assert recall(from_shards) >= 0.9  # half the lists probed (the local build measures 0.94 here)
    assert overlap(from_shards, local) >= 0.99  # same training sample, same adds: the same index
    assert from_shards.manifest["resolved_factory"] == "IVF64,PQ32x4fs,RFlat"


def test_ivf_build_keeps_vectors_on_disk(synthetic, tmp_path):
    _, x, _, shards = synthetic
    index = build_index_from_shards(shards, load_spec("ivf"), vectors_path=tmp_path / "v.npy")
    assert isinstance(index._vecs, np.memmap) and str(index._vecs.filename) == str(tmp_path / "v.npy")
    assert [p.name for p in tmp_path.iterdir()] == ["v.npy"]
    np.testing.assert_array_equal(index.vectors(["v0", "v11999"]), x[[0, 11999]])


def test_wrong_fingerprint_is_refused(synthetic):
    _, _, _, shards = synthetic
    with pytest.raises(IndexMismatchError, match="model_fingerprint"):
        build_index_from_shards(shards, load_spec("flat"), model_fingerprint="other")


# -- sharded search ----------------------------------------------------------------------------------------------


def test_sharded_flat_search_equals_one_index(synthetic):
    ids, x, q, shards = synthetic
    spec = load_spec("flat")
    sharded = ShardedIndex(build_shard_indexes(shards, spec))
    single = VectorIndex.build(ids, x, spec, model_fingerprint="fp")
    assert len(sharded.shards) == 5 and sharded.count == len(ids) and sharded.item_ids == ids
    got, want = sharded.search(q, 100), single.search(q, 100)
    assert [[i for i, _ in r] for r in got] == [[i for i, _ in r] for r in want]
    np.testing.assert_allclose([[s for _, s in r] for r in got], [[s for _, s in r] for r in want], atol=1e-6)
    banned = [{i for i, _ in r[:5]} for r in want]
    assert sharded.search(q, 10, exclude=banned) == single.search(q, 10, exclude=banned)
    np.testing.assert_array_equal(sharded.vectors(["v3", "v9000"]), x[[3, 9000]])


def test_sharded_ivf_shares_the_quantizer(synthetic, tmp_path):
    _, _, q, shards = synthetic
    spec = IndexSpec(factory="IVF{nlist},Flat", nlist=64, nprobe=8, train_size=5000)
    sharded = ShardedIndex(build_shard_indexes(shards, spec))
    one = build_index_from_shards(shards, spec, vectors_path=tmp_path / "v.npy")
    # the same coarse lists in every shard: probing 8 of them visits exactly what one index visits
    assert [[i for i, _ in r] for r in sharded.search(q, 50)] == [
        [i for i, _ in r] for r in one.search(q, 50)
    ]


def test_sharded_index_refuses_mismatched_shards(synthetic):
    ids, x, _, _ = synthetic
    a = VectorIndex.build(ids[:10], x[:10], load_spec("flat"), model_fingerprint="fp")
    b = VectorIndex.build(ids[10:20], x[10:20], load_spec("flat"), model_fingerprint="other")
    with pytest.raises(IndexMismatchError, match="model_fingerprint"):
        ShardedIndex([a, b])
    with pytest.raises(InputError, match="appears more than once"):
        ShardedIndex([a, a])
    a.remove(["v0"])
    with pytest.raises(InputError, match="free rows"):
        ShardedIndex([a])


# -- config --------------------------------------------------------------------------------------------------


def test_scale_defaults(tmp_path):
    assert load_config(tmp_path).scale == ScaleConfig()
    assert ScaleConfig().engine == "local" and ScaleConfig().actors == 2


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("[scale]\nengine = 'spark'\n", "scale.engine: 'spark' is not one of ['local', 'ray']"),
        ("[scale]\nengin = 'ray'\n", "scale.engin: unknown key (did you mean 'engine'?)"),
        ("[scale]\nactors = 0\n", "scale.actors: must be at least 1, got 0"),
        ("[scale]\nbatch_size = 0\n", "scale.batch_size: must be at least 1, got 0"),
        ("[scale]\nshard_rows = -5\n", "scale.shard_rows: must be at least 1, got -5"),
        ("[scale]\nnum_gpus_per_actor = -1\n", "scale.num_gpus_per_actor: must be at least 0, got -1.0"),
        ("[scale]\nray_address = ' '\n", "scale.ray_address: empty address"),
        ("[scale]\nactors = 'two'\n", "scale.actors: expected an integer, got 'two'"),
    ],
)
def test_bad_scale_config_names_key(tmp_path, toml, message):
    (tmp_path / "twostage.toml").write_text(toml)
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path)
    assert message in str(err.value)


def test_ray_engine_config_parses(tmp_path):
    (tmp_path / "twostage.toml").write_text(
        "[scale]\nengine = 'ray'\nray_address = 'auto'\nnum_gpus_per_actor = 1\n"
    )
    scale = load_config(tmp_path).scale
    assert (scale.engine, scale.ray_address, scale.num_gpus_per_actor) == ("ray", "auto", 1.0)


# -- the engine ------------------------------------------------------------------------------------------------


def test_index_build_on_ray_equals_the_local_build(ray_cluster, tiny_bert_path, tmp_path):
    from conftest import make_movielens

    from twostage import Engine

    project = tmp_path / "project"
    Engine.init(project)
    config = f'[retriever]\nmodel = "{tiny_bert_path}"\nmax_seq_length = 48\n'
    (project / "twostage.toml").write_text(config)
    engine = Engine.open(project)
    engine.datasets_load("movielens", make_movielens(tmp_path / "data"))
    local = engine.index_build()
    local_index = engine.project.index()
    ids, vecs = local_index.item_ids, local_index.vectors(local_index.item_ids)
    engine.close()
    (project / "twostage.toml").write_text(config + '[scale]\nengine = "ray"\nshard_rows = 16\n')
    engine = Engine.open(project)
    on_ray = engine.index_build()
    ray_index = engine.project.index()
    assert (project / "cache" / "shards" / "manifest.json").is_file()
    assert on_ray["count"] == local["count"] and on_ray["model_fingerprint"] == local["model_fingerprint"]
    assert ray_index.item_ids == ids
    np.testing.assert_allclose(ray_index.vectors(ids), vecs, atol=1e-5)
    engine.close()
