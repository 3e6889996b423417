"""Ranking and beyond-accuracy metrics in plain NumPy, so every reported number has one written formula.

Ranking metrics agree with trec_eval / ir_measures per request (``tests/test_metrics.py`` checks this):
one ``cumsum`` over a (requests × K) gain matrix gives every @k at once. Beyond-accuracy metrics
(coverage, exposure entropy and Gini, intra-list diversity, novelty) and paired comparisons (bootstrap
intervals, paired tests) sit beside them. Each docstring states its formula and edge cases (RecBole-style).

Conventions shared by all ranking metrics:

- ``gains[q, r-1]`` is the graded relevance of the item at rank ``r`` for request ``q``; 0 means not
  relevant, unjudged, or padding (fewer than K results returned).
- An item is *relevant* when its grade is ``> 0``. For integer grades this is trec_eval's default
  relevance level 1 (``rel=1`` in ir_measures); binary metrics ignore the size of the grade.
- ``R`` is the number of relevant items of the request (all of them, retrieved or not).
- A request that retrieves nothing relevant scores 0 and is never dropped (trec_eval ``-c``). A request
  with ``R = 0`` scores 0 on every metric (as trec_eval does for a query judged with no relevant item);
  callers should only pass requests that have judgments.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from twostage.errors import ConfigError, InputError, did_you_mean

__all__ = [
    "METRICS",
    "PairedComparison",
    "bootstrap_ci",
    "catalogue_coverage",
    "exposure_entropy",
    "exposure_gini",
    "intra_list_diversity_categories",
    "intra_list_diversity_embeddings",
    "metric_label",
    "novelty",
    "paired_bootstrap",
    "paired_comparison",
    "paired_permutation_test",
    "paired_ttest",
    "ranking_metrics",
]

#: Stored metric names → ir_measures-style display prefixes.
_LABELS = {"recall": "R", "precision": "P", "ndcg": "nDCG", "mrr": "RR", "map": "AP", "hit": "Hit"}
#: Every ranking metric :func:`ranking_metrics` knows, in display order.
METRICS: tuple[str, ...] = tuple(_LABELS)

# Bootstrap / permutation draws are made in chunks of about this many numbers, to bound memory.
_CHUNK_CELLS = 4_000_000


# ----------------------------------------------------------------------------------------- names
def _check_metric(name: str) -> None:
    if name not in _LABELS:
        raise ConfigError(
            f"unknown ranking metric {name!r}; choose from {', '.join(_LABELS)}",
            key="metrics",
            suggestion=did_you_mean(name, _LABELS),
        )


def metric_label(metric: str, k: int) -> str:
    """The ir_measures-style display name of a stored (metric, k) pair.

    Example:
        >>> metric_label("ndcg", 10), metric_label("recall", 100), metric_label("mrr", 10)
        ('nDCG@10', 'R@100', 'RR@10')

    Raises:
        ConfigError: ``metric`` is not one of :data:`METRICS`.
    """
    _check_metric(metric)
    return f"{_LABELS[metric]}@{int(k)}"


# -------------------------------------------------------------------------------------- ranking
def _ideal_matrix(
    relevant: Sequence[Sequence[float]] | np.ndarray, n: int, width: int
) -> tuple[np.ndarray, np.ndarray]:
    """Relevant grades per request sorted descending and cut to ``width`` columns; and R per request."""
    if isinstance(relevant, np.ndarray) and relevant.ndim == 2:
        if relevant.shape[0] != n:
            raise InputError(
                f"relevant has {relevant.shape[0]} rows but gains has {n}; pass one row per request"
            )
        grades = np.nan_to_num(relevant.astype(np.float64, copy=False), nan=0.0)
        grades = np.where(grades > 0, grades, 0.0)
        n_rel = np.count_nonzero(grades, axis=1).astype(np.float64)
        ideal = -np.sort(-grades, axis=1)[:, :width]
    else:
        if len(relevant) != n:
            raise InputError(
                f"relevant has {len(relevant)} entries but gains has {n} rows; pass one per request"
            )
        lengths = np.fromiter((len(r) for r in relevant), dtype=np.int64, count=n)
        flat = (
            np.concatenate([np.asarray(r, dtype=np.float64).ravel() for r in relevant])
            if lengths.sum()
            else np.zeros(0, dtype=np.float64)
        )
        group = np.repeat(np.arange(n), lengths)
        keep = flat > 0  # also drops NaN
        flat, group = flat[keep], group[keep]
        order = np.lexsort((-flat, group))  # by request, then grade descending
        flat, group = flat[order], group[order]
        counts = np.bincount(group, minlength=n)
        position = np.arange(flat.size) - np.repeat(np.cumsum(counts) - counts, counts)
        ideal = np.zeros((n, width), dtype=np.float64)
        inside = position < width
        ideal[group[inside], position[inside]] = flat[inside]
        n_rel = counts.astype(np.float64)
    if ideal.shape[1] < width:
        ideal = np.pad(ideal, ((0, 0), (0, width - ideal.shape[1])))
    return ideal, n_rel


def _safe_divide(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """``num / den`` with 0 where ``den == 0``."""
    out = np.zeros(np.broadcast_shapes(num.shape, den.shape), dtype=np.float64)
    np.divide(num, den, out=out, where=den > 0)
    return out


def ranking_metrics(
    gains: np.ndarray,
    relevant: Sequence[Sequence[float]] | np.ndarray,
    *,
    ks: Iterable[int] = (1, 5, 10, 100),
    metrics: Iterable[str] = METRICS,
) -> dict[tuple[str, int], np.ndarray]:
    r"""Per-request ranking metrics at every cutoff, from one cumulative sum over the gain matrix.

    With :math:`g_r` the grade at rank :math:`r`, :math:`h_r = [g_r > 0]`, :math:`R` the number of relevant
    items and :math:`g^*_r` the r-th largest relevant grade (0 beyond R):

    - ``recall``    R@k   = :math:`\sum_{r\le k} h_r / R`
    - ``precision`` P@k   = :math:`\sum_{r\le k} h_r / k` (always divided by k, even if fewer were returned)
    - ``ndcg``      nDCG@k = DCG@k / IDCG@k, DCG@k = :math:`\sum_{r\le k} g_r / \log_2(r+1)` (linear gain, as
      trec_eval ``ndcg_cut``), IDCG@k the same sum over :math:`g^*` (ideal from all relevant grades)
    - ``mrr``       RR@k  = :math:`1/r_1` where :math:`r_1` is the first rank with :math:`h_r = 1`, 0 if
      :math:`r_1 > k`
    - ``map``       AP@k  = :math:`\sum_{r\le k} h_r \cdot P@r / R`: the denominator is R, not
      :math:`\min(R, k)`, as in trec_eval ``map_cut`` and ir_measures ``AP@k``
    - ``hit``       Hit@k = 1 if :math:`\sum_{r\le k} h_r > 0` else 0 (ir_measures ``Success@k``)

    Requests with ``R = 0`` get 0 on every metric; cutoffs beyond the matrix width count missing ranks as
    non-relevant.

    Args:
        gains: ``(n_requests, K)`` grades of the returned items in rank order (0 = not relevant,
            unjudged or padding). Must be finite and ``>= 0``.
        relevant: the grades of all relevant items of each request (values ``<= 0`` and NaN are ignored),
            either a sequence of ``n_requests`` 1-D arrays (any lengths) or a ``(n_requests, M)`` matrix
            padded with 0 or NaN. Gives R (recall and AP denominators) and the ideal DCG.
        ks: cutoffs, each ``>= 1``.
        metrics: names from :data:`METRICS`.

    Returns:
        ``{(metric, k): values}`` with one float64 value per request, in ``gains`` row order.

    Raises:
        InputError: shapes disagree, gains are negative or not finite, or a request retrieves more
            relevant items than ``relevant`` lists for it (the two inputs come from different judgments).
        ConfigError: an unknown metric name or a cutoff below 1.

    Example:
        >>> out = ranking_metrics(np.array([[0.0, 2.0, 0.0]]), [np.array([2.0, 1.0])], ks=(3,), metrics=("recall", "mrr"))
        >>> float(out["recall", 3][0]), float(out["mrr", 3][0])
        (0.5, 0.5)
    """
    ks = tuple(int(k) for k in ks)
    metrics = tuple(metrics)
    for name in metrics:
        _check_metric(name)
    if not ks or min(ks) < 1:
        raise ConfigError(f"cutoffs must be integers >= 1, got {ks!r}", key="ks")
    gains = np.asarray(gains, dtype=np.float64)
    if gains.ndim != 2:
        raise InputError(f"gains must be a (n_requests, K) matrix, got shape {gains.shape}")
    if not np.isfinite(gains).all() or (gains < 0).any():
        raise InputError("gains must be finite and >= 0; use 0 for non-relevant, unjudged or missing ranks")
    n, width = gains.shape[0], max(ks)
    if gains.shape[1] < width:
        gains = np.pad(gains, ((0, 0), (0, width - gains.shape[1])))
    gains = gains[:, :width]
    ideal, n_rel = _ideal_matrix(relevant, n, width)

    hits = (gains > 0).astype(np.float64)
    cum_hits = np.cumsum(hits, axis=1)
    too_many = cum_hits[:, -1] > n_rel
    if too_many.any():
        bad = int(np.argmax(too_many))
        raise InputError(
            f"request row {bad} retrieves {int(cum_hits[bad, -1])} relevant items but relevant lists "
            f"{int(n_rel[bad])}; build gains and relevant from the same judgments"
        )
    ranks = np.arange(1, width + 1, dtype=np.float64)
    out: dict[tuple[str, int], np.ndarray] = {}
    wanted = set(metrics)
    if "ndcg" in wanted:
        discount = 1.0 / np.log2(ranks + 1.0)
        dcg = np.cumsum(gains * discount, axis=1)
        idcg = np.cumsum(ideal * discount, axis=1)
    if "map" in wanted:
        cum_ap = np.cumsum(hits * (cum_hits / ranks), axis=1)
    if "mrr" in wanted:
        first = np.where(hits.any(axis=1), np.argmax(hits, axis=1) + 1, np.iinfo(np.int64).max)
    for name in metrics:
        for k in ks:
            c = k - 1
            if name == "recall":
                v = _safe_divide(cum_hits[:, c], n_rel)
            elif name == "precision":
                v = cum_hits[:, c] / k
            elif name == "ndcg":
                v = _safe_divide(dcg[:, c], idcg[:, c])
            elif name == "mrr":
                v = np.where(first <= k, 1.0 / np.minimum(first, k), 0.0)
            elif name == "map":
                v = _safe_divide(cum_ap[:, c], n_rel)
            else:  # hit
                v = (cum_hits[:, c] > 0).astype(np.float64)
            out[name, k] = v
    return out


# ------------------------------------------------------------------------------- beyond accuracy
def mean_metric(
    rankings: Sequence[Sequence[str]], targets: Sequence[Mapping[str, float]], metric: str, k: int
) -> float:
    """Mean of one metric at ``k`` over ranked item ids and their ``{item_id: grade}`` judgments.

    For tuning loops and benchmarks that hold ranked lists rather than a gains matrix; the formulas are
    :func:`ranking_metrics`'.
    """
    gains = np.zeros((len(rankings), k))
    for row, (items, grades) in enumerate(zip(rankings, targets, strict=True)):
        for col, item in enumerate(items[:k]):
            gains[row, col] = grades.get(item, 0.0)
    relevant = [np.array(list(grades.values()), dtype=np.float64) for grades in targets]
    return float(ranking_metrics(gains, relevant, ks=(k,), metrics=(metric,))[(metric, k)].mean())


def _exposure_counts(rec_lists: Sequence[Sequence[str]]) -> Counter[str]:
    return Counter(item for lst in rec_lists for item in lst)


def catalogue_coverage(rec_lists: Sequence[Sequence[str]], catalogue_size: int) -> float:
    r"""Share of the catalogue recommended at least once: :math:`|\bigcup_u L_u| / |I|`.

    Args:
        rec_lists: the recommended item_ids per request (cut at the k being evaluated).
        catalogue_size: :math:`|I|`, the number of items that could have been recommended.

    Returns:
        A value in [0, 1]; 0 for no lists.

    Raises:
        InputError: ``catalogue_size < 1`` or more distinct items than ``catalogue_size``.
    """
    distinct = len({item for lst in rec_lists for item in lst})
    _check_catalogue(catalogue_size, distinct)
    return distinct / catalogue_size


def _check_catalogue(catalogue_size: int, distinct: int) -> None:
    if catalogue_size < 1 or distinct > catalogue_size:
        raise InputError(
            f"catalogue_size is {catalogue_size} but the lists hold {distinct} distinct items; "
            "pass the number of items in the catalogue"
        )


def exposure_entropy(
    rec_lists: Sequence[Sequence[str]], *, normalize: bool = False, catalogue_size: int | None = None
) -> float:
    r"""Shannon entropy (bits) of how exposures spread over items: :math:`H = -\sum_i p_i \log_2 p_i`.

    :math:`p_i = c_i / \sum_j c_j` with :math:`c_i` the number of lists containing item i (each slot is one
    exposure, rank is ignored). Uniform exposure of n items gives :math:`\log_2 n`; one item gives 0.

    Args:
        rec_lists: the recommended item_ids per request.
        normalize: divide by the maximum, :math:`\log_2 |I|` when ``catalogue_size`` is given, else
            :math:`\log_2` (number of distinct exposed items); the result is in [0, 1].
        catalogue_size: :math:`|I|` for the normalisation.

    Returns:
        The entropy; 0.0 for no exposures (and for a normaliser of 0, i.e. a single item).
    """
    counts = np.fromiter(_exposure_counts(rec_lists).values(), dtype=np.float64)
    if counts.size == 0:
        return 0.0
    p = counts / counts.sum()
    h = float(-(p * np.log2(p)).sum())
    if not normalize:
        return h
    if catalogue_size is not None:
        _check_catalogue(catalogue_size, counts.size)
    top = math.log2(catalogue_size if catalogue_size is not None else counts.size)
    return h / top if top > 0 else 0.0


def exposure_gini(rec_lists: Sequence[Sequence[str]], catalogue_size: int) -> float:
    r"""Gini index of exposure over the whole catalogue, never-exposed items included.

    With exposure counts :math:`c_{(1)} \le \dots \le c_{(n)}` sorted ascending over all :math:`n = |I|`
    items (zeros for items never recommended):
    :math:`G = \sum_{i=1}^{n} (2i - n - 1)\, c_{(i)} / (n \sum_i c_i)`.
    0 means every item is exposed equally; all exposure on one item gives :math:`(n-1)/n \to 1`.

    Args:
        rec_lists: the recommended item_ids per request.
        catalogue_size: :math:`n = |I|`.

    Returns:
        A value in [0, 1); 0.0 for no exposures.

    Raises:
        InputError: ``catalogue_size < 1`` or more distinct items than ``catalogue_size``.
    """
    exposed = np.fromiter(_exposure_counts(rec_lists).values(), dtype=np.float64)
    _check_catalogue(catalogue_size, exposed.size)
    total = exposed.sum()
    if total == 0:
        return 0.0
    n = catalogue_size
    counts = np.sort(exposed)  # the n - len(exposed) zeros come first, contributing nothing
    i = np.arange(n - counts.size + 1, n + 1, dtype=np.float64)
    return float(((2 * i - n - 1) * counts).sum() / (n * total))


def intra_list_diversity_embeddings(
    list_vecs: Sequence[np.ndarray] | np.ndarray,
) -> tuple[float, np.ndarray]:
    r"""Intra-list diversity from item embeddings: mean pairwise cosine distance within each list.

    :math:`\mathrm{ILD}(L) = \frac{2}{|L|(|L|-1)} \sum_{i<j} (1 - \cos(v_i, v_j))`, then averaged over
    lists with at least two items. Lists with fewer than two items have no pairs: their per-list value is
    NaN and they are left out of the mean. Zero vectors count as cosine 0 to everything.

    Args:
        list_vecs: per list, a ``(|L|, d)`` array of item vectors (or one ``(n_lists, |L|, d)`` array).

    Returns:
        ``(mean, per_list)``: the mean over lists with pairs (0.0 if there are none) and a float64 array
        with one value per list. Values lie in [0, 2].
    """
    per_list = np.full(len(list_vecs), np.nan, dtype=np.float64)
    by_length: dict[int, list[int]] = {}
    for j, vecs in enumerate(list_vecs):
        if np.ndim(vecs) != 2:
            raise InputError(f"list {j} of list_vecs has shape {np.shape(vecs)}; expected (items, dim)")
        by_length.setdefault(len(vecs), []).append(j)
    for length, rows in by_length.items():
        if length < 2:
            continue
        stack = np.stack([np.asarray(list_vecs[j], dtype=np.float64) for j in rows])  # (m, L, d)
        norms = np.linalg.norm(stack, axis=2, keepdims=True)
        unit = np.divide(stack, norms, out=np.zeros_like(stack), where=norms > 0)
        sims = unit @ unit.transpose(0, 2, 1)  # (m, L, L)
        off_diagonal = sims.sum(axis=(1, 2)) - np.trace(sims, axis1=1, axis2=2)
        per_list[rows] = 1.0 - off_diagonal / (length * (length - 1))
    with_pairs = per_list[~np.isnan(per_list)]
    return (float(with_pairs.mean()) if with_pairs.size else 0.0), per_list


def intra_list_diversity_categories(
    rec_lists: Sequence[Sequence[str]], categories: Mapping[str, set[str]]
) -> tuple[float, np.ndarray]:
    r"""Intra-list diversity from item categories: mean pairwise Jaccard distance within each list.

    :math:`\mathrm{ILD}(L) = \frac{2}{|L|(|L|-1)} \sum_{i<j} \left(1 - \frac{|C_i \cap C_j|}{|C_i \cup C_j|}\right)`,
    averaged over lists with at least two items (others are NaN per list, as in
    :func:`intra_list_diversity_embeddings`). Items missing from ``categories`` have no categories; two
    category-less items are at distance 0 (SciPy's convention for two empty sets).

    Args:
        rec_lists: the recommended item_ids per request.
        categories: item_id → set of category names (e.g. genres).

    Returns:
        ``(mean, per_list)`` as in :func:`intra_list_diversity_embeddings`; values lie in [0, 1].
    """
    per_list = np.full(len(rec_lists), np.nan, dtype=np.float64)
    empty: frozenset[str] = frozenset()
    for j, lst in enumerate(rec_lists):
        m = len(lst)
        if m < 2:
            continue
        sets = [categories.get(item, empty) for item in lst]
        total = 0.0
        for a in range(m):
            for b in range(a + 1, m):
                union = len(sets[a] | sets[b])
                total += 1.0 - (len(sets[a] & sets[b]) / union if union else 1.0)
        per_list[j] = total / (m * (m - 1) / 2)
    with_pairs = per_list[~np.isnan(per_list)]
    return (float(with_pairs.mean()) if with_pairs.size else 0.0), per_list


def novelty(rec_lists: Sequence[Sequence[str]], popularity: Mapping[str, float], n_users: int) -> float:
    r"""Mean self-information of recommended items: how unexpected they are given training popularity.

    :math:`\mathrm{nov}(L) = \frac{1}{|L|} \sum_{i \in L} -\log_2 p(i)`, with :math:`p(i) = c_i / U` the
    fraction of the U training users who interacted with i; averaged over non-empty lists (each request
    weighs the same). Items never seen in training (:math:`c_i = 0` or absent) are smoothed to
    :math:`p(i) = 1/(U+1)`, slightly rarer than an item seen once, so they score :math:`\log_2(U+1)` bits
    instead of infinity.

    Args:
        rec_lists: the recommended item_ids per request.
        popularity: item_id → number of distinct training users who interacted with it (a count, not a share).
        n_users: U, the number of training users.

    Returns:
        Mean bits per recommended item; 0.0 when every list is empty.

    Raises:
        InputError: ``n_users < 1`` or a count outside [0, n_users].
    """
    if n_users < 1:
        raise InputError(f"n_users is {n_users}; pass the number of training users (>= 1)")
    unseen = math.log2(n_users + 1)
    per_list = []
    for lst in rec_lists:
        if not lst:
            continue
        bits = 0.0
        for item in lst:
            c = float(popularity.get(item, 0.0))
            if c < 0 or c > n_users:
                raise InputError(
                    f"popularity of {item!r} is {c} but n_users is {n_users}; pass user counts, not shares"
                )
            bits += math.log2(n_users / c) if c > 0 else unseen
        per_list.append(bits / len(lst))
    return float(np.mean(per_list)) if per_list else 0.0


# ---------------------------------------------------------------------------- paired comparison
@dataclass(frozen=True)
class PairedComparison:
    """System b against system a on the same requests: means, b − a with a 95% interval, and a p-value."""

    metric: str
    mean_a: float
    mean_b: float
    diff: float
    ci_low: float
    ci_high: float
    p_value: float


def _vector(x: Sequence[float] | np.ndarray, name: str) -> np.ndarray:
    v = np.asarray(x, dtype=np.float64)
    if v.ndim != 1 or not np.isfinite(v).all():
        raise InputError(f"{name} must be a 1-D array of finite per-request values, got shape {v.shape}")
    return v


def _paired(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> np.ndarray:
    x, y = _vector(a, "a"), _vector(b, "b")
    if x.shape != y.shape or x.size == 0:
        raise InputError(
            f"paired values need the same non-zero length, got {x.size} and {y.size}; align both on request_id"
        )
    return y - x


def _bootstrap_means(values: np.ndarray, n_resamples: int, seed: int) -> np.ndarray:
    """Means of ``n_resamples`` resamples (with replacement) of ``values``, drawn in bounded chunks."""
    if n_resamples < 1:
        raise ConfigError(f"n_resamples must be >= 1, got {n_resamples}", key="n_resamples")
    rng = np.random.default_rng(seed)
    n = values.size
    chunk = max(1, _CHUNK_CELLS // n)
    means = np.empty(n_resamples, dtype=np.float64)
    for start in range(0, n_resamples, chunk):
        stop = min(start + chunk, n_resamples)
        idx = rng.integers(0, n, size=(stop - start, n), dtype=np.int32 if n < 2**31 else np.int64)
        means[start:stop] = values[idx].mean(axis=1)
    return means


def bootstrap_ci(
    values: Sequence[float] | np.ndarray,
    *,
    n_resamples: int = 10_000,
    seed: int = 0,
    confidence: float = 0.95,
) -> tuple[float, float]:
    r"""Percentile bootstrap interval of the mean of per-request values.

    Resample the n values with replacement ``n_resamples`` times; the interval is the
    :math:`(1-c)/2` and :math:`(1+c)/2` quantiles of the resampled means. Deterministic for a given ``seed``.

    Returns:
        ``(low, high)``.

    Raises:
        InputError: values empty or not finite.
    """
    v = _vector(values, "values")
    if v.size == 0:
        raise InputError("bootstrap_ci needs at least one value")
    means = _bootstrap_means(v, n_resamples, seed)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return float(low), float(high)


def paired_bootstrap(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    *,
    n_resamples: int = 10_000,
    seed: int = 0,
    confidence: float = 0.95,
) -> tuple[float, float, float]:
    r"""Mean of the paired differences :math:`d_q = b_q - a_q` with a percentile bootstrap interval.

    Requests are resampled as pairs (the same request for both systems), see :func:`bootstrap_ci`.

    Returns:
        ``(mean_diff, ci_low, ci_high)``; identical a and b give ``(0.0, 0.0, 0.0)``.

    Raises:
        InputError: a and b differ in length, are empty, or not finite.
    """
    d = _paired(a, b)
    low, high = bootstrap_ci(d, n_resamples=n_resamples, seed=seed, confidence=confidence)
    return float(d.mean()), low, high


def _degenerate_p(d: np.ndarray) -> float | None:
    """p-value when the test statistic is undefined: fewer than 2 pairs, or all differences equal."""
    if d.size < 2:
        return 1.0
    if np.ptp(d) <= 1e-12 * max(1.0, float(np.abs(d).max())):  # equal up to rounding: zero variance
        return 1.0 if np.abs(d).max() <= 1e-12 else 0.0
    return None


def paired_ttest(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> float:
    r"""Two-sided paired t-test p-value for mean(b − a) = 0 (``scipy.stats.ttest_rel``).

    :math:`t = \bar d / (s_d / \sqrt n)` with n − 1 degrees of freedom. Edge cases: fewer than two pairs or
    all differences 0 → 1.0; all differences equal and non-zero → 0.0 (zero variance).

    Raises:
        InputError: a and b differ in length, are empty, or not finite.
    """
    d = _paired(a, b)
    fixed = _degenerate_p(d)
    if fixed is not None:
        return fixed
    from scipy import stats  # a dependency of sentence-transformers, so always installed with twostage

    return float(stats.ttest_rel(np.asarray(b, dtype=np.float64), np.asarray(a, dtype=np.float64)).pvalue)


def paired_permutation_test(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    *,
    n_resamples: int = 10_000,
    seed: int = 0,
) -> float:
    r"""Two-sided paired randomisation (sign-flip) test p-value for mean(b − a) = 0, in NumPy only.

    Under the null each difference is equally likely to have either sign. With ``n_resamples`` random sign
    vectors :math:`s`: :math:`p = (1 + \#\{|\overline{s d}| \ge |\bar d|\}) / (1 + n_{resamples})`.
    Edge cases as in :func:`paired_ttest`, except that all-equal non-zero differences are tested normally.

    Raises:
        InputError: a and b differ in length, are empty, or not finite.
    """
    d = _paired(a, b)
    if not d.any():
        return 1.0
    if n_resamples < 1:
        raise ConfigError(f"n_resamples must be >= 1, got {n_resamples}", key="n_resamples")
    rng = np.random.default_rng(seed)
    observed = abs(d.mean()) - 1e-12 * max(1.0, abs(d.mean()))  # tolerate rounding of equal sums
    chunk = max(1, _CHUNK_CELLS // d.size)
    extreme = 0
    for start in range(0, n_resamples, chunk):
        m = min(chunk, n_resamples - start)
        signs = rng.integers(0, 2, size=(m, d.size), dtype=np.int8) * 2 - 1
        extreme += int((np.abs(signs @ d) / d.size >= observed).sum())
    return (1 + extreme) / (1 + n_resamples)


def paired_comparison(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    *,
    metric: str = "",
    n_resamples: int = 10_000,
    seed: int = 0,
    test: str = "t",
) -> PairedComparison:
    """Compare system b with system a on per-request values of one metric (same requests, same order).

    Args:
        a: per-request values of the baseline.
        b: per-request values of the system being compared.
        metric: label stored in the result (e.g. ``"nDCG@10"``).
        n_resamples: bootstrap resamples (and permutation draws).
        seed: random seed, so reports are reproducible.
        test: ``"t"`` for :func:`paired_ttest` or ``"permutation"`` for :func:`paired_permutation_test`.

    Returns:
        A :class:`PairedComparison` with diff = mean(b) − mean(a) and its 95% bootstrap interval.

    Example:
        >>> c = paired_comparison([0.1, 0.2, 0.3, 0.4], [0.1, 0.2, 0.3, 0.4], metric="nDCG@10")
        >>> c.diff, c.ci_low, c.ci_high, c.p_value
        (0.0, 0.0, 0.0, 1.0)
    """
    if test not in ("t", "permutation"):
        raise ConfigError(f"unknown paired test {test!r}; use 't' or 'permutation'", key="test")
    diff, low, high = paired_bootstrap(a, b, n_resamples=n_resamples, seed=seed)
    p = (
        paired_ttest(a, b)
        if test == "t"
        else paired_permutation_test(a, b, n_resamples=n_resamples, seed=seed)
    )
    return PairedComparison(
        metric=metric,
        mean_a=float(np.mean(a)),
        mean_b=float(np.mean(b)),
        diff=diff,
        ci_low=low,
        ci_high=high,
        p_value=p,
    )
