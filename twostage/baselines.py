"""Baselines every evaluation runs beside the model: popularity (recommendation) and BM25 (search).

A model is only worth its cost if it beats these on the same split, in the same run.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import bm25s

    from twostage.requests import Catalogue


def popularity_rankings(
    popularity: Mapping[str, int], exclude: Mapping[str, Collection[str]], *, k: int
) -> dict[str, list[tuple[str, float]]]:
    """Most popular items (by distinct training users) per request, minus the items each user already has.

    Ties are broken by item_id so the baseline is deterministic.
    """
    ranked = sorted(popularity.items(), key=lambda kv: (-kv[1], kv[0]))
    out: dict[str, list[tuple[str, float]]] = {}
    for request_id, seen in exclude.items():
        hits: list[tuple[str, float]] = []
        for item_id, count in ranked:
            if item_id not in seen:
                hits.append((item_id, float(count)))
                if len(hits) == k:
                    break
        out[request_id] = hits
    return out


class BM25:
    """Okapi BM25 over item texts via bm25s (Lucene scoring, English stop words, Snowball stemming).

    Defaults k1=0.9, b=0.4 are Anserini's, the settings behind BEIR's published BM25 numbers.
    """

    def __init__(self, item_ids: Sequence[str], texts: Sequence[str], *, k1: float = 0.9, b: float = 0.4):
        import bm25s
        import Stemmer

        self.item_ids = list(item_ids)
        self._row = {item_id: n for n, item_id in enumerate(self.item_ids)}
        self._stemmer = Stemmer.Stemmer("english")
        self._model: bm25s.BM25 = bm25s.BM25(k1=k1, b=b, method="lucene")
        tokens = bm25s.tokenize(list(texts), stopwords="en", stemmer=self._stemmer, show_progress=False)
        self._model.index(tokens, show_progress=False)

    @classmethod
    def of_catalogue(cls, catalogue: Catalogue) -> BM25:
        """BM25 over every catalogue item's text (its item template): the search baseline and hybrid recall's
        lexical channel, in a project and in a served snapshot alike."""
        return cls(catalogue.item_ids, [catalogue.text(i) for i in catalogue.item_ids])

    def scores(self, text: str, item_ids: Sequence[str]) -> list[float]:
        """The BM25 score of each of ``item_ids`` for one query text (0 where no term matches)."""
        import bm25s

        tokens = bm25s.tokenize(
            [text], stopwords="en", stemmer=self._stemmer, show_progress=False, return_ids=False
        )
        every = self._model.get_scores(tokens[0])
        return [float(every[self._row[i]]) for i in item_ids]

    def search(self, texts: Sequence[str], *, k: int) -> list[list[tuple[str, float]]]:
        """Top-k (item_id, score) per query text."""
        import bm25s

        k = min(k, len(self.item_ids))
        tokens = bm25s.tokenize(list(texts), stopwords="en", stemmer=self._stemmer, show_progress=False)
        rows, scores = self._model.retrieve(tokens, k=k, show_progress=False, n_threads=0)
        return [
            [(self.item_ids[int(r)], float(s)) for r, s in zip(row, score, strict=True) if s > 0]
            for row, score in zip(rows, scores, strict=True)
        ]
