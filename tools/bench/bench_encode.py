"""Bi-encoder throughput on real text: does BiEncoder add overhead over plain sentence-transformers?

1. Load all-MiniLM-L6-v2 (offline package) once; warm up on 32 texts.
2. Encode 500 SciFact abstracts (title + " " + text) with plain ``SentenceTransformer.encode`` (the baseline,
   same model object, same batch size), then with ``BiEncoder.encode``: texts/second for each and the ratio.
3. The embedding cache: a cold pass (encode + write) and a warm pass (all hits) over the same 500 texts.

One pass each, to be gentle with a shared machine: run under ``nice``.
Usage: HF_HUB_OFFLINE=1 nice -n 10 python tools/bench/bench_encode.py  → tools/bench/results/encode.json
"""

from __future__ import annotations

import json
import tempfile
import time

import numpy as np
from common import SHARED_DATA, write

from twostage.encoders import BiEncoder, EmbeddingCache, encode_cached


def load_texts(n: int) -> list[str]:
    texts = []
    with open(SHARED_DATA / "scifact" / "corpus.jsonl", encoding="utf-8") as f:
        for line in f:
            doc = json.loads(line)
            texts.append(f"{doc.get('title', '')} {doc.get('text', '')}".strip())
            if len(texts) == n:
                break
    return texts


def timed(fn):
    started = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - started


def main(n: int = 500, batch_size: int = 64) -> None:
    texts = load_texts(n)
    encoder = BiEncoder(None, device="cpu", batch_size=batch_size)
    model = encoder.model
    encoder.encode(texts[:32])  # warm-up

    plain, plain_s = timed(
        lambda: model.encode(texts, batch_size=batch_size, convert_to_numpy=True, show_progress_bar=False)
    )
    ours, ours_s = timed(lambda: encoder.encode(texts))
    _, fingerprint_s = timed(lambda: BiEncoder.from_model(model).fingerprint)
    with tempfile.TemporaryDirectory() as tmp:
        cache = EmbeddingCache(tmp)
        cold, cold_s = timed(lambda: encode_cached(encoder, texts, cache))
        warm, warm_s = timed(lambda: encode_cached(encoder, texts, cache))
        assert cache.last_stats.misses == 0
    np.testing.assert_allclose(ours, plain / np.linalg.norm(plain, axis=1, keepdims=True), atol=1e-5)
    np.testing.assert_allclose(cold, ours, atol=1e-5)
    np.testing.assert_array_equal(warm, cold)

    result = {
        "texts": n,
        "batch_size": batch_size,
        "max_seq_length": encoder.max_seq_length,
        "mean_chars": float(np.mean([len(t) for t in texts])),
        "plain_sentence_transformers": {"seconds": plain_s, "texts_per_s": n / plain_s},
        "biencoder": {"seconds": ours_s, "texts_per_s": n / ours_s},
        "ratio_biencoder_over_plain": ours_s / plain_s,
        "fingerprint_seconds": fingerprint_s,
        "cache_cold": {"seconds": cold_s, "texts_per_s": n / cold_s},
        "cache_warm": {"seconds": warm_s, "texts_per_s": n / warm_s},
    }
    path = write("encode", result)
    print(json.dumps(result, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
