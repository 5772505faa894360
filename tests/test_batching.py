"""Continuous batching: shared base passes give what each sequence alone would give."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest
import torch

from carryon_ray.bases import FrozenBase
from carryon_ray.batching import (
    MIN_PREFILL_CHUNK,
    BatcherClosed,
    DecodeBatcher,
    QueueFull,
    in_passing_thread,
    paddable_cache,
)
from carryon_ray.fused import FusedStep
from carryon_ray.merged import MergedModel, SamplingParams
from tests.test_merged import _carry_on, _layout, _merged

PROMPTS = [
    "Question: Natalia sold 48 clips",
    "def add(a, b):",
    "numbers 0 1 2 3 4 5 6 7 8 9 = + - * / < > and then some more words here",
    "x",
]


@pytest.fixture()
def batcher(lively_base):
    engine = DecodeBatcher(lively_base, max_batch_size=8)
    yield engine
    engine.close()


def _ids(base: FrozenBase, text: str) -> list[int]:
    return base.tokenizer(text)["input_ids"]


def _requests(
    base: FrozenBase,
) -> list[tuple[MergedModel, list[int], SamplingParams, float | None]]:
    """Prompts of different lengths, the plain base and two carry-ons, α overridden once,
    budgets that end at different steps, one sampled with a seed."""
    plain = MergedModel(base)
    tuned = _merged(base, perturbed=True)
    other = _merged(base, perturbed=True, input_bits=8)
    with torch.no_grad():
        other.carry_on.delta.weight.mul_(-1.0)
    return [
        (tuned, _ids(base, PROMPTS[0]), SamplingParams(max_new_tokens=12), None),
        (plain, _ids(base, PROMPTS[1]), SamplingParams(max_new_tokens=5), None),
        (other, _ids(base, PROMPTS[2]), SamplingParams(max_new_tokens=9), None),
        (tuned, _ids(base, PROMPTS[3]), SamplingParams(max_new_tokens=12), 0.5),
        (
            tuned,
            _ids(base, PROMPTS[1]),
            SamplingParams(max_new_tokens=7, temperature=0.8, seed=3),
            None,
        ),
    ]


def test_concurrent_sequences_match_their_one_at_a_time_generation(batcher, lively_base):
    requests = _requests(lively_base)
    expected = [
        merged.generate(ids, params, alpha=alpha) for merged, ids, params, alpha in requests
    ]
    streams = [
        batcher.stream(merged, ids, params, alpha=alpha) for merged, ids, params, alpha in requests
    ]
    got = [list(stream) for stream in streams]
    assert got == expected
    assert [len(tokens) for tokens in got] == [12, 5, 9, 12, 7]
    assert batcher.mean_batch_size > 1.5  # they did share passes


def test_batched_logits_agree_with_a_lone_sequence(lively_base):
    """The padded batch computes each row's states as that row alone does (to float tolerance)."""
    engine = DecodeBatcher(lively_base, max_batch_size=8)
    try:
        tuned = _merged(lively_base, perturbed=True)
        short, long = _ids(lively_base, PROMPTS[3]), _ids(lively_base, PROMPTS[2])
        params = SamplingParams(max_new_tokens=6)
        together = [engine.stream(tuned, ids, params) for ids in (short, long)]
        outputs = [list(stream) for stream in together]
        for ids, out in zip((short, long), outputs, strict=True):
            full = torch.tensor([ids + out[:-1]])
            alone = tuned.logits(full)[0, len(ids) - 1 :].argmax(-1).tolist()
            assert alone == out
    finally:
        engine.close()


def test_a_reader_that_stops_early_leaves_the_batch_and_others_go_on(batcher, lively_base):
    tuned = _merged(lively_base, perturbed=True)
    ids_a, ids_b = _ids(lively_base, PROMPTS[0]), _ids(lively_base, PROMPTS[2])
    params = SamplingParams(max_new_tokens=15)
    expected_b = tuned.generate(ids_b, params)
    first = batcher.stream(tuned, ids_a, params)
    second = batcher.stream(tuned, ids_b, params)
    assert next(first) == tuned.generate(ids_a, params)[0]
    first.close()  # the client went away
    assert list(second) == expected_b
    assert list(batcher.stream(tuned, ids_a, SamplingParams(max_new_tokens=3))) == tuned.generate(
        ids_a, SamplingParams(max_new_tokens=3)
    )


