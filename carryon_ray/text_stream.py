"""Generated tokens as text pieces for OpenAI's answers, without any server or Ray.

`TextStream` turns a generation (the merged model's own, or a `DecodeBatcher` row) into text
deltas cut at EOS, a stop string or the token budget, detokenized incrementally
(`detokenize.Detokenizer`), and keeps each handed-out token's log-probability when the
request asked for them. `Echo` is a prompt put before a completion, its tokens scored.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import closing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from carryon_ray.detokenize import Detokenizer, offsets
from carryon_ray.merged import MergedModel, SamplingParams, ScoredToken

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from carryon_ray.batching import DecodeBatcher


@dataclass(frozen=True)
class TokenLogprob:
    """One token of an answer's logprobs: `offset` is where its text starts in the answer
    (the echoed prompt included); `logprob` and `top` are None for the prompt's first token."""

    token: int
    logprob: float | None
    top: tuple[tuple[int, float], ...] | None
    offset: int


@dataclass(frozen=True)
class Echo:
    """The prompt put before a completion (`echo`), with its scored tokens when asked."""

    text: str
    logprobs: list[TokenLogprob] = field(default_factory=list)


def echo_of(
    tokenizer: PreTrainedTokenizerBase,
    prompt: str | list[int],
    prompt_ids: list[int],
    scores: list[ScoredToken] | None,
) -> Echo:
    """The echo of a prompt given as text (that text) or as ids (their decoding); `scores`
    (`merged.prompt_logprobs`) for every prompt token after the first, or None."""
    decoded, starts = offsets(tokenizer, prompt_ids)
    text = prompt if isinstance(prompt, str) else decoded
    if scores is None:
        return Echo(text)
    first = TokenLogprob(prompt_ids[0], None, None, 0)
    rest = [
        TokenLogprob(int(token), token.logprob, token.top, start)
        for token, start in zip(scores, starts[1:], strict=True)
    ]
    return Echo(text, [first, *rest])


