"""Continuous batching: concurrent generations share the base's forward passes.

One engine thread per replica owns a running batch. Each step it admits waiting requests,
feeds joining prompts to the base in chunks (at most `prefill_chunk_tokens` prompt tokens per
step, each prompt with a cache of its own, so a long prompt never stalls the running rows for
more than one chunk; while rows run, a chunk holds no more tokens than the engine prefills in
the time of one of their decode steps, measured as it goes, so their gap between tokens at
most doubles where a forward's fixed cost is below a step's; at least `MIN_PREFILL_CHUNK`
tokens), then runs one base forward for every running sequence at once: the
newest token of each, over one key/value cache in which each row's past is left-padded to the
longest (an attention mask hides the padding, `position_ids` keep each row's own positions). A
prompt whose last chunk is in samples its first token and joins the batch. The carry-on, the merge and the sampling stay per sequence (each
request may name a different carry-on and α); the output head runs once over the batch.
Finished or abandoned sequences leave the batch at once and their padding is trimmed.

Readers hold no thread: `stream_async` hands each token to the caller's event loop through an
`asyncio.Queue` fed with `loop.call_soon_threadsafe` (`stream` is the blocking form, for code
outside a loop). Admission is bounded twice: a batch holds at most `max_batch_size` rows and
`kv_cache_tokens` reserved cache tokens (each row reserves its prompt plus its token budget);
requests beyond wait, and past `max_queued_requests` waiting ones `QueueFull` refuses more.
A reader that goes away (closes its iterator, or its task is cancelled) takes its row out of
the batch before the next step.

A base whose cache is not a plain per-layer key/value tensor (sliding-window layers, for
example) cannot be padded this way: the engine then runs one sequence at a time.

Other torch work of the replica runs on the engine thread (`call`), or, when it is long and
needs no cache (loading a carry-on), on a side thread that runs torch on one thread
(`side_executor`), so it never stalls the running rows: each thread that enters an OpenMP
parallel region keeps a team of its own, and with a second team alive on a 2-core machine the
engine's small decode matmuls ran single-threaded (a 576 x 1536 matrix-vector product took
112 µs against 39 µs; 16.5 against 25.7 tokens/s). The engine pins its own thread count when it
starts, so a side thread's setting never reaches it. For the same reason a replica loads its
base on a thread that then ends (`in_passing_thread`): a team left on the loading thread made
a decode step of 8 rows take 74 ms instead of 52, and one HTTP client got 0.53x of
`generate()` instead of 0.93x.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import queue
import threading
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

import torch
import torch.nn.functional as F

from carryon_ray.bases import FrozenBase
from carryon_ray.carry_on import KVCache
from carryon_ray.fused import FusedStep, fused_step
from carryon_ray.merged import MergedModel, SamplingParams, next_token

logger = logging.getLogger(__name__)
T = TypeVar("T")

_END = object()
LATENCY_SAMPLES = 65_536  # timings kept for a metrics reader; the oldest go first
PREFILL_CHUNK_TOKENS = 256  # prompt tokens fed to the base between two decode steps, at most
MIN_PREFILL_CHUNK = 16  # a chunk fitted to the decode step never shrinks below this
EMA_WEIGHT = 0.2  # of the newest measurement in the step and prefill timings
FUSED_CHUNK_SHARE = 0.4  # a chunk in a decode step adds at most this share of a step, fitted


class BatcherClosed(RuntimeError):
    """The engine thread stopped (closed, or died): it takes no more work."""


class QueueFull(RuntimeError):
    """`max_queued_requests` requests already wait for room in the batch."""


@dataclass(eq=False)
class _Sequence:
    merged: MergedModel
    params: SamplingParams
    alpha: float
    so_far: list[int]
    budget: int
    generator: torch.Generator | None
    put: Callable[[object], None]  # hands a token, _END or an error to the reader
    cancelled: threading.Event = field(default_factory=threading.Event)
    reserved: int = 0  # cache tokens this row may reach: prompt + budget
    carry_cache: KVCache | None = None
    position: int = 0  # carry-on positions already seen
    produced: int = 0
    cached: int = 0  # tokens in the base cache for this row
    prefill_cache: object | None = None  # the base's cache while the prompt is fed in chunks
    submitted: float = field(default_factory=time.perf_counter)
    emitted: float = 0.0  # perf_counter() when its latest token came out

    def emit(self, token: int) -> bool:
        """Hand `token` to the reader; True while the sequence should go on."""
        self.put(token)
        self.produced += 1
        self.so_far.append(token)
        done = token in self.params.stop_token_ids or self.produced >= self.budget
        if done:
            self.put(_END)
        return not done  # a reader gone meanwhile: `_drop_abandoned` before the next step


class _Mailbox:
    """Hands items from the engine thread to one event loop. The engine posts a step's tokens
    and flushes once after the step, so a step of 8 rows wakes the loop once, not 8 times."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._lock = threading.Lock()
        self._items: list[tuple[Callable[[object], None], object]] = []

    def post(self, deliver: Callable[[object], None], item: object) -> None:
        """`deliver(item)` on the loop at the next flush, in posting order; RuntimeError once
        the loop is closed."""
        if self.loop.is_closed():
            raise RuntimeError("the event loop is closed")
        with self._lock:
            self._items.append((deliver, item))

    def flush(self) -> None:
        """What was posted, to the loop in one callback (callbacks run in the order given)."""
        with self._lock:
            items, self._items = self._items, []
        if items:
            try:
                self.loop.call_soon_threadsafe(_deliver_all, items)
            except RuntimeError:  # closed meanwhile: nobody will read
                pass