def test_stop_tokens_end_a_sequence_alone(batcher, lively_base):
    tuned = _merged(lively_base, perturbed=True)
    ids = _ids(lively_base, PROMPTS[0])
    free = tuned.generate(ids, SamplingParams(max_new_tokens=10))
    stop = SamplingParams(max_new_tokens=10, stop_token_ids=(free[3],))
    first = free.index(free[3])
    streams = [
        batcher.stream(tuned, ids, stop),
        batcher.stream(tuned, ids, SamplingParams(max_new_tokens=10)),
    ]
    assert [list(stream) for stream in streams] == [free[: first + 1], free]


def test_bad_requests_fail_before_they_join(batcher, lively_base):
    tuned = _merged(lively_base, perturbed=True)
    with pytest.raises(ValueError, match="empty"):
        batcher.stream(tuned, [], SamplingParams())
    with pytest.raises(ValueError, match="context holds"):
        batcher.stream(tuned, [1] * 1000, SamplingParams())
    other = FrozenBase.from_model("other", lively_base.model, lively_base.tokenizer)
    with pytest.raises(ValueError, match="runs base 'lively'"):
        batcher.stream(MergedModel(other), [1, 2], SamplingParams())


def test_a_prompt_that_fills_the_context_generates_nothing(batcher, lively_base):
    tuned = MergedModel(
        lively_base, _carry_on(lively_base, perturbed=True, max_positions=8), _layout(lively_base)
    )
    ids = list(range(1, 9))
    assert (
        tuned.generate(ids, SamplingParams())
        == list(batcher.stream(tuned, ids, SamplingParams()))
        == []
    )


def test_call_runs_work_on_the_engine_thread_and_returns_or_raises(batcher):
    assert batcher.call(lambda: threading.current_thread().name) == "decode-batcher"
    assert batcher.call(sum, [1, 2, 3]) == 6
    with pytest.raises(ZeroDivisionError):
        batcher.call(lambda: 1 / 0)


def test_a_closed_batcher_refuses_work(lively_base):
    engine = DecodeBatcher(lively_base, max_batch_size=2)
    engine.close()
    with pytest.raises(RuntimeError, match="closed"):
        engine.stream(MergedModel(lively_base), [1, 2], SamplingParams())
    with pytest.raises(RuntimeError, match="closed"):
        engine.call(sum, [1])


def test_llama_style_caches_are_paddable(lively_base):
    assert paddable_cache(lively_base)
    engine = DecodeBatcher(lively_base, max_batch_size=4)
    engine.close()
    assert engine.max_batch_size == 4


