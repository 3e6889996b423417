"""Loaders for known dataset layouts: file layouts → ``Store.ingest`` calls, no model code."""

from __future__ import annotations

from twostage.datasets.beir import load_beir
from twostage.datasets.movielens import load_movielens
from twostage.datasets.sample import SAMPLE_DIR, load_sample

LOADERS = {"movielens": load_movielens, "beir": load_beir, "sample": load_sample}

__all__ = ["LOADERS", "SAMPLE_DIR", "load_beir", "load_movielens", "load_sample"]