def _deliver_all(items: list[tuple[Callable[[object], None], object]]) -> None:
    for deliver, item in items:
        deliver(item)


class DecodeBatcher:
    """Runs every generation of one base in shared forward passes (see the module doc)."""

    def __init__(
        self,
        base: FrozenBase,
        *,
        max_batch_size: int = 8,
        kv_cache_tokens: int | None = None,
        max_queued_requests: int | None = None,
        prefill_chunk_tokens: int = PREFILL_CHUNK_TOKENS,
        fit_chunks_to_steps: bool = True,
        fuse_prefill: bool = True,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if prefill_chunk_tokens < 1:
            raise ValueError(f"prefill_chunk_tokens must be >= 1, got {prefill_chunk_tokens}")
        self.base = base
        self.paddable = paddable_cache(base)
        self.max_batch_size = max_batch_size if self.paddable else 1
        if max_batch_size > 1 and not self.paddable:
            logger.warning(
                "base '%s' has a cache that cannot be padded (sliding-window layers?): "
                "generations run one at a time",
                base.name,
            )
        # Default: every row may reach the base's whole context.
        self.kv_cache_tokens = kv_cache_tokens or base.max_positions * self.max_batch_size
        self.max_queued_requests = max_queued_requests  # None: no limit
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.fit_chunks_to_steps = fit_chunks_to_steps
        self.step_seconds = 0.0  # moving average of a decode step of the running batch
        self.fitted_chunk = float(MIN_PREFILL_CHUNK)  # prompt tokens that take one step's time
        self.fuse_prefill = fuse_prefill
        self.fused: FusedStep | None = None  # set on the engine thread where the base allows
        self._threads = torch.get_num_threads()  # the engine's own, pinned when it starts
        self._pending: list[_Sequence] = []
        self._tasks: list[tuple[Future, Callable, tuple]] = []
        self._prefilling: list[_Sequence] = []  # admitted, their prompts fed chunk by chunk
        self._running: list[_Sequence] = []
        self._cache = None
        self._wake = threading.Condition()
        self._mailboxes: dict[asyncio.AbstractEventLoop, _Mailbox] = {}
        self._closed = False
        self.failure: BaseException | None = None  # what killed the engine thread, if anything
        self.steps = 0  # batched decode steps run
        self.rows = 0  # sequence-steps in them (rows / steps = mean batch size)
        # The same for steps taken while requests waited for room: the batch the engine keeps
        # under load, without the ramp-up and the tail of a burst.
        self.queued_steps = 0
        self.queued_rows = 0
        self.prefill_chunks = 0  # prompt chunks fed to the base
        self.abandoned = 0  # sequences whose reader went away before they finished
        # Seconds from joining the queue to the first token, and between a row's tokens,
        # for a metrics reader to drain (`popleft`): the engine only appends.
        self.first_token_seconds: deque[float] = deque(maxlen=LATENCY_SAMPLES)
        self.token_gap_seconds: deque[float] = deque(maxlen=LATENCY_SAMPLES)
        self._thread = threading.Thread(target=self._loop, name="decode-batcher", daemon=True)
        self._thread.start()
        # Stop the engine before the interpreter tears torch down under it.
        atexit.register(_close_at_exit, weakref.ref(self))

    def stream(
        self,
        merged: MergedModel,
        prompt_ids: list[int],
        params: SamplingParams,
        *,
        alpha: float | None = None,
    ) -> Iterator[int]:
        """Generated token ids, as `MergedModel.stream` yields them; closing the iterator
        early takes the sequence out of the batch. Blocks the reading thread between tokens."""
        out: queue.SimpleQueue = queue.SimpleQueue()
        sequence = self._submit(merged, prompt_ids, params, alpha=alpha, put=out.put)
        if sequence is None:  # the prompt fills the context: nothing to generate
            return (token for token in ())
        return self._read(sequence.cancelled, out)

    def stream_async(
        self,
        merged: MergedModel,
        prompt_ids: list[int],
        params: SamplingParams,
        *,
        alpha: float | None = None,
    ) -> AsyncIterator[int]:
        """`stream` for a caller on an event loop: the engine thread hands each token to this
        loop (`call_soon_threadsafe` into an `asyncio.Queue`), so no thread waits for it.
        Errors of the request (`ValueError`, `QueueFull`, `BatcherClosed`) raise here, before
        any token; cancelling the reading task or closing the iterator ends the generation."""
        mailbox = self._mailbox(asyncio.get_running_loop())
        out: asyncio.Queue = asyncio.Queue()
        cancelled = threading.Event()

        def put(item: object) -> None:
            try:
                mailbox.post(out.put_nowait, item)
            except RuntimeError:  # the loop is closed: nobody will read
                cancelled.set()
            if threading.current_thread() is not self._thread:  # the engine flushes its own
                mailbox.flush()

        sequence = self._submit(
            merged, prompt_ids, params, alpha=alpha, put=put, cancelled=cancelled
        )
        if sequence is None:  # the prompt fills the context: nothing to generate
            out.put_nowait(_END)
        return self._read_async(cancelled, out)

    def _mailbox(self, loop: asyncio.AbstractEventLoop) -> _Mailbox:
        """The one mailbox of this loop: a decode step wakes it once for all its rows."""
        with self._wake:
            for other in [other for other in self._mailboxes if other.is_closed()]:
                del self._mailboxes[other]
            return self._mailboxes.setdefault(loop, _Mailbox(loop))

    def _flush(self) -> None:
        """Wake each event loop that has tokens from this engine thread waiting."""
        with self._wake:
            mailboxes = list(self._mailboxes.values())
        for mailbox in mailboxes:
            mailbox.flush()

    def _submit(
        self,
        merged: MergedModel,
        prompt_ids: list[int],
        params: SamplingParams,
        *,
        alpha: float | None,
        put: Callable[[object], None],
        cancelled: threading.Event | None = None,
    ) -> _Sequence | None:
        """Check the request and queue it for admission; None when there is nothing to do."""
        if merged.base is not self.base:
            raise ValueError(f"this batcher runs base '{self.base.name}', not '{merged.base.name}'")
        merged.check_length(len(prompt_ids))
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device="cpu").manual_seed(params.seed)
        sequence = _Sequence(
            merged=merged,
            params=params,
            alpha=merged.alpha if alpha is None else alpha,
            so_far=list(prompt_ids),
            budget=min(params.max_new_tokens, merged.context_length - len(prompt_ids)),
            generator=generator,
            put=put,
            cancelled=threading.Event() if cancelled is None else cancelled,
        )
        if sequence.budget < 1:
            return None
        sequence.reserved = len(prompt_ids) + sequence.budget
        if sequence.reserved > self.kv_cache_tokens:
            raise ValueError(
                f"the prompt ({len(prompt_ids)} tokens) and max_tokens ({sequence.budget}) need "
                f"{sequence.reserved} cache tokens but this server holds {self.kv_cache_tokens} "
                "(serve.kv_cache_tokens); send a shorter prompt or a lower max_tokens"
            )
        with self._wake:
            if self._closed:
                raise BatcherClosed(self.closed_reason())
            self._prune_pending()
            free = max(0, self.max_batch_size - self.running - self.prefilling)
            if (
                self.max_queued_requests is not None
                and len(self._pending) >= self.max_queued_requests + free
            ):
                raise QueueFull(
                    f"{len(self._pending)} requests already wait for a place in the batch "
                    f"(serve.max_queued_requests={self.max_queued_requests}); retry shortly"
                )
            self._pending.append(sequence)
            self._wake.notify()
        return sequence

    def closed_reason(self) -> str:
        """Why the engine takes no work (closed, or its thread died)."""
        if self.failure is not None:
            return f"the decode batcher is closed: its engine thread died ({self.failure!r})"
        return "the decode batcher is closed"

    @staticmethod
    def _read(cancelled: threading.Event, out: queue.SimpleQueue) -> Iterator[int]:
        try:
            while True:
                item = out.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            cancelled.set()

    @staticmethod
    async def _read_async(cancelled: threading.Event, out: asyncio.Queue) -> AsyncIterator[int]:
        try:
            while True:
                item = await out.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:  # done, closed early, or the reading task was cancelled
            cancelled.set()

    @property
    def alive(self) -> bool:
        """Whether the engine thread runs and takes work."""
        return self._thread.is_alive() and not self._closed

    @property
    def waiting(self) -> int:
        """Requests queued for a place in the batch."""
        return sum(not seq.cancelled.is_set() for seq in self._pending)

    @property
    def running(self) -> int:
        """Rows in the running batch."""
        return len(self._running)

    @property
    def prefilling(self) -> int:
        """Admitted requests whose prompts are still being fed to the base. The engine prefills
        without the lock, and one that joined the batch during this chunk stays in
        `_prefilling` until the chunk ends: it counts as running only."""
        running = set(self._running)
        return sum(seq not in running for seq in self._prefilling)

    def call(self, function: Callable, *args):
        """Run `function(*args)` on the engine thread, between steps, and return its result
        (or raise its error). See the module doc for why torch work belongs there."""
        return self.submit(function, *args).result()

    def submit(self, function: Callable, *args) -> Future:
        """`call` without waiting: the future of `function(*args)` on the engine thread
        (`asyncio.wrap_future` awaits it on an event loop)."""
        future: Future = Future()
        with self._wake:
            if self._closed:
                raise BatcherClosed(self.closed_reason())
            self._tasks.append((future, function, args))
            self._wake.notify()
        return future

    def close(self, *, timeout: float = 10.0) -> None:
        """Stop the engine after its current step; every unfinished reader gets
        `BatcherClosed` (a stream then ends with an error event). Idempotent."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=timeout)

    # -- the engine thread ---------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            self._serve()
        except BaseException as error:
            self.failure = error
            raise
        finally:  # however the engine stops, nobody waits on it forever
            with self._wake:
                self._closed = True
                failed = self._pending + self._prefilling + self._running
                self._pending, self._prefilling, self._running = [], [], []
                self._cache = None
                tasks, self._tasks = self._tasks, []
            reason = self.closed_reason().replace(" is closed", " was closed")
            for sequence in failed:
                sequence.put(BatcherClosed(reason))
            self._flush()
            for future, _, _ in tasks:
                if future.set_running_or_notify_cancel():
                    future.set_exception(BatcherClosed(reason))

    @torch.no_grad()
    def _serve(self) -> None:
        # Pin this thread's intra-op thread count: torch reads the process-wide count when a
        # thread first runs parallel work, and a side thread may have changed it meanwhile.
        torch.get_num_threads()
        torch.set_num_threads(self._threads)
        if self.fuse_prefill and self.paddable:
            self.fused = fused_step(self.base)
        while True:
            with self._wake:
                while not (
                    self._closed
                    or self._pending
                    or self._prefilling
                    or self._running
                    or self._tasks
                ):
                    self._wake.wait()
                if self._closed:
                    return
                self._prefilling = self._prefilling + self._admissible()
                queued = bool(self._pending)  # requests left waiting for room
                tasks, self._tasks = self._tasks, []
            self._drop_abandoned()
            for future, function, args in tasks:
                if not future.set_running_or_notify_cancel():  # its caller went away
                    continue
                try:
                    future.set_result(function(*args))
                except Exception as error:  # noqa: BLE001 - handed back to the caller
                    future.set_exception(error)
            fuse = self.fused is not None and bool(self._running) and bool(self._prefilling)
            if self._prefilling and not fuse:
                self._prefill()
                self._flush()  # first tokens out before the step
            if self._running:
                if queued:
                    self.queued_steps += 1
                    self.queued_rows += len(self._running)
                if fuse:  # it fits the chunk width to its own time
                    self._guard(list(self._running), self._fused_step)
                else:
                    started = time.perf_counter()
                    self._guard(list(self._running), self._step)
                    self.step_seconds = _average(self.step_seconds, time.perf_counter() - started)
            self._flush()

    def _admissible(self) -> list[_Sequence]:
        """Take waiting requests, oldest first, while the batch has a row and cache room for
        them (the caller holds the lock)."""
        self._prune_pending()
        admitted = self._prefilling + self._running
        used = sum(seq.reserved for seq in admitted)
        taken = 0
        for sequence in self._pending:
            full = len(admitted) + taken >= self.max_batch_size
            if full or used + sequence.reserved > self.kv_cache_tokens:
                break
            used += sequence.reserved
            taken += 1
        admitted, self._pending = self._pending[:taken], self._pending[taken:]
        return admitted

    def _prune_pending(self) -> None:
        """Forget waiting requests whose reader went away (the caller holds the lock)."""
        waiting = [seq for seq in self._pending if not seq.cancelled.is_set()]
        self.abandoned += len(self._pending) - len(waiting)
        self._pending = waiting

    def _drop_abandoned(self) -> None:
        """Take rows whose reader went away out of the batch before the next step."""
        keep = [row for row, seq in enumerate(self._running) if not seq.cancelled.is_set()]
        self.abandoned += len(self._running) - len(keep)
        self._keep(keep)

    def _guard(self, sequences: list[_Sequence], work, *args) -> None:
        """Run `work`; on an error, fail `sequences` (their readers raise it) and drop them."""
        try:
            work(*args)
        except Exception as error:
            logger.exception("generation step failed")
            for sequence in sequences:
                sequence.put(error)
            failed = set(sequences)
            keep = [row for row, seq in enumerate(self._running) if seq not in failed]
            self._keep(keep)

    def _layers(self, sequences: list[_Sequence]) -> list[int]:
        return sorted({index for seq in sequences for index in seq.merged.layers.values()})

    def _prefill(self) -> None:
        """Feed this step's chunks (`_chunk_plan`) to the base, each in a forward of its own;
        a prompt done joins the batch, a failed or abandoned one leaves."""
        for sequence, width in self._chunk_plan():
            started = time.perf_counter()
            self._feed(sequence, self._admit, sequence, width)
            if self.step_seconds > 0:
                # A chunk of w tokens takes about a + b·w; w·step/time moves w towards the
                # width whose chunk takes one step (from below or above, never past it).
                seconds = time.perf_counter() - started
                fitted = width * self.step_seconds / max(seconds, 1e-6)
                self.fitted_chunk = min(
                    _average(self.fitted_chunk, fitted), float(self.prefill_chunk_tokens)
                )

    def _chunk_plan(self) -> list[tuple[_Sequence, int]]:
        """Drop prompts whose reader went away; then this step's chunks, (prompt, tokens),
        oldest prompt first within `_chunk_budget` (short prompts share it; a prompt's last
        chunk may take up to twice the budget)."""
        kept = [seq for seq in self._prefilling if not seq.cancelled.is_set()]
        self.abandoned += len(self._prefilling) - len(kept)
        self._prefilling = kept
        budget, plan = self._chunk_budget(), []
        for sequence in self._prefilling:
            if budget <= 0:
                break
            left = len(sequence.so_far) - sequence.cached
            # A rest of at most two chunks goes in whole: split, its row would wait a whole
            # step more for a few tokens, and one step a chunk longer costs the others less.
            width = left if left <= 2 * budget else budget
            budget -= width
            plan.append((sequence, width))
        return plan

    def _feed(self, sequence: _Sequence, work, *args) -> None:
        """Run one chunk's `work` (True when the prompt is done); its error goes to that
        prompt alone. A prompt done (joined, finished at once, or failed) leaves `_prefilling`."""
        try:
            finished = work(*args)
        except Exception as error:
            logger.exception("prefill failed")
            sequence.put(error)
            finished = True
        if finished:
            sequence.prefill_cache = None
            self._prefilling.remove(sequence)

    def _fit_fused_chunk(self, seconds: float, tokens: int) -> None:
        """A fused step carrying w chunk tokens takes about step + c·w: move the chunk width
        towards the w whose share of the step is `FUSED_CHUNK_SHARE` of a plain step."""
        if self.step_seconds <= 0:
            return
        extra = max(seconds - self.step_seconds, 1e-6)
        fitted = tokens * FUSED_CHUNK_SHARE * self.step_seconds / extra
        # One step timed fast or slow by the machine moves the width at most 2x.
        fitted = min(max(fitted, self.fitted_chunk / 2), self.fitted_chunk * 2)
        self.fitted_chunk = min(_average(self.fitted_chunk, fitted), float(self.prefill_chunk_tokens))

    def _chunk_budget(self) -> int:
        """Prompt tokens for this step: `prefill_chunk_tokens`; while rows run (and
        `fit_chunks_to_steps`), only as many as the engine prefills in one of their decode
        steps (at least `MIN_PREFILL_CHUNK`), so a chunk takes about one of their steps."""
        budget = self.prefill_chunk_tokens
        if self.fit_chunks_to_steps and self._running:
            budget = min(budget, max(int(self.fitted_chunk), MIN_PREFILL_CHUNK))
        return budget

    def _admit(self, sequence: _Sequence, width: int) -> bool:
        """Feed the next `width` prompt tokens to the base (and the carry-on); after the last
        chunk, emit the first token and join the running batch. True when the prompt is done
        (joined, finished at once, or failed)."""
        states, sequence.prefill_cache = self.base.forward(
            self._chunk_ids(sequence, width),
            self._layers([sequence]),
            past_key_values=sequence.prefill_cache,
        )
        return self._chunk_fed(sequence, states, width)

    def _chunk_ids(self, sequence: _Sequence, width: int) -> torch.Tensor:
        """The next `width` prompt tokens of a prefilling sequence, (1, width); its cache made."""
        if sequence.prefill_cache is None:
            sequence.prefill_cache = self.base.new_cache()
        start = sequence.cached
        return torch.tensor(
            [sequence.so_far[start : start + width]], dtype=torch.long, device=self.base.device
        )

    def _chunk_fed(self, sequence: _Sequence, states: dict[int, torch.Tensor], width: int) -> bool:
        """After the base took `width` more prompt tokens (`states`): the carry-on's part, and
        after the last chunk the first token and the join. True when the prompt is done."""
        end = sequence.cached + width
        sequence.cached = end
        self.prefill_chunks += 1
        if end < len(sequence.so_far):  # more prompt to come: the carry-on sees this chunk too
            return self._hidden(sequence, states, sequence.so_far[:end], width=width) is None
        [token] = self._tokens([sequence], states, width=width)
        sequence.emitted = time.perf_counter()
        self.first_token_seconds.append(sequence.emitted - sequence.submitted)
        if token is not None and sequence.emit(token):
            self._join(sequence, sequence.prefill_cache)
        return True

    def _step(self) -> None:
        """One base forward for the newest token of every running sequence."""
        running = self._running
        ids, mask, positions = self._step_inputs(running)
        states, self._cache = self.base.forward(
            ids,
            self._layers(running),
            attention_mask=mask,
            position_ids=positions,
            past_key_values=self._cache,
        )
        self._stepped(running, states)

    def _fused_step(self) -> None:
        """The decode step with the joining prompts' next chunks in the same forward
        (`carryon_ray.fused`), `_chunk_plan`'s: the chunks share the step's read of the weights.
        Times itself to fit the chunk width."""
        started = time.perf_counter()
        fed = self._chunk_plan()
        if not fed:
            self._step()
            return
        running = self._running
        ids, mask, positions = self._step_inputs(running)
        try:
            chunks = [(self._chunk_ids(seq, width), seq.prefill_cache) for seq, width in fed]
            row_states, chunk_states = self.fused(
                ids, mask, positions, self._cache, chunks,
                self._layers([*running, *(seq for seq, _ in fed)]),
            )
        except Exception as error:  # the rows get it through `_guard`; the prompts here
            for sequence, _ in fed:
                sequence.put(error)
                self._prefilling.remove(sequence)
            raise
        self._stepped(running, row_states)
        for (sequence, width), states in zip(fed, chunk_states, strict=True):
            self._feed(sequence, self._chunk_fed, sequence, states, width)
        self._fit_fused_chunk(time.perf_counter() - started, sum(width for _, width in fed))

    def _step_inputs(
        self, running: list[_Sequence]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The newest token of each row (B, 1), the mask over the cache's columns and the new
        one (B, past + 1; each row's past is left-padded) and each row's position (B, 1)."""
        past = self._cache.get_seq_length()
        device = self.base.device
        ids = torch.tensor([[seq.so_far[-1]] for seq in running], dtype=torch.long, device=device)
        mask = torch.zeros(len(running), past + 1, dtype=torch.long, device=device)
        for row, seq in enumerate(running):
            mask[row, past - seq.cached :] = 1
        positions = torch.tensor([[seq.cached] for seq in running], dtype=torch.long, device=device)
        return ids, mask, positions

    def _stepped(self, running: list[_Sequence], states: dict[int, torch.Tensor]) -> None:
        """After a decode step: each row's next token out, finished rows out of the batch."""
        for seq in running:
            seq.cached += 1
        self.steps += 1
        self.rows += len(running)
        tokens = self._tokens(running, states, width=1)
        now = time.perf_counter()
        for seq in running:
            self.token_gap_seconds.append(now - seq.emitted)
            seq.emitted = now
        keep = [
            row
            for row, (seq, token) in enumerate(zip(running, tokens, strict=True))
            if token is not None and seq.emit(token)
        ]
        self._keep(keep)

    def _tokens(
        self, sequences: list[_Sequence], states: dict[int, torch.Tensor], *, width: int
    ) -> list[int | None]:
        """Merge per sequence, one head pass per distinct head, then sample per sequence.

        A sequence whose own part fails (its carry-on, its sampling) gets the error and None;
        the others go on."""
        hidden = [
            self._hidden(
                seq,
                {index: state[row : row + 1] for index, state in states.items()},
                seq.so_far,
                width=width,
            )
            for row, seq in enumerate(sequences)
        ]
        logits: list[torch.Tensor | None] = [None] * len(sequences)
        heads: dict[int, list[int]] = {}
        for row, seq in enumerate(sequences):
            if hidden[row] is not None:
                heads.setdefault(id(seq.merged.head), []).append(row)
        for rows in heads.values():
            head = sequences[rows[0]].merged.head
            out = head(torch.cat([hidden[row] for row in rows])).float()
            for number, row in enumerate(rows):
                logits[row] = out[number]
        return [
            None
            if row_logits is None
            else self._own(seq, next_token, row_logits, seq.params, seq.generator)
            for row_logits, seq in zip(logits, sequences, strict=True)
        ]

    def _hidden(
        self,
        sequence: _Sequence,
        states: dict[int, torch.Tensor],
        so_far: list[int],
        *,
        width: int,
    ) -> torch.Tensor | None:
        """The merged hidden state (1, D) of the last of `width` new positions of one sequence,
        whose base states {layer: (1, width, D)} end with token `so_far[-1]`; the carry-on's
        cache and position move on. None when its carry-on failed (the reader has the error)."""
        merged = self._own(
            sequence,
            sequence.merged.step_hidden,
            states,
            so_far,
            alpha=sequence.alpha,
            position=sequence.position,
            cache=sequence.carry_cache,
        )
        if merged is None:
            return None
        merged, sequence.carry_cache = merged
        sequence.position += width
        return merged

    @staticmethod
    def _own(sequence: _Sequence, work, *args, **kwargs):
        """`work(...)` for one sequence; an error goes to that sequence's reader alone (None)."""
        try:
            return work(*args, **kwargs)
        except Exception as error:
            logger.exception("a generation failed")
            sequence.put(error)
            return None

    def _join(self, sequence: _Sequence, cache) -> None:
        """Add a prefilled sequence's cache to the batch, left-padding the shorter side."""
        if self._cache is None:
            self._cache, self._running = cache, [sequence]
            return
        have, new = self._cache.get_seq_length(), cache.get_seq_length()
        length = max(have, new)
        for mine, theirs in zip(self._cache.layers, cache.layers, strict=True):
            mine.keys = torch.cat(
                [_left_pad(mine.keys, length - have), _left_pad(theirs.keys, length - new)]
            )
            mine.values = torch.cat(
                [_left_pad(mine.values, length - have), _left_pad(theirs.values, length - new)]
            )
        self._running.append(sequence)

    def _keep(self, rows: list[int]) -> None:
        """Keep only these rows of the batch; trim columns that are padding in every row."""
        if len(rows) == len(self._running):
            return
        self._running = [self._running[row] for row in rows]
        if not self._running:
            self._cache = None
            return
        index = torch.tensor(rows, dtype=torch.long, device=self.base.device)
        cut = self._cache.get_seq_length() - max(seq.cached for seq in self._running)
        for layer in self._cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, cut:]
            layer.values = layer.values.index_select(0, index)[:, :, cut:]

    @property
    def mean_batch_size(self) -> float:
        return self.rows / self.steps if self.steps else 0.0

    @property
    def mean_queued_batch_size(self) -> float:
        """The mean batch of the steps taken while requests waited for room."""
        return self.queued_rows / self.queued_steps if self.queued_steps else 0.0


