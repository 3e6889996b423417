"""Metrics: hand-worked cases, per-request agreement with ir_measures, beyond-accuracy and paired tests."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from twostage import metrics as M
from twostage.errors import ConfigError, InputError

ALL = ("recall", "precision", "ndcg", "mrr", "map", "hit")
LOG2_3, LOG2_5 = math.log2(3), math.log2(5)


# ------------------------------------------------------------------------------ hand-worked ranking
def test_hand_worked_graded_request():
    # Relevant grades: d1=2, d2=1, d3=3, d9=1  → R = 4, ideal order 3, 2, 1, 1.
    # Ranking: d0 (0), d1 (2), d5 (0), d2 (1), d7 (0)  → gains 0, 2, 0, 1, 0; hits at ranks 2 and 4.
    gains = np.array([[0.0, 2.0, 0.0, 1.0, 0.0]])
    out = M.ranking_metrics(gains, [np.array([2.0, 1.0, 3.0, 1.0])], ks=(1, 2, 5), metrics=ALL)
    expect = {
        # recall: hits within k / 4
        ("recall", 1): 0.0,
        ("recall", 2): 1 / 4,
        ("recall", 5): 2 / 4,
        # precision: hits within k / k
        ("precision", 1): 0.0,
        ("precision", 2): 1 / 2,
        ("precision", 5): 2 / 5,
        # first relevant at rank 2
        ("mrr", 1): 0.0,
        ("mrr", 2): 1 / 2,
        ("mrr", 5): 1 / 2,
        # AP@k = sum of P@r at relevant ranks r <= k, divided by R = 4 (not min(R, k)):
        # AP@2 = (1/2) / 4; AP@5 = (1/2 + 2/4) / 4
        ("map", 1): 0.0,
        ("map", 2): 0.125,
        ("map", 5): 0.25,
        # DCG@2 = 2/log2(3); IDCG@2 = 3/1 + 2/log2(3)
        # DCG@5 = 2/log2(3) + 1/log2(5); IDCG@5 = 3 + 2/log2(3) + 1/2 + 1/log2(5)
        ("ndcg", 1): 0.0,
        ("ndcg", 2): (2 / LOG2_3) / (3 + 2 / LOG2_3),
        ("ndcg", 5): (2 / LOG2_3 + 1 / LOG2_5) / (3 + 2 / LOG2_3 + 1 / 2 + 1 / LOG2_5),
        ("hit", 1): 0.0,
        ("hit", 2): 1.0,
        ("hit", 5): 1.0,
    }
    assert set(out) == set(expect)
    for key, value in expect.items():
        assert out[key].shape == (1,)
        assert out[key][0] == pytest.approx(value, abs=1e-12), key


def test_short_list_perfect_top_and_cutoff_beyond_matrix():
    # One relevant item (grade 3) returned first; only 2 columns although k = 5 is asked.
    # P@5 still divides by 5 (trec_eval); everything else is perfect.
    out = M.ranking_metrics(np.array([[3.0, 0.0]]), [[3.0]], ks=(1, 5), metrics=ALL)
    assert out["precision", 5][0] == pytest.approx(0.2)
    for name in ("recall", "ndcg", "mrr", "map", "hit"):
        assert out[name, 1][0] == pytest.approx(1.0)
        assert out[name, 5][0] == pytest.approx(1.0)


def test_graded_ndcg_below_one_when_order_is_wrong():
    # Grades 1 then 3 retrieved; ideal is 3 then 1.
    # DCG@2 = 1 + 3/log2(3); IDCG@2 = 3 + 1/log2(3).
    out = M.ranking_metrics(np.array([[1.0, 3.0]]), [[1.0, 3.0]], ks=(2,), metrics=("ndcg", "recall", "map"))
    assert out["ndcg", 2][0] == pytest.approx((1 + 3 / LOG2_3) / (3 + 1 / LOG2_3))
    # binary metrics ignore the grade size
    assert out["recall", 2][0] == 1.0
    assert out["map", 2][0] == 1.0


def test_requests_with_nothing_retrieved_or_nothing_relevant_score_zero_and_stay():
    gains = np.array([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    relevant = [np.array([2.0, 1.0]), np.array([]), np.array([1.0])]  # row 1 has no relevant item (R = 0)
    out = M.ranking_metrics(gains, relevant, ks=(1, 3), metrics=ALL)
    for key, v in out.items():
        assert v.shape == (3,), key
        assert v[0] == 0.0 and v[1] == 0.0, key
    assert out["mrr", 3][2] == 0.5
    assert out["recall", 3][2] == 1.0


def test_padded_relevant_matrix_equals_lists():
    rng = np.random.default_rng(3)
    gains = np.zeros((50, 10))
    lists = []
    for q in range(50):
        grades = rng.integers(1, 4, size=rng.integers(0, 7)).astype(float)
        lists.append(grades)
        picks = rng.permutation(10)[: rng.integers(0, len(grades) + 1)]
        gains[q, picks] = grades[: len(picks)]
    width = max(len(g) for g in lists)
    padded = np.full((50, width), np.nan)
    for q, g in enumerate(lists):
        padded[q, : len(g)] = g
    a = M.ranking_metrics(gains, lists, ks=(1, 3, 10), metrics=ALL)
    b = M.ranking_metrics(gains, padded, ks=(1, 3, 10), metrics=ALL)
    b0 = M.ranking_metrics(gains, np.nan_to_num(padded), ks=(1, 3, 10), metrics=ALL)
    for key in a:
        np.testing.assert_allclose(a[key], b[key], atol=1e-15)
        np.testing.assert_allclose(a[key], b0[key], atol=1e-15)


def test_only_requested_metrics_and_cutoffs_are_returned():
    out = M.ranking_metrics(np.zeros((4, 3)), [[1.0]] * 4, ks=(2, 3), metrics=("ndcg",))
    assert set(out) == {("ndcg", 2), ("ndcg", 3)}
    empty = M.ranking_metrics(np.zeros((0, 3)), [], ks=(1,), metrics=ALL)
    assert all(v.shape == (0,) for v in empty.values())


def test_mean_metric_from_ranked_ids_and_judgments():
    # request a: relevant b (grade 2) at rank 2, unjudged x at rank 1; request b: short list, nothing found
    rankings = [["x", "b", "c"], ["z"]]
    targets = [{"b": 2.0, "d": 1.0}, {"y": 1.0}]
    ndcg_a = (2.0 / math.log2(3)) / (2.0 + 1.0 / math.log2(3))
    assert M.mean_metric(rankings, targets, "ndcg", 3) == pytest.approx(ndcg_a / 2)
    assert M.mean_metric(rankings, targets, "recall", 3) == pytest.approx(0.25)
    assert M.mean_metric(rankings, targets, "mrr", 1) == 0.0  # cut-off above the hit


def test_ranking_input_errors():
    with pytest.raises(InputError, match="3 entries but gains has 2 rows"):
        M.ranking_metrics(np.zeros((2, 3)), [[1.0]] * 3)
    with pytest.raises(InputError, match="finite and >= 0"):
        M.ranking_metrics(np.array([[-1.0]]), [[1.0]])
    with pytest.raises(InputError, match="finite and >= 0"):
        M.ranking_metrics(np.array([[np.nan]]), [[1.0]])
    with pytest.raises(InputError, match="request row 1 retrieves 2 relevant items but relevant lists 1"):
        M.ranking_metrics(np.array([[1.0, 0.0], [1.0, 1.0]]), [[1.0], [1.0]])
    with pytest.raises(ConfigError, match="did you mean 'ndcg'"):
        M.ranking_metrics(np.zeros((1, 1)), [[1.0]], metrics=("ndgc",))
    with pytest.raises(ConfigError, match="cutoffs"):
        M.ranking_metrics(np.zeros((1, 1)), [[1.0]], ks=(0, 5))


def test_metric_labels():
    assert [M.metric_label(m, 10) for m in M.METRICS] == [
        "R@10",
        "P@10",
        "nDCG@10",
        "RR@10",
        "AP@10",
        "Hit@10",
    ]
    assert M.metric_label("recall", 100) == "R@100"
    assert M.metric_label("precision", 5) == "P@5"
    with pytest.raises(ConfigError, match="did you mean 'recall'"):
        M.metric_label("recal", 10)


# -------------------------------------------------------------------------- ir_measures agreement
def _random_case(seed: int, n_requests: int = 60, depth: int = 20):
    """A random run and graded qrels, plus the gains/relevant inputs built from them the way evaluate.py does."""
    import ir_measures

    rng = np.random.default_rng(seed)
    corpus = [f"d{i}" for i in range(120)]
    qrels, run = [], []
    gains = np.zeros((n_requests, depth))
    relevant = []
    for q in range(n_requests):
        qid = f"q{q}"
        judged = {
            d: int(g)
            for d, g in zip(
                rng.choice(corpus, size=rng.integers(1, 10), replace=False),
                rng.integers(0, 4, size=10),
                strict=False,
            )
        }
        if q % 7 == 0:  # relevant items that no system retrieves (outside the corpus)
            judged.update({f"unreachable{q}_{j}": int(rng.integers(1, 4)) for j in range(rng.integers(1, 4))})
        if q % 11 == 0:  # judged, but nothing relevant at all (R = 0)
            judged = {d: 0 for d in judged}
        qrels += [ir_measures.Qrel(qid, d, g) for d, g in judged.items()]
        relevant.append(np.array([g for g in judged.values() if g > 0], dtype=float))
        # returns between 0 and `depth` results; every third request returns fewer than depth
        n_ret = depth if q % 3 else int(rng.integers(0, depth))
        pool = list(dict.fromkeys([*rng.permutation(list(judged))[:5], *rng.permutation(corpus)]))
        pool = [d for d in pool if not d.startswith("unreachable")]
        ranked = [str(d) for d in rng.permutation(pool[:40])[:n_ret]]
        for r, d in enumerate(ranked):
            run.append(ir_measures.ScoredDoc(qid, d, float(depth - r)))  # distinct scores: no tie-breaking
            gains[q, r] = max(judged.get(d, 0), 0)
    return qrels, run, gains, relevant


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_every_metric_matches_ir_measures_per_request(seed):
    import ir_measures
    from ir_measures import AP, RR, P, R, Success, nDCG

    depth = 20
    ks = (1, 3, 5, 10, 20, 30)  # 30 > depth: missing ranks count as non-relevant
    qrels, run, gains, relevant = _random_case(seed, depth=depth)
    names = {"recall": R, "precision": P, "ndcg": nDCG, "mrr": RR, "map": AP, "hit": Success}
    measures = {(m, k): names[m] @ k for m in ALL for k in ks}
    ours = M.ranking_metrics(gains, relevant, ks=ks, metrics=ALL)
    theirs = {
        (str(r.measure), r.query_id): r.value
        for r in ir_measures.iter_calc(list(measures.values()), qrels, run)
    }
    n_returned = {q: sum(1 for s in run if s.query_id == f"q{q}") for q in range(gains.shape[0])}
    n_relevant = np.array([len(r) for r in relevant])
    assert min(n_returned.values()) < depth and max(n_returned.values()) == depth  # short lists, some empty
    assert ((gains.sum(axis=1) == 0) & (n_relevant > 0)).any()  # relevant items never retrieved
    assert (n_relevant == 0).any() and (gains.sum(axis=1) > 0).any()
    checked = 0
    for key, measure in measures.items():
        for q in range(gains.shape[0]):
            # ir_measures skips requests that returned nothing; trec_eval -c (and we) count them as 0
            expected = theirs.get((str(measure), f"q{q}"), 0.0)
            assert ours[key][q] == pytest.approx(expected, abs=1e-6), (key, q)
            checked += 1
    assert checked == len(ALL) * len(ks) * gains.shape[0]
    # calc_aggregate averages over every judged request, counting those that returned nothing as 0
    # (trec_eval -c): exactly the plain mean of our per-request values
    aggregate = ir_measures.calc_aggregate([nDCG @ 10, AP @ 10, R @ 20], qrels, run)
    assert float(np.mean(ours["ndcg", 10])) == pytest.approx(aggregate[nDCG @ 10], abs=1e-9)
    assert float(np.mean(ours["map", 10])) == pytest.approx(aggregate[AP @ 10], abs=1e-9)
    assert float(np.mean(ours["recall", 20])) == pytest.approx(aggregate[R @ 20], abs=1e-9)


# ------------------------------------------------------------------------------ beyond accuracy
def test_catalogue_coverage():
    assert M.catalogue_coverage([["a", "b"], ["b", "c"], []], 10) == pytest.approx(0.3)
    assert M.catalogue_coverage([], 5) == 0.0
    with pytest.raises(InputError, match="catalogue_size is 2"):
        M.catalogue_coverage([["a", "b", "c"]], 2)


def test_exposure_entropy():
    uniform = [["a", "b"], ["c", "d"]]
    assert M.exposure_entropy(uniform) == pytest.approx(2.0)  # log2(4)
    assert M.exposure_entropy(uniform, normalize=True) == pytest.approx(1.0)
    assert M.exposure_entropy(uniform, normalize=True, catalogue_size=16) == pytest.approx(0.5)
    # counts a:2, b:1, c:1 → p = 1/2, 1/4, 1/4 → H = 1/2 + 1/2 + 1/2 = 1.5 bits
    assert M.exposure_entropy([["a", "b"], ["a", "c"]]) == pytest.approx(1.5)
    assert M.exposure_entropy([["a"], ["a"]]) == 0.0
    assert M.exposure_entropy([["a"], ["a"]], normalize=True) == 0.0
    assert M.exposure_entropy([[], []]) == 0.0


def test_exposure_gini_hand_cases():
    catalogue = [f"i{j}" for j in range(50)]
    # every item exposed equally (twice) → 0
    assert M.exposure_gini([catalogue, catalogue], 50) == pytest.approx(0.0, abs=1e-12)
    # all exposure on one item of 100 → (n − 1)/n = 0.99
    assert M.exposure_gini([["a"]] * 7, 100) == pytest.approx(0.99)
    # counts 0, 0, 1, 3 over n = 4: (−3·0 − 1·0 + 1·1 + 3·3) / (4 · 4) = 10/16
    assert M.exposure_gini([["a", "b"], ["b"], ["b"]], 4) == pytest.approx(0.625)
    assert M.exposure_gini([], 4) == 0.0
    with pytest.raises(InputError):
        M.exposure_gini([["a", "b"]], 1)


def test_exposure_gini_matches_mean_absolute_difference_definition():
    rng = np.random.default_rng(0)
    items = [f"i{j}" for j in range(30)]
    lists = [list(rng.choice(items, size=5, replace=False, p=np.arange(1, 31) / 465)) for _ in range(200)]
    n = 40  # ten catalogue items never exposed
    counts = np.zeros(n)
    for lst in lists:
        for item in lst:
            counts[int(item[1:])] += 1
    # G = Σ_i Σ_j |x_i − x_j| / (2 n² mean)
    expected = np.abs(counts[:, None] - counts[None, :]).sum() / (2 * n * n * counts.mean())
    assert M.exposure_gini(lists, n) == pytest.approx(expected, abs=1e-12)


def test_intra_list_diversity_embeddings_hand_cases():
    s = 1 / math.sqrt(2)
    lists = [
        np.eye(3),  # orthogonal → every pair at distance 1
        np.array([[1.0, 0, 0], [5.0, 0, 0]]),  # same direction, any length → 0
        np.array([[1.0, 0, 0], [-2.0, 0, 0]]),  # opposite → 2
        np.array([[1.0, 0, 0], [1.0, 1.0, 0]]),  # 45° → 1 − 1/√2
        np.array([[1.0, 2.0, 3.0]]),  # one item: no pairs
    ]
    mean, per_list = M.intra_list_diversity_embeddings(lists)
    np.testing.assert_allclose(per_list[:4], [1.0, 0.0, 2.0, 1 - s], atol=1e-12)
    assert np.isnan(per_list[4])
    assert mean == pytest.approx((1.0 + 0.0 + 2.0 + 1 - s) / 4)
    assert M.intra_list_diversity_embeddings([np.ones((1, 4))])[0] == 0.0


def test_intra_list_diversity_embeddings_matches_pairwise_loop():
    rng = np.random.default_rng(1)
    lists = [rng.normal(size=(int(rng.integers(2, 8)), 6)) for _ in range(30)]
    _, per_list = M.intra_list_diversity_embeddings(lists)
    for vecs, value in zip(lists, per_list, strict=True):
        dists = [
            1 - vecs[i] @ vecs[j] / (np.linalg.norm(vecs[i]) * np.linalg.norm(vecs[j]))
            for i in range(len(vecs))
            for j in range(i + 1, len(vecs))
        ]
        assert value == pytest.approx(np.mean(dists), abs=1e-12)
    same_length = rng.normal(size=(5, 4, 3))  # a 3-D array works too
    np.testing.assert_allclose(
        M.intra_list_diversity_embeddings(same_length)[1],
        M.intra_list_diversity_embeddings(list(same_length))[1],
    )


def test_intra_list_diversity_categories():
    cats = {"a": {"x", "y"}, "b": {"y", "z"}, "c": set()}
    mean, per_list = M.intra_list_diversity_categories(
        [["a", "b"], ["a", "c"], ["c", "unknown"], ["a", "b", "c"], ["a"]], cats
    )
    # a,b: 1 − |{y}|/|{x,y,z}| = 2/3; a,c: 1 − 0/2 = 1; c,unknown: both empty → 0; a,b,c: (2/3 + 1 + 1)/3
    np.testing.assert_allclose(per_list[:4], [2 / 3, 1.0, 0.0, 8 / 9], atol=1e-12)
    assert np.isnan(per_list[4])
    assert mean == pytest.approx((2 / 3 + 1 + 0 + 8 / 9) / 4)


def test_novelty():
    pop = {"a": 8, "b": 2, "c": 1}
    # n_users = 8: a → −log2(8/8) = 0, b → −log2(2/8) = 2, c → 3, unseen → log2(9)
    assert M.novelty([["a", "b"]], pop, 8) == pytest.approx(1.0)
    assert M.novelty([["c", "zzz"]], pop, 8) == pytest.approx((3 + math.log2(9)) / 2)
    # mean over non-empty lists, each list weighing the same
    assert M.novelty([["a", "b"], ["c"], []], pop, 8) == pytest.approx((1.0 + 3.0) / 2)
    assert M.novelty([[]], pop, 8) == 0.0
    assert M.novelty([["zzz"]], pop, 8) > M.novelty([["c"]], pop, 8)  # unseen is rarer than seen once
    with pytest.raises(InputError, match="user counts"):
        M.novelty([["a"]], {"a": 9}, 8)
    with pytest.raises(InputError, match="n_users"):
        M.novelty([["a"]], pop, 0)


# --------------------------------------------------------------------------- paired comparison
def test_identical_systems_have_zero_difference():
    a = np.random.default_rng(0).random(200)
    assert M.paired_bootstrap(a, a.copy()) == (0.0, 0.0, 0.0)
    c = M.paired_comparison(a, a.copy(), metric="nDCG@10", n_resamples=2000)
    assert (c.diff, c.ci_low, c.ci_high, c.p_value) == (0.0, 0.0, 0.0, 1.0)
    assert c.mean_a == c.mean_b == pytest.approx(a.mean())
    assert M.paired_permutation_test(a, a) == 1.0


def test_noisy_equal_systems_ci_contains_zero():
    rng = np.random.default_rng(5)
    a = rng.random(300)
    b = a + rng.normal(0, 0.1, size=300)
    b -= (b - a).mean()  # exact mean difference 0
    diff, low, high = M.paired_bootstrap(a, b, n_resamples=4000, seed=1)
    assert diff == pytest.approx(0.0, abs=1e-12)
    assert low < 0 < high
    assert M.paired_ttest(a, b) > 0.5
    assert M.paired_permutation_test(a, b, n_resamples=2000) > 0.5


def test_shifted_system_is_detected_and_ci_matches_normal_approximation():
    rng = np.random.default_rng(7)
    a = rng.random(400)
    b = a + 0.05 + rng.normal(0, 0.1, size=400)
    c = M.paired_comparison(a, b, metric="R@10", n_resamples=5000, seed=3)
    d = b - a
    se = d.std(ddof=1) / math.sqrt(d.size)
    assert c.diff == pytest.approx(d.mean())
    assert 0 < c.ci_low < c.diff < c.ci_high
    # the percentile bootstrap of a mean is close to mean ± 1.96·se for n = 400
    assert c.ci_low == pytest.approx(d.mean() - 1.96 * se, abs=0.15 * se)
    assert c.ci_high == pytest.approx(d.mean() + 1.96 * se, abs=0.15 * se)
    assert c.p_value < 1e-6
    assert M.paired_comparison(a, b, test="permutation", n_resamples=2000).p_value == pytest.approx(1 / 2001)
    # the reverse direction flips the sign of the difference and interval
    r = M.paired_comparison(b, a, n_resamples=5000, seed=3)
    assert r.diff == pytest.approx(-c.diff) and r.ci_high < 0


def test_bootstrap_is_seeded_and_chunking_does_not_bias(monkeypatch):
    v = np.random.default_rng(2).random(500)
    assert M.bootstrap_ci(v, n_resamples=3000, seed=4) == M.bootstrap_ci(v, n_resamples=3000, seed=4)
    whole = M.bootstrap_ci(v, n_resamples=3000, seed=4)
    monkeypatch.setattr(M, "_CHUNK_CELLS", 1000)  # two resamples per chunk
    chunked = M.bootstrap_ci(v, n_resamples=3000, seed=4)
    se = v.std(ddof=1) / math.sqrt(v.size)
    assert chunked == pytest.approx(whole, abs=0.2 * se)


def test_paired_edge_cases_and_errors():
    assert M.paired_ttest([0.3], [0.5]) == 1.0  # one pair: no evidence
    assert M.paired_ttest([1.0, 2.0, 3.0], [1.5, 2.5, 3.5]) == 0.0  # constant non-zero difference
    assert M.paired_ttest([0.1, 0.2, 0.3], [0.2, 0.3, 0.4]) == 0.0  # the same, up to rounding
    with pytest.raises(InputError, match="same non-zero length"):
        M.paired_bootstrap([1.0, 2.0], [1.0])
    with pytest.raises(InputError, match="same non-zero length"):
        M.paired_ttest([], [])
    with pytest.raises(InputError, match="finite"):
        M.paired_comparison([1.0, np.nan], [1.0, 2.0])
    with pytest.raises(ConfigError, match="unknown paired test"):
        M.paired_comparison([1.0, 2.0], [1.0, 2.0], test="wilcoxon")


def test_paired_comparison_is_a_frozen_dataclass_with_fixed_fields():
    c = M.paired_comparison([0.0, 1.0, 0.5], [1.0, 1.0, 0.5], metric="RR@10", n_resamples=100)
    assert [f.name for f in dataclasses.fields(c)] == [
        "metric",
        "mean_a",
        "mean_b",
        "diff",
        "ci_low",
        "ci_high",
        "p_value",
    ]
    assert all(
        isinstance(getattr(c, f), float) for f in ("mean_a", "mean_b", "diff", "ci_low", "ci_high", "p_value")
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.diff = 1.0  # type: ignore[misc]