class _FailingMerged(MergedModel):
    """A carry-on whose step fails after `after` calls (a broken artifact, say)."""

    def __init__(self, *args, after: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.calls, self.after = 0, after

    def step_hidden(self, *args, **kwargs):
        self.calls += 1
        if self.calls > self.after:
            raise RuntimeError("this carry-on broke")
        return super().step_hidden(*args, **kwargs)


def test_a_failing_sequence_fails_alone(lively_base):
    engine = DecodeBatcher(lively_base, max_batch_size=8)
    try:
        tuned = _merged(lively_base, perturbed=True)
        broken = _FailingMerged(
            lively_base, _carry_on(lively_base, perturbed=True), _layout(lively_base), after=3
        )
        ids = _ids(lively_base, PROMPTS[0])
        params = SamplingParams(max_new_tokens=10)
        good, bad = engine.stream(tuned, ids, params), engine.stream(broken, ids, params)
        with pytest.raises(RuntimeError, match="broke"):
            list(bad)
        assert list(good) == tuned.generate(ids, params)
    finally:
        engine.close()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # on purpose
def test_an_engine_that_dies_fails_its_readers_instead_of_hanging(lively_base, monkeypatch):
    engine = DecodeBatcher(lively_base, max_batch_size=8)

    def die() -> None:
        raise SystemExit("engine killed")

    monkeypatch.setattr(engine, "_step", die)
    stream = engine.stream(_merged(lively_base, perturbed=True), [5, 6, 7], SamplingParams())
    with pytest.raises(RuntimeError, match="closed"):
        list(stream)
    engine._thread.join(timeout=10)
    with pytest.raises(RuntimeError, match="closed"):
        engine.call(sum, [1])


def test_text_stream_through_the_batcher_equals_the_plain_one(batcher, lively_base):
    from carryon_ray.openai_api import TextStream

    tuned = _merged(lively_base, perturbed=True)
    ids = _ids(lively_base, PROMPTS[0])
    params = SamplingParams(max_new_tokens=12)
    kwargs = {"alpha": None, "stops": [], "tokenizer": lively_base.tokenizer}
    plain = "".join(TextStream(tuned, ids, params, **kwargs))
    assert "".join(TextStream(tuned, ids, params, batcher=batcher, **kwargs)) == plain
    full = MergedModel(
        lively_base, _carry_on(lively_base, perturbed=True, max_positions=8), _layout(lively_base)
    )
    assert "".join(TextStream(full, list(range(1, 9)), params, batcher=batcher, **kwargs)) == ""


# ---------------------------------------------------------------------------------------------
# On an event loop: queues instead of threads, admission, readers that go away, shutdown


async def _collect(stream) -> list[int]:
    return [token async for token in stream]


def test_async_readers_match_their_one_at_a_time_generation(batcher, lively_base):
    """Tokens reach the event loop through queues: no thread per reader, same tokens."""
    requests = _requests(lively_base)
    expected = [
        merged.generate(ids, params, alpha=alpha) for merged, ids, params, alpha in requests
    ]

    async def main() -> list[list[int]]:
        threads = threading.active_count()
        streams = [
            batcher.stream_async(merged, ids, params, alpha=alpha)
            for merged, ids, params, alpha in requests
        ]
        got = await asyncio.gather(*(_collect(stream) for stream in streams))
        assert threading.active_count() == threads  # no reader took a thread
        return got

    assert asyncio.run(main()) == expected
    assert batcher.mean_batch_size > 1.5


def test_sixteen_async_readers_keep_the_batch_full(lively_base):
    engine = DecodeBatcher(lively_base, max_batch_size=8)
    try:
        plain = MergedModel(lively_base)
        ids = _ids(lively_base, PROMPTS[0])
        params = SamplingParams(max_new_tokens=24)  # no stop token: every row runs 24 steps

        wakeups = []

        async def main() -> list[list[int]]:
            loop = asyncio.get_running_loop()
            wake = loop.call_soon_threadsafe

            def counted(*args, **kwargs):
                wakeups.append(1)
                return wake(*args, **kwargs)

            loop.call_soon_threadsafe = counted
            release = threading.Event()
            engine.submit(release.wait)  # all 16 queue while the engine is busy
            streams = [engine.stream_async(plain, ids, params) for _ in range(16)]
            release.set()
            return await asyncio.gather(*(_collect(stream) for stream in streams))

        got = asyncio.run(main())
        assert all(tokens == got[0] for tokens in got) and len(got[0]) == 24
        # Two full waves of 8: the readers took no thread that could have run out.
        assert engine.mean_batch_size == 8
        # A step hands its 8 tokens over in one wake-up of the loop, not one per token.
        assert len(wakeups) < 16 * 25 / 4, len(wakeups)
    finally:
        engine.close()


def test_the_cache_budget_makes_requests_wait_for_room(lively_base):
    tuned = _merged(lively_base, perturbed=True)
    ids = _ids(lively_base, PROMPTS[0])
    params = SamplingParams(max_new_tokens=10)
    expected = tuned.generate(ids, params)
    need = len(ids) + 10
    engine = DecodeBatcher(lively_base, max_batch_size=8, kv_cache_tokens=2 * need)
    try:
        widest = []

        async def read(stream) -> list[int]:
            tokens = []
            async for token in stream:
                widest.append(engine.running)
                tokens.append(token)
            return tokens

        async def main() -> list[list[int]]:
            streams = [engine.stream_async(tuned, ids, params) for _ in range(5)]
            return await asyncio.gather(*(read(stream) for stream in streams))

        assert asyncio.run(main()) == [expected] * 5
        assert max(widest) == 2  # two rows' worth of cache: the others waited
        with pytest.raises(ValueError, match="serve.kv_cache_tokens"):
            engine.stream(tuned, ids, SamplingParams(max_new_tokens=2 * need))
    finally:
        engine.close()


def test_a_full_queue_refuses_more_requests(lively_base):
    engine = DecodeBatcher(lively_base, max_batch_size=1, max_queued_requests=1)
    try:
        release = threading.Event()
        engine.submit(release.wait)  # the engine is busy: nothing is admitted meanwhile
        plain, ids = MergedModel(lively_base), _ids(lively_base, PROMPTS[1])
        params = SamplingParams(max_new_tokens=3)
        # One for the free row, one queued; the third finds the queue full.
        first, second = engine.stream(plain, ids, params), engine.stream(plain, ids, params)
        with pytest.raises(QueueFull, match="max_queued_requests=1"):
            engine.stream(plain, ids, params)
        assert engine.waiting == 2
        release.set()
        assert list(first) == list(second) == plain.generate(ids, params)
    finally:
        engine.close()


def test_a_cancelled_async_reader_leaves_the_batch_and_others_go_on(batcher, lively_base):
    tuned = _merged(lively_base, perturbed=True)
    ids_a, ids_b = _ids(lively_base, PROMPTS[0]), _ids(lively_base, PROMPTS[2])
    long, short = SamplingParams(max_new_tokens=200), SamplingParams(max_new_tokens=15)
    expected_b = tuned.generate(ids_b, short)

    async def main() -> list[int]:
        first_token = asyncio.Event()

        async def leaver() -> None:
            async for _ in batcher.stream_async(tuned, ids_a, long):
                first_token.set()

        task = asyncio.create_task(leaver())
        other = asyncio.create_task(_collect(batcher.stream_async(tuned, ids_b, short)))
        await first_token.wait()
        task.cancel()  # the client went away (Serve cancels the handler's task)
        with pytest.raises(asyncio.CancelledError):
            await task
        return await other

    assert asyncio.run(main()) == expected_b
    deadline = time.monotonic() + 10
    while batcher.running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert batcher.running == 0 and batcher.abandoned == 1
    assert batcher.rows < 200  # the long one stopped well before its budget


def test_closing_ends_live_streams_with_an_error_event_and_done(lively_base):
    from carryon_ray.openai_api import TextStream, completion_events

    engine = DecodeBatcher(lively_base, max_batch_size=4)
    plain = MergedModel(lively_base)
    ids = _ids(lively_base, PROMPTS[0])

    async def main() -> list[str]:
        stream = TextStream(
            plain,
            ids,
            SamplingParams(max_new_tokens=200),
            alpha=None,
            stops=[],
            tokenizer=lively_base.tokenizer,
            batcher=engine,
        )
        stream.start()
        events = []
        async for event in completion_events("base", stream):
            events.append(event)
            if len(events) == 2:  # mid-stream: the replica shuts down
                await asyncio.to_thread(engine.close)
        return events

    events = asyncio.run(main())
    assert events[-1] == "data: [DONE]\n\n"
    error = json.loads(events[-2].removeprefix("data: "))["error"]
    assert "closed" in error["message"] and error["type"] == "server_error"
    assert len(events) < 200


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # on purpose
def test_a_dead_engine_is_not_alive_and_says_why(lively_base, monkeypatch):
    engine = DecodeBatcher(lively_base, max_batch_size=8)
    assert engine.alive

    def die() -> None:
        raise SystemExit("engine killed")

    monkeypatch.setattr(engine, "_step", die)

    async def main() -> None:
        with pytest.raises(BatcherClosed, match="died"):
            await _collect(
                engine.stream_async(MergedModel(lively_base), [5, 6, 7], SamplingParams())
            )

    asyncio.run(main())
    engine._thread.join(timeout=10)
    assert not engine.alive and "engine killed" in engine.closed_reason()
    with pytest.raises(BatcherClosed, match="died"):
        engine.stream(MergedModel(lively_base), [5, 6, 7], SamplingParams())


# ---------------------------------------------------------------------------------------------
# Chunked prefill: a joining prompt is fed in chunks between decode steps


def _long_ids(base: FrozenBase, length: int) -> list[int]:
    ids = _ids(base, " ".join(PROMPTS * 40))
    assert len(ids) >= length
    return ids[:length]


def _long_merged(base: FrozenBase) -> MergedModel:
    """A perturbed carry-on that holds the base's whole context (the tests' default is 128)."""
    return MergedModel(base, _carry_on(base, perturbed=True, max_positions=256), _layout(base))


@pytest.mark.parametrize("chunk", [7, 16, 64])
def test_a_prompt_prefilled_in_chunks_gives_the_one_prefill_tokens_and_logprobs(lively_base, chunk):
    tuned = _long_merged(lively_base)
    ids = _long_ids(lively_base, 180)
    params = SamplingParams(max_new_tokens=12, logprobs=3)
    expected = tuned.generate(ids, params)  # one prefill forward of the whole prompt
    engine = DecodeBatcher(lively_base, max_batch_size=4, prefill_chunk_tokens=chunk)
    try:
        got = list(engine.stream(tuned, ids, params))
        # Chunks of `chunk` tokens, the last taking a rest of up to two chunks whole.
        assert engine.prefill_chunks == max(1, -(-(len(ids) - 2 * chunk) // chunk) + 1)
    finally:
        engine.close()
    assert got == expected
    for mine, theirs in zip(got, expected, strict=True):
        assert mine.logprob == pytest.approx(theirs.logprob, abs=1e-4)
        assert [token for token, _ in mine.top] == [token for token, _ in theirs.top]


def test_a_mixture_prompt_prefilled_in_chunks_gives_the_one_prefill_tokens(
    lively_base, other_tokenizer
):
    """Each chunk extends the second base's aligned states too: the same tokens as the
    unbatched, unchunked generation."""
    from tests.conftest import make_model, mixture_carryon

    other = FrozenBase.from_model(
        "other", make_model(len(other_tokenizer), seed=1, hidden_size=48), other_tokenizer
    )
    mixture = MergedModel(lively_base, *mixture_carryon(lively_base, other), others={"other": other})
    ids = _long_ids(lively_base, 120)
    params = SamplingParams(max_new_tokens=8)
    expected = mixture.generate(ids, params)
    assert expected != MergedModel(lively_base).generate(ids, params)  # the mixture matters
    engine = DecodeBatcher(lively_base, max_batch_size=2, prefill_chunk_tokens=25)
    try:
        assert list(engine.stream(mixture, ids, params)) == expected
        assert engine.prefill_chunks == 4  # 25 + 25 + 25 + the last 45 (up to two chunks) in one
    finally:
        engine.close()


def test_a_long_prompt_joins_between_decode_steps_of_the_running_rows(lively_base, monkeypatch):
    """Seven streams run while a long prompt joins (each chunk in a forward of its own): the
    engine alternates one chunk of the prompt with one decode step of the seven, so no stream waits for more than one chunk's
    forward (a structural bound; the wall-clock ratio is in benchmarks/chunked_prefill.py)."""
    calls: list[tuple[str, int]] = []  # ("chunk", prompt tokens) or ("step", rows)
    forward = lively_base.forward

    def recording(input_ids, layers, **kwargs):
        kind = "step" if kwargs.get("position_ids") is not None else "chunk"
        calls.append((kind, input_ids.shape[0] if kind == "step" else input_ids.shape[1]))
        return forward(input_ids, layers, **kwargs)

    monkeypatch.setattr(lively_base, "forward", recording)
    chunk = 16
    engine = DecodeBatcher(
        lively_base, max_batch_size=8, prefill_chunk_tokens=chunk, fuse_prefill=False
    )
    try:
        plain, tuned = MergedModel(lively_base), _long_merged(lively_base)
        running_params = SamplingParams(max_new_tokens=40)  # outlasts the long prefill
        prompts = [_ids(lively_base, PROMPTS[number % len(PROMPTS)]) for number in range(7)]
        streams = [engine.stream(plain, ids, running_params) for ids in prompts]
        firsts = [next(stream) for stream in streams]  # all seven run now
        deadline = time.monotonic() + 10  # (the last joins just after its first token)
        while engine.running < 7 and time.monotonic() < deadline:
            time.sleep(0.001)
        assert engine.running == 7
        long_ids = _long_ids(lively_base, 200)
        long_params = SamplingParams(max_new_tokens=6)
        release = threading.Event()
        engine.submit(release.wait)  # hold the engine while the long prompt arrives
        joined = len(calls)
        long_stream = engine.stream(tuned, long_ids, long_params)
        release.set()
        long_tokens = list(long_stream)
        outputs = [[first, *stream] for first, stream in zip(firsts, streams, strict=True)]
    finally:
        engine.close()

    after = calls[joined:]
    chunks = [index for index, (kind, _) in enumerate(after) if kind == "chunk"]
    # 200 tokens in chunks of 16, the last 24 (at most two chunks' worth) in one.
    assert [after[index][1] for index in chunks] == [chunk] * 11 + [200 - 11 * chunk]
    # From the first chunk to the last: chunk, step of all seven, chunk, step, ..., chunk.
    between = after[chunks[0] : chunks[-1] + 1]
    assert between == [
        ("chunk", chunk) if index % 2 == 0 else ("step", 7) for index in range(len(between) - 1)
    ] + [("chunk", 200 - 11 * chunk)]
    assert long_tokens == tuned.generate(long_ids, long_params)
    expected = [plain.generate(_ids(lively_base, text), running_params) for text in PROMPTS]
    assert outputs == [expected[number % len(PROMPTS)] for number in range(7)]


def test_while_rows_run_a_chunk_holds_what_fits_in_one_of_their_steps(lively_base, monkeypatch):
    """A prefill (in forwards of its own) that costs 2 ms a token beside a decode step of 20 ms:
    the long prompt comes in chunks of about ten tokens (never fewer than MIN_PREFILL_CHUNK),
    not the 256 allowed."""
    forward = lively_base.forward

    def slow(input_ids, layers, **kwargs):
        stepping = kwargs.get("position_ids") is not None
        time.sleep(0.02 if stepping else 0.002 * input_ids.shape[1])
        return forward(input_ids, layers, **kwargs)

    monkeypatch.setattr(lively_base, "forward", slow)
    engine = DecodeBatcher(
        lively_base, max_batch_size=8, prefill_chunk_tokens=256, fuse_prefill=False
    )
    try:
        plain = MergedModel(lively_base)
        running = engine.stream(
            plain, _ids(lively_base, PROMPTS[0]), SamplingParams(max_new_tokens=60)
        )
        next(running)
        chunks = engine.prefill_chunks
        long_ids = _long_ids(lively_base, 200)
        assert len(list(engine.stream(plain, long_ids, SamplingParams(max_new_tokens=1)))) == 1
        fed = engine.prefill_chunks - chunks
        running.close()
    finally:
        engine.close()
    assert 200 // 64 < fed <= 200 // MIN_PREFILL_CHUNK + 1
    assert engine.step_seconds >= 0.02 and engine.fitted_chunk < 64


def test_a_reader_gone_while_its_prompt_is_fed_stops_the_prefill(lively_base, monkeypatch):
    forward = lively_base.forward

    def slow(input_ids, layers, **kwargs):
        time.sleep(0.02)
        return forward(input_ids, layers, **kwargs)

    monkeypatch.setattr(lively_base, "forward", slow)
    engine = DecodeBatcher(lively_base, max_batch_size=2, prefill_chunk_tokens=8)
    try:
        plain = MergedModel(lively_base)

        async def main() -> None:
            stream = engine.stream_async(plain, _long_ids(lively_base, 200), SamplingParams())
            reader = asyncio.create_task(_collect(stream))
            while engine.prefill_chunks < 2:
                await asyncio.sleep(0.005)
            reader.cancel()
            with pytest.raises(asyncio.CancelledError):
                await reader

        asyncio.run(main())
        deadline = time.monotonic() + 10
        while engine.prefilling and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.prefilling == 0 and engine.abandoned == 1
        assert engine.prefill_chunks < 200 // 8  # it stopped before the whole prompt
        ids = _ids(lively_base, PROMPTS[0])  # and the engine goes on
        assert list(engine.stream(plain, ids, SamplingParams(max_new_tokens=3))) == plain.generate(
            ids, SamplingParams(max_new_tokens=3)
        )
    finally:
        engine.close()


def test_work_in_a_passing_thread_returns_its_result_or_raises_its_error_and_the_thread_ends():
    seen = []

    def work() -> int:
        seen.append(threading.current_thread())
        return 7

    assert in_passing_thread(work, "loader") == 7
    assert seen[0] is not threading.current_thread() and not seen[0].is_alive()

    def broken() -> None:
        raise ValueError("bad base path")

    with pytest.raises(ValueError, match="bad base path"):
        in_passing_thread(broken, "loader")


def test_joining_prompts_ride_in_the_decode_steps_and_give_what_each_alone_gives(
    lively_base, monkeypatch
):
    """Seven streams run while a long prompt (with a carry-on) and two short ones join: their
    chunks go into the seven's decode steps (no forward of their own), and every output is
    what that request alone gives."""
    separate: list[int] = []  # prompt tokens fed in forwards of their own after the join
    forward = lively_base.forward

    def recording(input_ids, layers, **kwargs):
        if kwargs.get("position_ids") is None:
            separate.append(input_ids.shape[1])
        return forward(input_ids, layers, **kwargs)

    engine = DecodeBatcher(lively_base, max_batch_size=10, prefill_chunk_tokens=16)
    try:
        plain, tuned = MergedModel(lively_base), _long_merged(lively_base)
        running_params = SamplingParams(max_new_tokens=40)
        prompts = [_ids(lively_base, PROMPTS[number % len(PROMPTS)]) for number in range(7)]
        streams = [engine.stream(plain, ids, running_params) for ids in prompts]
        firsts = [next(stream) for stream in streams]
        deadline = time.monotonic() + 10
        while engine.running < 7 and time.monotonic() < deadline:
            time.sleep(0.001)
        assert engine.running == 7 and engine.fused is not None
        monkeypatch.setattr(lively_base, "forward", recording)
        release = threading.Event()
        engine.submit(release.wait)  # hold the engine while the three prompts arrive
        chunks = engine.prefill_chunks
        joining = [
            (tuned, _long_ids(lively_base, 100), SamplingParams(max_new_tokens=6, logprobs=2)),
            (plain, _ids(lively_base, PROMPTS[1]), SamplingParams(max_new_tokens=8)),
            (tuned, _ids(lively_base, PROMPTS[2]), SamplingParams(max_new_tokens=8)),
        ]
        joined = [engine.stream(merged, ids, params) for merged, ids, params in joining]
        release.set()
        joined_out = [list(stream) for stream in joined]
        outputs = [[first, *stream] for first, stream in zip(firsts, streams, strict=True)]
        fed = engine.prefill_chunks - chunks
    finally:
        engine.close()
    assert separate == []  # every chunk rode in a decode step
    assert fed >= 100 // 16
    for (merged, ids, params), out in zip(joining, joined_out, strict=True):
        assert out == merged.generate(ids, params)
    expected = [plain.generate(_ids(lively_base, text), running_params) for text in PROMPTS]
    assert outputs == [expected[number % len(PROMPTS)] for number in range(7)]


def test_the_fused_forward_gives_the_bases_hidden_states_or_the_engine_keeps_separate_forwards(
    lively_base, monkeypatch
):
    assert FusedStep.shaped(lively_base) and FusedStep(lively_base).check()
    monkeypatch.setattr(FusedStep, "check", lambda self: False)  # a base it does not reproduce
    engine = DecodeBatcher(lively_base, max_batch_size=4)
    try:
        plain = MergedModel(lively_base)
        params = SamplingParams(max_new_tokens=10)
        first = engine.stream(plain, _ids(lively_base, PROMPTS[0]), params)
        tokens = [next(first)]
        second = list(engine.stream(plain, _ids(lively_base, PROMPTS[1]), params))
        tokens += list(first)
        assert engine.fused is None
    finally:
        engine.close()
    assert tokens == plain.generate(_ids(lively_base, PROMPTS[0]), params)
    assert second == plain.generate(_ids(lively_base, PROMPTS[1]), params)
