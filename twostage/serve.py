"""``twostage serve``: search and recommendation over HTTP from a published snapshot, hot-swapped.

A FastAPI app (run by uvicorn) that reads a snapshot (:mod:`twostage.snapshot`) and ranks with its
:class:`~twostage.pipeline.Pipeline`, the same call the library and ``evaluate`` use. The loaded snapshot sits
behind one reference: a reload (``POST /admin/reload``, or a poll of ``snapshots/current``) loads the new one
beside it and swaps; requests in flight finish on the one they started with, and a snapshot that fails to load
is refused with a logged reason while the old one keeps serving. Every response names the snapshot it came from.

Errors are JSON ``{"error": ...}`` with the library's one-line message: 400/404/422 for a caller's mistake, 413
over the cfg in ``[serve]``, 503 before a snapshot is loaded, and 500 (logged, never a traceback) otherwise.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, Field, model_validator

from twostage.config import ServeConfig, load_config
from twostage.errors import NotFoundError, TwostageError
from twostage.requests import Request
from twostage.snapshot import Served, current_id, load

if TYPE_CHECKING:
    from fastapi import FastAPI

logger = logging.getLogger(__name__)

API_KEY_ENV = "TWOSTAGE_API_KEY"
OPEN_PATHS = ("/healthz", "/readyz")  # never behind the API key


class SearchBody(BaseModel):
    query: str = Field(description="The text to search for.")
    k: int = Field(10, ge=1, description="Hits to return (at most [serve] max_k).")
    stage: Literal["rerank", "recall"] = "rerank"
    explain: bool = False
    diversify: float | None = Field(
        None, ge=0.0, le=1.0, description="MMR λ (1 = none); default the snapshot's."
    )


class RecommendBody(BaseModel):
    user_id: str | None = Field(None, description="A user with events in the snapshot.")
    history: list[str] | None = Field(None, description="Or an anonymous session's item ids, newest first.")
    k: int = Field(10, ge=1)
    stage: Literal["rerank", "recall"] = "rerank"
    explain: bool = False
    diversify: float | None = Field(None, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _one_of(self) -> RecommendBody:
        if (self.user_id is None) == (self.history is None):
            raise ValueError("give either user_id or history (item ids, newest first)")
        return self


class PredictBody(BaseModel):
    user_id: str | None = Field(None, description="A user with events in the snapshot.")
    history: list[str | tuple[str, float]] | None = Field(
        None, description="Or an anonymous history: item ids or [item id, rating] pairs, newest first."
    )
    items: list[str] = Field(description="The items to predict the user's response to.")

    @model_validator(mode="after")
    def _one_of(self) -> PredictBody:
        if (self.user_id is None) == (self.history is None):
            raise ValueError("give either user_id or history (item ids, newest first)")
        return self


class BatchItem(BaseModel):
    search: SearchBody | None = None
    recommend: RecommendBody | None = None

    @model_validator(mode="after")
    def _one_of(self) -> BatchItem:
        if (self.search is None) == (self.recommend is None):
            raise ValueError("each batch entry is {'search': {...}} or {'recommend': {...}}")
        return self


class BatchBody(BaseModel):
    requests: list[BatchItem]


class Holder:
    """The snapshot being served, swapped by one reference."""

    def __init__(self, project: Path, pinned: str | None):
        self.project, self.pinned = project, pinned
        self.served: Served | None = None
        self._reload_lock = threading.Lock()

    def reload(self) -> dict[str, Any]:
        """Load the current (or pinned) snapshot beside the one serving and swap it in; keep the old one and
        say why when the new one fails to load."""
        with self._reload_lock:
            wanted = self.pinned or current_id(self.project)
            serving = self.served.snapshot_id if self.served else None
            if wanted is None:
                return {"snapshot": serving, "reloaded": False, "reason": "no snapshot published"}
            if wanted == serving:
                return {"snapshot": serving, "reloaded": False, "reason": "already serving it"}
            try:
                fresh = load(self.project, wanted)
            except TwostageError as e:
                logger.error("snapshot %s refused, still serving %s: %s", wanted, serving, e)
                return {"snapshot": serving, "reloaded": False, "reason": f"snapshot {wanted} refused: {e}"}
            self.served = fresh
            logger.info("serving snapshot %s (was %s)", wanted, serving)
            return {"snapshot": wanted, "reloaded": True, "previous": serving}


def _ranking_json(ranking: Any) -> dict[str, Any]:
    return {
        "request_id": ranking.request_id,
        "request_text": ranking.request_text,
        "snapshot": ranking.version,
        "hits": [
            {
                "item_id": h.item_id,
                "rank": h.rank,
                "score": h.score,
                "stage": h.stage,
                "title": h.title,
                "recall_score": h.recall_score,
                "rerank_score": h.rerank_score,
                **({"explanation": h.explanation} if h.explanation is not None else {}),
            }
            for h in ranking.hits
        ],
    }


class TooLarge(TwostageError):
    """A request over one of the ``[serve]`` cfg (413)."""


def _request(served: Served, body: SearchBody | RecommendBody, cfg: ServeConfig) -> Request:
    if body.k > cfg.max_k:
        raise TooLarge(f"k is {body.k}; this server returns at most {cfg.max_k} ([serve] max_k)")
    pipe = served.pipeline
    if isinstance(body, SearchBody):
        if len(body.query) > cfg.max_query_chars:
            raise TooLarge(
                f"the query has {len(body.query)} characters; at most {cfg.max_query_chars} ([serve] max_query_chars)"
            )
        if not body.query.strip():
            raise TwostageError("empty query; give some text to search for")
        return Request("query", body.query.strip())
    if body.history is not None:
        if len(body.history) > cfg.max_history:
            raise TooLarge(
                f"the history has {len(body.history)} items; at most {cfg.max_history} ([serve] max_history)"
            )
        return pipe.session_request(body.history)
    user = str(body.user_id).strip()
    return pipe.user_request(user, served.history(user))


def _rank(
    served: Served, bodies: Sequence[SearchBody | RecommendBody], cfg: ServeConfig
) -> list[dict[str, Any]]:
    """Rank the requests together: those sharing options in one batched pass of the pipeline."""
    requests = [_request(served, b, cfg) for b in bodies]
    groups: dict[tuple, list[int]] = {}
    for n, b in enumerate(bodies):
        groups.setdefault((b.k, b.stage, b.explain, b.diversify), []).append(n)
    out: list[dict[str, Any] | None] = [None] * len(bodies)
    for (k, stage, explain, diversify), members in groups.items():
        ranked = served.pipeline.rank(
            [requests[n] for n in members], k, stage=stage, explain=explain, diversify=diversify
        )
        for n, ranking in zip(members, ranked, strict=True):
            out[n] = _ranking_json(ranking)
    return [o for o in out if o is not None]


def create_app(project: str | Path, *, snapshot: str | None = None, api_key: str | None = None) -> FastAPI:
    """The app for ``project``: serves ``snapshot`` (pinned) or the current one, polling for new ones."""
    from fastapi import FastAPI
    from fastapi import Request as HttpRequest
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
    from starlette.exceptions import HTTPException as StarletteHTTPException

    project = Path(project)
    cfg = load_config(project).serve
    holder = Holder(project, snapshot)
    registry = CollectorRegistry()
    requests_total = Counter(
        "twostage_requests", "Requests by endpoint and status", ["endpoint", "status"], registry=registry
    )
    latency = Histogram(
        "twostage_request_seconds", "Request latency by endpoint", ["endpoint"], registry=registry
    )

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        holder.reload()
        stop = threading.Event()
        if cfg.poll_seconds > 0 and snapshot is None:
            threading.Thread(
                target=_poll, args=(holder, cfg.poll_seconds, stop), daemon=True, name="twostage-poll"
            ).start()
        yield
        stop.set()

    app = FastAPI(
        title="twostage",
        description="Two-stage search and recommendation from a published snapshot.",
        lifespan=lifespan,
    )
    app.state.holder = holder

    def serving() -> Served:
        if holder.served is None:
            raise Unavailable("no snapshot loaded yet; publish one with 'twostage publish'")
        return holder.served

    @app.middleware("http")
    async def guard_and_measure(request: HttpRequest, call_next: Any) -> Any:
        started = time.perf_counter()
        path = request.url.path
        if api_key and path not in OPEN_PATHS:
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                requests_total.labels("unauthorised", "401").inc()
                return JSONResponse(
                    {"error": "missing or wrong API key (Authorization: Bearer <key>)"}, status_code=401
                )
        try:
            response = await call_next(request)
        except Exception:  # logged; the client gets no traceback
            logger.exception("internal error on %s", path)
            response = JSONResponse(
                {"error": "internal error; the server log has the details"}, status_code=500
            )
        # the route's template ("/items/{item_id}"), not the path: labels must not grow with the ids asked for
        endpoint = getattr(request.scope.get("route"), "path", "unmatched")
        requests_total.labels(endpoint, str(response.status_code)).inc()
        latency.labels(endpoint).observe(time.perf_counter() - started)
        return response

    @app.exception_handler(TwostageError)
    async def library_error(_request: HttpRequest, error: TwostageError) -> JSONResponse:
        status = (
            413
            if isinstance(error, TooLarge)
            else 503
            if isinstance(error, Unavailable)
            else 404
            if isinstance(error, NotFoundError)
            else 400
        )
        return JSONResponse({"error": str(error)}, status_code=status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: HttpRequest, error: StarletteHTTPException) -> JSONResponse:
        # unknown paths and methods: the same {"error": ...} shape as every other error
        return JSONResponse(
            {"error": str(error.detail)}, status_code=error.status_code, headers=error.headers
        )

    @app.exception_handler(RequestValidationError)
    async def bad_request(_request: HttpRequest, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0] if error.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
        return JSONResponse({"error": f"{where}: {message}" if where else message}, status_code=422)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        """Alive (the process answers)."""
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz() -> Any:
        """Ready when a snapshot is loaded: its id."""
        if holder.served is None:
            return JSONResponse({"ready": False, "snapshot": None}, status_code=503)
        return {"ready": True, "snapshot": holder.served.snapshot_id}

    @app.post("/search")
    def search(body: SearchBody) -> dict[str, Any]:
        """Search the catalogue with a text query."""
        return _rank(serving(), [body], cfg)[0]

    @app.post("/recommend")
    def recommend(body: RecommendBody) -> dict[str, Any]:
        """Recommend for a user of the snapshot, or for an anonymous session's history."""
        return _rank(serving(), [body], cfg)[0]

    @app.post("/predict")
    def predict(body: PredictBody) -> dict[str, Any]:
        """How a user would respond to items: the predicted rating and each event's probability, per item."""
        if len(body.items) > cfg.max_k:
            raise TooLarge(f"{len(body.items)} items asked; at most {cfg.max_k} ([serve] max_k)")
        served = serving()
        return {
            "snapshot": served.snapshot_id,
            "items": body.items,
            **served.predict(body.user_id, body.history, body.items),
        }

    @app.post("/batch")
    def batch(body: BatchBody) -> dict[str, Any]:
        """Many searches and recommendations, ranked together (one model pass per group of options)."""
        if len(body.requests) > cfg.max_batch:
            raise TooLarge(
                f"the batch has {len(body.requests)} requests; at most {cfg.max_batch} ([serve] max_batch)"
            )
        served = serving()
        bodies = [r.search or r.recommend for r in body.requests]
        return {"snapshot": served.snapshot_id, "results": _rank(served, bodies, cfg)}  # type: ignore[arg-type]

    @app.get("/items/{item_id}")
    def item(item_id: str) -> dict[str, Any]:
        """One item of the snapshot's catalogue."""
        served = serving()
        catalogue = served.pipeline.catalogue
        if item_id not in catalogue:
            raise NotFoundError(f"unknown item_id '{item_id}'")
        record = catalogue.records[item_id]
        return {
            "snapshot": served.snapshot_id,
            **{k: record.get(k) for k in ("item_id", "title", "body", "categories", "attrs")},
        }

    @app.get("/metrics", response_class=PlainTextResponse)
    def metrics() -> Any:
        """Prometheus text: request counts by endpoint and status, latency histograms by endpoint."""
        return PlainTextResponse(generate_latest(registry).decode(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/admin/reload")
    def reload() -> dict[str, Any]:
        """Load the current snapshot (or the pinned one) and swap it in if it is new and loads."""
        return holder.reload()

    return app


class Unavailable(TwostageError):
    """No snapshot is loaded (503)."""


def _poll(holder: Holder, seconds: float, stop: threading.Event) -> None:
    """Swap in a newly published snapshot when ``snapshots/current`` changes, until ``stop``."""
    while not stop.wait(seconds):
        try:
            if current_id(holder.project) != (holder.served.snapshot_id if holder.served else None):
                holder.reload()
        except Exception:  # a poll must never take the server down
            logger.exception("snapshot poll failed")


def app_from_env() -> FastAPI:
    """The app uvicorn's workers build (``twostage serve`` passes its options through the environment)."""
    return create_app(
        os.environ.get("TWOSTAGE_PROJECT", "."),
        snapshot=os.environ.get("TWOSTAGE_SNAPSHOT") or None,
        api_key=os.environ.get(API_KEY_ENV) or None,
    )