def _average(average: float, value: float) -> float:
    """An exponential moving average; the first value stands alone."""
    return value if average == 0 else (1 - EMA_WEIGHT) * average + EMA_WEIGHT * value


def _close_at_exit(reference: weakref.ref) -> None:
    batcher = reference()
    if batcher is not None:
        batcher.close(timeout=5.0)


def _left_pad(tensor: torch.Tensor, amount: int) -> torch.Tensor:
    """(B, H, T, d) -> (B, H, amount + T, d) with zeros in front."""
    return F.pad(tensor, (0, 0, amount, 0)) if amount else tensor


def paddable_cache(base: FrozenBase) -> bool:
    """Whether the base's cache is one full-length key/value tensor pair per layer."""
    from transformers.cache_utils import DynamicLayer

    cache = base.new_cache()
    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


def in_passing_thread(function: Callable[[], T], name: str) -> T:
    """`function()` on a thread that ends when it returns (its exception re-raised here).

    For torch work before an engine starts, such as loading its base: the OpenMP team that work
    starts lives as long as the thread that started it, and with a second team alive beside the
    engine's, a 2-core replica's decode step of 8 rows took 74 ms instead of 52."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix=name) as executor:
        return executor.submit(function).result()  # leaving the block joins the thread


def side_executor(name: str) -> ThreadPoolExecutor:
    """One worker thread for torch work beside the engine (loading a carry-on) that runs torch
    on one thread of its own, so it starts no second OpenMP team (see the module doc) and
    takes at most one core from the engine. Call it from the thread whose torch thread count
    is the process's: torch's setter also writes the process-wide count, which is put back."""
    threads = torch.get_num_threads()
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)

    def one_thread() -> None:
        torch.get_num_threads()  # this thread's lazy init reads the process-wide count first
        torch.set_num_threads(1)

    executor.submit(one_thread).result()
    torch.set_num_threads(threads)
    return executor
