"""GPU code paths: run only where CUDA and a FAISS GPU build exist (marker ``gpu``)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
faiss = pytest.importorskip("faiss")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]


def test_bi_encoder_runs_in_half_precision(tiny_bert_path):
    from twostage.encoders import BiEncoder

    encoder = BiEncoder(str(tiny_bert_path), device="cuda")
    assert next(encoder.model.parameters()).dtype == torch.float16
    vecs = encoder.encode(["a movie", "a cell"])
    assert vecs.dtype == np.float32
    assert np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-3)


@pytest.mark.skipif(faiss.get_num_gpus() == 0, reason="faiss has no GPU")
def test_gpu_index_matches_cpu():
    from twostage.index import VectorIndex, load_spec

    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((2000, 64)).astype(np.float32)
    ids = [str(i) for i in range(len(vecs))]
    cpu = VectorIndex.build(ids, vecs, load_spec("flat"), model_fingerprint="t", use_gpu=False)
    gpu = VectorIndex.build(ids, vecs, load_spec("flat"), model_fingerprint="t", use_gpu=True)
    assert [h[0] for h in cpu.search(vecs[:5], 10)[0]] == [h[0] for h in gpu.search(vecs[:5], 10)[0]]