class TextStream:
    """Generated text in pieces, cut at EOS, a stop string or the token budget.

    Iterating yields text deltas; afterwards `finish_reason` ("stop" or "length") and
    `completion_tokens` (EOS included) are set. Text that could still turn into a stop string,
    or ends inside a multi-byte character, is held back until it cannot, so the pieces joined
    equal the non-streamed answer. Detokenization is incremental (`detokenize.Detokenizer`).

    When `params.logprobs` asks for them, `logprobs` lists each token whose text has been
    handed out and a closing EOS, as vLLM does (a token cut off by a stop string is not
    listed); `drain()` returns those added since its last call, for the piece just yielded. `echo` is put before the answer by the
    response bodies, not by the stream.

    On an event loop, `start()` joins the batcher (its refusals raise there, before any answer
    starts) and `async for` awaits the pieces: the request holds no thread while it generates.
    """

    def __init__(
        self,
        merged: MergedModel,
        prompt_ids: list[int],
        params: SamplingParams,
        *,
        alpha: float | None,
        stops: list[str],
        tokenizer: PreTrainedTokenizerBase,
        batcher: DecodeBatcher | None = None,
        echo: Echo | None = None,
    ) -> None:
        self.merged, self.prompt_ids, self.params = merged, prompt_ids, params
        self.alpha, self.stops, self.tokenizer = alpha, stops, tokenizer
        self.batcher, self.echo = batcher, echo
        self.finish_reason: str | None = None
        self.completion_tokens = 0
        self.live = False  # started on an event loop: iterate with `async for`
        self._tokens: AsyncIterator[int] | None = None
        self._begin()

    def __iter__(self) -> Iterator[str]:
        self._begin()
        source = self.batcher.stream if self.batcher is not None else _alone
        with closing(source(self.merged, self.prompt_ids, self.params, alpha=self.alpha)) as tokens:
            for token in tokens:
                piece, done = self._take(token)
                if piece:
                    yield piece
                if done:
                    return
        if rest := self._rest():
            yield rest

    def start(self) -> None:
        """Queue the generation on the batcher, from the running event loop. Its refusals
        (`QueueFull`, `BatcherClosed`, `ValueError`) raise here."""
        if self.batcher is None:
            raise RuntimeError("iterating a TextStream on an event loop needs a DecodeBatcher")
        self._tokens = self.batcher.stream_async(
            self.merged, self.prompt_ids, self.params, alpha=self.alpha
        )
        self.live = True

    async def __aiter__(self) -> AsyncIterator[str]:
        if self._tokens is None:
            self.start()
        tokens, self._tokens = self._tokens, None
        self._begin()
        try:
            async for token in tokens:
                piece, done = self._take(token)
                if piece:
                    yield piece
                if done:
                    return
        finally:  # a cancelled or closed reader takes the row out of the batch
            await tokens.aclose()
        if rest := self._rest():
            yield rest

    async def text(self) -> str:
        """The whole answer, awaited."""
        return "".join([piece async for piece in self])

    def drain(self) -> list[TokenLogprob]:
        """Logprobs of the tokens handed out since the last call."""
        fresh, self._drained = self.logprobs[self._drained :], len(self.logprobs)
        return fresh

    def _begin(self) -> None:
        self.finish_reason, self.completion_tokens = "length", 0
        self._text = Detokenizer(self.tokenizer)
        self._sent = 0  # characters of the text handed out
        self._searched = 0  # characters of the text searched for stop strings
        self._scored: list[TokenLogprob] = []  # generated, not yet handed out
        self.logprobs: list[TokenLogprob] = []
        self._drained = 0

    def _take(self, token: int) -> tuple[str, bool]:
        """One generated token: (text that can be handed out now, whether the answer ended).
        Text that could still become a stop string, or ends inside a multi-byte character,
        is held back."""
        self.completion_tokens += 1
        if isinstance(token, ScoredToken):  # an EOS too (as vLLM lists it), though not in the text
            shift = len(self.echo.text) if self.echo is not None else 0
            start = shift + len(self._text.text)
            self._scored.append(TokenLogprob(int(token), token.logprob, token.top, start))
        if token in self.params.stop_token_ids:
            self.finish_reason = "stop"
            return self._rest(), True
        self._text.add(token)
        text = self._text.text
        # Only a stop string that ends in the new text can be new; the search is linear.
        longest = max((len(stop) for stop in self.stops), default=1)
        window = max(0, self._searched - longest + 1)
        cuts = [at for stop in self.stops if (at := text.find(stop, window)) >= 0]
        self._searched = len(text)
        if cuts:
            self.finish_reason = "stop"
            cut = max(min(cuts), self._sent)
            self._release(cut)
            piece, self._sent = text[self._sent : cut], cut
            return piece, True
        safe = min(len(text) - (longest - 1), self._text.stable)
        if safe <= self._sent:
            return "", False
        piece, self._sent = text[self._sent : safe], safe
        self._release(safe)
        return piece, False

    def _release(self, limit: int) -> None:
        """Move scored tokens whose text starts before `limit` (what is handed out, or a stop
        string's cut) to `logprobs`."""
        shift = len(self.echo.text) if self.echo is not None else 0
        keep = 0
        while keep < len(self._scored) and self._scored[keep].offset - shift < limit:
            keep += 1
        self.logprobs += self._scored[:keep]
        self._scored = self._scored[keep:]

    def _rest(self) -> str:
        """What is left to hand out once the answer ends without a stop string."""
        text = self._text.final()
        piece, self._sent = text[self._sent :], max(self._sent, len(text))
        self.logprobs += self._scored
        self._scored = []
        return piece

    def usage(self) -> dict:
        prompt = len(self.prompt_ids)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": self.completion_tokens,
            "total_tokens": prompt + self.completion_tokens,
        }


def _alone(
    merged: MergedModel, prompt_ids: list[int], params: SamplingParams, *, alpha: float | None
) -> Iterator[int]:
    """Tokens of one generation on its own (no batcher)."""
    return merged.stream(prompt_ids, params, alpha=alpha)
