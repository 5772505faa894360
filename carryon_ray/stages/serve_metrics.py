"""Prometheus metrics of a serving replica, through `ray.serve.metrics`.

Ray's metrics agent on each node exports them on the node's metrics port (`ray_` in front of
each name, `_total` after a counter's; Serve adds `deployment`, `replica` and `application`
tags). Names and tags are listed in the README ("Metrics").

Tags stay bounded: `model` is "base", a carry-on found in the registry, or "unknown" (a
malformed or missing id, or a request refused before its model was read), never a client's
string; `status` is the HTTP status answered; `endpoint` names one of the two generation
routes. Recording never fails a request: an error in a metric is logged once and dropped.

The engine thread records nothing itself: it appends timings to two bounded deques of the
`DecodeBatcher`, and a task on the replica's event loop drains them every `FLUSH_SECONDS`,
together with the batch's step counters and occupancy.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from ray.serve.metrics import Counter, Gauge, Histogram
from starlette.exceptions import HTTPException
from starlette.responses import StreamingResponse

from carryon_ray.batching import DecodeBatcher
from carryon_ray.openai_api import APIError

logger = logging.getLogger(__name__)

UNKNOWN_MODEL = "unknown"  # the tag of a request whose model id is not a served one
CLIENT_CLOSED = 499  # the status recorded for a request whose client went away (nginx's)
FLUSH_SECONDS = 1.0
LATENCY_BUCKETS = [0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0]
LOAD_BUCKETS = [0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]


@dataclass
class RequestRecord:
    """What one generation request learned on its way, for its metrics."""

    model: str = UNKNOWN_MODEL
    stream: Any = None  # its TextStream once prepared: tokens counted when it ends
    loaded: bool = False  # its carry-on was loaded for it (a cache miss)


_current: ContextVar[RequestRecord | None] = ContextVar("carryon_request", default=None)


class ServeMetrics:
    """The replica's metrics; created inside the replica, so Serve's tags apply."""

    def __init__(self, batcher: DecodeBatcher) -> None:
        self.batcher = batcher
        self.requests = Counter(
            "carryon_requests",
            description="Generation requests answered, by model, endpoint and HTTP status.",
            tag_keys=("model", "endpoint", "status"),
        )
        self.generated_tokens = Counter(
            "carryon_generated_tokens",
            description="Tokens generated (EOS included), by model.",
            tag_keys=("model",),
        )
        self.time_to_first_token = Histogram(
            "carryon_time_to_first_token_seconds",
            description="From joining the engine's queue to the first token (wait + prefill).",
            boundaries=LATENCY_BUCKETS,
        )
        self.inter_token_latency = Histogram(
            "carryon_inter_token_latency_seconds",
            description="Between two tokens of one generation, on the engine.",
            boundaries=LATENCY_BUCKETS,
        )
        self.decode_steps = Counter(
            "carryon_decode_steps", description="Batched decode steps run by the engine."
        )
        self.decode_rows = Counter(
            "carryon_decode_rows",
            description="Sequence-steps in those steps (rows / steps = mean batch size).",
        )
        self.batch_running = Gauge(
            "carryon_batch_running", description="Rows in the running decode batch."
        )
        self.batch_occupancy = Gauge(
            "carryon_batch_occupancy",
            description="Rows in the running decode batch / max_batch_size.",
        )
        self.batch_waiting = Gauge(
            "carryon_batch_waiting", description="Requests waiting for a place in the batch."
        )
        self.carryon_loads = Counter(
            "carryon_carryon_loads",
            description="Carry-ons loaded (first use, after an eviction, or re-exported).",
            tag_keys=("model",),
        )
        self.carryon_load_seconds = Histogram(
            "carryon_carryon_load_seconds",
            description="Time to load a carry-on (read, validate, build).",
            boundaries=LOAD_BUCKETS,
            tag_keys=("model",),
        )
        self.carryon_hits = Counter(
            "carryon_carryon_cache_hits",
            description="Requests whose carry-on was already loaded on the replica.",
            tag_keys=("model",),
        )
        self.carryon_evictions = Counter(
            "carryon_carryon_evictions",
            description="Carry-ons dropped from the replica's LRU (or at its shutdown).",
            tag_keys=("model",),
        )
        self.carryons_loaded = Gauge(
            "carryon_carryons_loaded", description="Carry-ons loaded on the replica now."
        )
        self._resident: set[str] = set()
        self._exported = (0, 0)  # the batcher's (steps, rows) already exported
        self._flusher: asyncio.Task | None = None
        self._failed = False

    # -- requests, on the event loop -----------------------------------------------------------

    async def answer(self, endpoint: str, work: Awaitable) -> Any:
        """Await a handler's `work` and count its answer by model and status; a streamed
        answer's tokens are counted when its stream ends."""
        self._safe(self._start_flushing)
        record = RequestRecord()
        token = _current.set(record)
        status = 500
        streaming = False
        try:
            response = await work
            status = getattr(response, "status_code", 200)
            if isinstance(response, StreamingResponse):
                streaming = self._safe(self._count_when_done, response, record) is not None
            return response
        except APIError as error:
            status = error.status
            raise
        except HTTPException as error:
            status = error.status_code
            raise
        except asyncio.CancelledError:
            status = CLIENT_CLOSED
            raise
        finally:
            _current.reset(token)
            tags = {"model": record.model, "endpoint": endpoint, "status": str(status)}
            self._safe(self.requests.inc, 1, tags)
            if not streaming:
                self._tokens(record)

    def _count_when_done(self, response: StreamingResponse, record: RequestRecord) -> bool:
        response.body_iterator = self._counted(response.body_iterator, record)
        return True

    async def _counted(self, body: AsyncIterator, record: RequestRecord) -> AsyncIterator:
        try:
            async for chunk in body:
                yield chunk
        finally:
            try:
                close = getattr(body, "aclose", None)
                if close is not None:  # the generation's row leaves the batch now
                    await close()
            finally:
                self._tokens(record)

    def _tokens(self, record: RequestRecord) -> None:
        produced = getattr(record.stream, "completion_tokens", 0)
        if produced > 0:
            self._safe(self.generated_tokens.inc, produced, {"model": record.model})

    def name_model(self, model_id: str) -> None:
        """The current request's model is `model_id`: "base" or one found in the registry."""
        record = _current.get()
        if record is not None:
            record.model = model_id

    def follow(self, stream: Any) -> None:
        """The current request generates with `stream` (a TextStream)."""
        record = _current.get()
        if record is not None:
            record.stream = stream

    # -- carry-ons -----------------------------------------------------------------------------

    def carryon_loaded(self, model_id: str, seconds: float, *, resident: bool) -> None:
        """A load of `model_id` took `seconds`; `resident`: Serve's LRU holds it now (a
        re-export reloaded in place adds none)."""
        record = _current.get()
        if record is not None:
            record.loaded = True
        tags = {"model": model_id}
        self._safe(self.carryon_loads.inc, 1, tags)
        self._safe(self.carryon_load_seconds.observe, seconds, tags)
        if resident:
            self._resident.add(model_id)

    def carryon_used(self, model_id: str) -> None:
        """A request got `model_id` from the LRU: a hit unless it was loaded for it."""
        record = _current.get()
        if record is None or not record.loaded:
            self._safe(self.carryon_hits.inc, 1, {"model": model_id})

    def eviction_callback(self, model_id: str) -> Callable[[], None]:
        """For `LoadedCarryOn.on_evict`: Serve calls the entry's `__del__` when its LRU drops
        it, in an executor thread (recording is thread-safe)."""

        def evicted() -> None:
            self._resident.discard(model_id)
            self._safe(self.carryon_evictions.inc, 1, {"model": model_id})

        return evicted

    # -- the engine ----------------------------------------------------------------------------

    def _start_flushing(self) -> None:
        if self._flusher is None:
            self._flusher = asyncio.get_running_loop().create_task(self._flush_forever())

    async def _flush_forever(self) -> None:
        while True:
            self._safe(self.flush)
            await asyncio.sleep(FLUSH_SECONDS)

    def flush(self) -> None:
        """Move the engine's timings and counters into the metrics (on the event loop), and
        set the gauges: Ray exports a gauge only while it is set again between exports."""
        batcher = self.batcher
        for samples, histogram in (
            (batcher.first_token_seconds, self.time_to_first_token),
            (batcher.token_gap_seconds, self.inter_token_latency),
        ):
            tags: dict[str, str] = {}  # one dict: Serve's wrapper adds its route tag to it
            for _ in range(len(samples)):  # the engine appends meanwhile: take what is there
                histogram.observe(samples.popleft(), tags)
        steps, rows = batcher.steps, batcher.rows
        if steps > self._exported[0]:
            self.decode_steps.inc(steps - self._exported[0], {})
            self.decode_rows.inc(rows - self._exported[1], {})
            self._exported = (steps, rows)
        running = batcher.running
        self.batch_running.set(running, {})
        self.batch_occupancy.set(running / batcher.max_batch_size, {})
        self.batch_waiting.set(batcher.waiting, {})
        self.carryons_loaded.set(len(self._resident), {})

    def _safe(self, record: Callable, *args) -> Any:
        """`record(*args)`, whose failure is logged (the first time as a warning) and gives
        None instead of raising."""
        try:
            return record(*args)
        except Exception as error:  # noqa: BLE001 - a metric must never fail a request
            if not self._failed:
                self._failed = True
                logger.warning("recording a metric failed (later failures at debug): %r", error)
            else:
                logger.debug("recording a metric failed: %r", error)
