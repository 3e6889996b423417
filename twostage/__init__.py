"""twostage: two-stage recommendation and search.

Stage 1 recalls candidates with a fine-tuned bi-encoder and a FAISS index; stage 2 reranks them with a
cross-encoder trained listwise. DuckDB holds the logs and runs the evaluation joins.

Example:
    >>> from twostage import Engine
    >>> engine = Engine.init("my-project")                 # doctest: +SKIP
    >>> engine.load_dataset("sample"); engine.split()       # doctest: +SKIP
"""

from __future__ import annotations

from twostage import errors, metrics
from twostage.config import Config, load_config
from twostage.engine import Engine
from twostage.results import Hit, Ranking

__version__ = "0.1.0"

__all__ = ["Config", "Engine", "Hit", "Ranking", "__version__", "errors", "load_config", "metrics"]
