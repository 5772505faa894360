"""The merged model: frozen base + carry-on, y_i = head(x_i + α · g_i ⊙ Δ_i) (SPEC §1).

This is the serving path: the residual is the base's exact final hidden state, and every
carry-on input passes through σ̂ at its configured bits, as in training. Generation is
incremental: the base keeps its HF key/value cache and the carry-on its own.

Sources from a second base (a mixture of LLMs) are aligned causally to the primary's
positions (`alignment.py`). While generating, each sequence keeps per second base a
`SecondBaseStream` (its own KV cache, the text, the second tokenization's tail): each step
re-runs only the unstable tail, in time that does not grow with the length. The alignment rule
makes each position's state depend only on the text up to its own token, so this gives the
states the embed stage stored (`incremental_alignment.py`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from carryon_ray.alignment import aligned_states
from carryon_ray.bases import FrozenBase, OutputHead
from carryon_ray.carry_on import CarryOn, KVCache, merge_hidden
from carryon_ray.incremental_alignment import SecondBaseStream
from carryon_ray.records import Layout, serving_views


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    # None: tokens come as plain ids; k: each comes as a `ScoredToken` with its own
    # log-probability and the k most likely alternatives.
    logprobs: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:  # 0: nothing to generate (a prompt scored with echo)
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.logprobs}")


MAX_TOP_LOGPROBS = 20  # OpenAI's limit for chat's top_logprobs


class ScoredToken(int):
    """A token id that carries its log-probability under the merged model (after α, before
    temperature and top-p: the model's own distribution, not the sampler's) and the `top`
    most likely (id, log-probability) pairs, most likely first. It is an int, so code that
    reads only ids takes it as one."""

    logprob: float
    top: tuple[tuple[int, float], ...]

    def __new__(cls, token: int, logprob: float, top: tuple[tuple[int, float], ...] = ()):
        scored = super().__new__(cls, token)
        scored.logprob, scored.top = logprob, top
        return scored


def scored(log_probs: torch.Tensor, token: int, top: int) -> ScoredToken:
    """log_probs (V,) float: `token` with its log-probability and the `top` best alternatives."""
    best = torch.topk(log_probs, top) if top else None
    pairs = () if best is None else tuple(
        zip(best.indices.tolist(), best.values.tolist(), strict=True)
    )
    return ScoredToken(token, float(log_probs[token]), pairs)


@dataclass
class MixtureCache:
    """What one generating sequence of a mixture-of-LLMs carry-on keeps between steps: the
    carry-on's KV cache and, per second base, its stream (`SecondBaseStream`)."""

    carry: KVCache | None = None
    streams: dict[str, SecondBaseStream] = field(default_factory=dict)


class MergedModel:
    """A base with an optional carry-on. Without a carry-on it is exactly the base."""

    def __init__(
        self,
        base: FrozenBase,
        carry_on: CarryOn | None = None,
        layout: Layout | None = None,
        *,
        alpha: float = 1.0,
        head: OutputHead | None = None,
        others: dict[str, FrozenBase] | None = None,
    ) -> None:
        if (carry_on is None) != (layout is None):
            raise ValueError("a carry-on needs its layout, and a layout needs a carry-on")
        self.base = base
        self.others = dict(others or {})
        self.carry_on = None if carry_on is None else carry_on.eval().to(base.device)
        self.layout = layout
        self.alpha = alpha
        self.head = head if head is not None else base.output_head()
        self.layers = self._layers()

    def _layers(self) -> dict[str, int]:
        """Layout key -> normalised layer index, for the layers of the primary; the layers of
        second bases go to `self.other_layers` ({base name: {key: index}})."""
        self.other_layers: dict[str, dict[str, int]] = {}
        if self.layout is None:
            return {f"{self.base.name}.{self.base.num_layers}": self.base.num_layers}
        for key, ref in self.layout.layers.items():
            if ref.base != self.base.name:
                self.other_layers.setdefault(ref.base, {})[key] = ref.layer
        missing = sorted(self.other_layers.keys() - self.others.keys())
        if missing:
            raise ValueError(
                f"the carry-on reads base(s) {missing}, which are not loaded; pass them as "
                f"`others` (loaded: {sorted(self.others)})"
            )
        return {
            key: ref.layer for key, ref in self.layout.layers.items() if ref.base == self.base.name
        }

    def _other_states(
        self, rows: list[list[int]], length: int, *, start: int = 0
    ) -> dict[str, torch.Tensor]:
        """Second bases' aligned states for positions start..length-1 of each row of primary
        ids: {key: (B, length - start, D_k)}, zero-padded past a row's end."""
        out: dict[str, torch.Tensor] = {}
        for name, layers in self.other_layers.items():
            states = aligned_states(self.base, self.others[name], list(layers.values()), rows)
            for key, index in layers.items():
                per_row = states[index]  # [(T_r, D)]
                padded = per_row[0].new_zeros(len(rows), length - start, per_row[0].shape[-1])
                for number, row in enumerate(per_row):
                    piece = row[start:length]
                    padded[number, : piece.shape[0]] = piece
                out[key] = padded.to(self.base.device)
        return out

    @property
    def context_length(self) -> int:
        limit = self.base.max_positions
        if self.carry_on is not None:
            limit = min(limit, self.carry_on.config.max_positions)
        return limit

    def _residual_key(self) -> str:
        return self.layout.residual.key if self.layout else next(iter(self.layers))

    def _merge(
        self,
        states: dict[int, torch.Tensor],
        *,
        alpha: float,
        start: int = 0,
        cache: KVCache | None = None,
        others: dict[str, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, KVCache | None]:
        """states: the primary's {layer index: (B, T, D)}; others: second bases' aligned
        states {layout key: (B, T, D_k)} (needed only when the carry-on reads them)."""
        exact = {key: states[index] for key, index in self.layers.items()}
        exact.update(others or {})
        if self.carry_on is None or alpha == 0:
            return exact[self._residual_key()], cache
        residual, sources = serving_views(self.layout, exact)
        delta, gate, cache = self.carry_on(sources, start=start, cache=cache)
        return merge_hidden(residual, delta, gate, alpha), cache

    @torch.no_grad()
    def hidden(self, input_ids: torch.Tensor, *, alpha: float | None = None) -> torch.Tensor:
        """input_ids (B, T) -> merged hidden z (B, T, D) before the head."""
        alpha = self.alpha if alpha is None else alpha
        self.check_length(input_ids.shape[1])
        states, _ = self.base.forward(input_ids, list(self.layers.values()))
        others = None
        if self.other_layers and self.carry_on is not None and alpha != 0:
            others = self._other_states(input_ids.tolist(), input_ids.shape[1])
        merged, _ = self._merge(states, alpha=alpha, others=others)
        return merged

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, *, alpha: float | None = None) -> torch.Tensor:
        """input_ids (B, T) int64 -> logits (B, T, V); α = 0 gives the base's logits exactly."""
        return self.head(self.hidden(input_ids, alpha=alpha))

    def check_length(self, length: int) -> None:
        if length > self.context_length:
            raise ValueError(
                f"the prompt has {length} tokens but the context holds {self.context_length}; "
                "shorten the prompt"
            )
        if length == 0:
            raise ValueError("the prompt is empty; send at least one token")

    @torch.no_grad()
    def stream(
        self, prompt_ids: list[int], params: SamplingParams, *, alpha: float | None = None
    ) -> Iterator[int]:
        """Yield generated token ids one by one (incremental: each step feeds one token)."""
        alpha = self.alpha if alpha is None else alpha
        self.check_length(len(prompt_ids))
        budget = min(params.max_new_tokens, self.context_length - len(prompt_ids))
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device="cpu").manual_seed(params.seed)
        base_cache = self.base.new_cache()
        carry_cache: KVCache | None = None
        step_ids = torch.tensor([prompt_ids], dtype=torch.long, device=self.base.device)
        so_far = list(prompt_ids)
        position = 0
        for _ in range(budget):
            states, base_cache = self.base.forward(
                step_ids, list(self.layers.values()), past_key_values=base_cache
            )
            merged, carry_cache = self.step_hidden(
                states, so_far, alpha=alpha, position=position, cache=carry_cache
            )
            position += step_ids.shape[1]
            token = next_token(self.head(merged).float()[0], params, generator)
            yield token
            if token in params.stop_token_ids:
                return
            step_ids = torch.tensor([[token]], dtype=torch.long, device=self.base.device)
            so_far.append(token)

    def step_hidden(
        self,
        states: dict[int, torch.Tensor],
        so_far: list[int],
        *,
        alpha: float,
        position: int,
        cache: KVCache | MixtureCache | None,
    ) -> tuple[torch.Tensor, KVCache | MixtureCache | None]:
        """One generation step of one sequence, after the base's pass over its newest tokens.

        states: the primary's {layer index: (1, t, D)} for the t newest tokens, which start at
        `position`; so_far: the token ids so far, the t newest from `position` on (a second
        base reads them). Returns the merged hidden state of the last position (1, D) and the
        cache to pass next step: the carry-on's, or for a mixture a `MixtureCache` holding it.
        """
        if self.carry_on is None:
            states = {index: state[:, -1:] for index, state in states.items()}
        if self.other_layers and self.carry_on is not None and alpha != 0:
            width = next(iter(states.values())).shape[1]
            if not isinstance(cache, MixtureCache):
                cache = MixtureCache(cache, self._new_streams(so_far[:position]))
            others = self._stream_states(cache.streams, so_far[position : position + width])
            merged, cache.carry = self._merge(
                states, alpha=alpha, start=position, cache=cache.carry, others=others
            )
            return merged[:, -1], cache
        merged, cache = self._merge(states, alpha=alpha, start=position, cache=cache)
        return merged[:, -1], cache

    def _new_streams(self, seen: list[int]) -> dict[str, SecondBaseStream]:
        """One `SecondBaseStream` per second base, having read the ids `seen` so far."""
        streams = {}
        for name, layers in self.other_layers.items():
            other = self.others[name]
            indices = sorted({other.layer_index(layer) for layer in layers.values()})
            streams[name] = SecondBaseStream(self.base, other, indices)
            if seen:
                streams[name].extend(seen)
        return streams

    def _stream_states(
        self, streams: dict[str, SecondBaseStream], new_ids: list[int]
    ) -> dict[str, torch.Tensor]:
        """Second bases' aligned states for the new ids: {key: (1, len(new_ids), D_k)}."""
        out: dict[str, torch.Tensor] = {}
        for name, layers in self.other_layers.items():
            states = streams[name].extend(new_ids)
            other = self.others[name]
            for key, layer in layers.items():
                out[key] = states[other.layer_index(layer)].unsqueeze(0).to(self.base.device)
        return out

    def generate(
        self, prompt_ids: list[int], params: SamplingParams, *, alpha: float | None = None
    ) -> list[int]:
        return list(self.stream(prompt_ids, params, alpha=alpha))


def next_token(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None
) -> int:
    """logits (V,) float -> the sampled id; a `ScoredToken` when `params.logprobs` asks."""
    token = choose_token(logits, params, generator)
    if params.logprobs is None:
        return token
    return scored(torch.log_softmax(logits, dim=-1), token, params.logprobs)


def choose_token(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None
) -> int:
    if params.temperature == 0:
        return int(torch.argmax(logits))
    if generator is not None:  # a seeded draw: the generator lives on the CPU
        logits = logits.to(generator.device)
    probs = torch.softmax(logits / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < params.top_p
        sorted_probs = torch.where(keep, sorted_probs, torch.zeros_like(sorted_probs))
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.no_grad()
def prompt_logprobs(
    merged: MergedModel,
    prompt_ids: list[int],
    *,
    top: int,
    alpha: float | None = None,
    chunk: int = 512,
) -> list[ScoredToken]:
    """Each prompt token after the first, scored by the merged model given the tokens before
    it (one prefill forward, the serving path); the head runs `chunk` positions at a time, so
    a long prompt never holds (T, V) logits at once. Returns T - 1 `ScoredToken`s."""
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=merged.base.device)
    hidden = merged.hidden(ids, alpha=alpha)[0, :-1]  # (T - 1, D): position t predicts t + 1
    out: list[ScoredToken] = []
    for start in range(0, hidden.shape[0], chunk):
        log_probs = torch.log_softmax(merged.head(hidden[start : start + chunk]).float(), dim=-1)
        for row, token in enumerate(prompt_ids[start + 1 : start + 1 + chunk]):
            out.append(scored(log_probs[row], token, top))
    return out


@torch.no_grad()
def serving_nll(
    merged: MergedModel,
    examples: list[tuple[list[int], list[int]]],
    *,
    batch_size: int = 8,
    alpha: float | None = None,
) -> dict[str, float]:
    """Held-out NLL through the serving path (exact x), base and merged on the same tokens.

    examples: (input_ids, target_mask) pairs. One base forward per batch serves both scores.
    """
    from carryon_ray.training import chunked_nll

    alpha = merged.alpha if alpha is None else alpha
    ordered = sorted(examples, key=lambda pair: len(pair[0]))
    base_total = merged_total = 0.0
    tokens = 0
    for start in range(0, len(ordered), batch_size):
        group = ordered[start : start + batch_size]
        longest = max(len(ids) for ids, _ in group)
        merged.check_length(longest)
        device = merged.base.device
        ids = torch.zeros(len(group), longest, dtype=torch.long, device=device)
        attention = torch.zeros_like(ids)
        targets = torch.zeros_like(ids, dtype=torch.bool)
        for row, (row_ids, row_mask) in enumerate(group):
            ids[row, : len(row_ids)] = torch.tensor(row_ids, dtype=torch.long, device=device)
            attention[row, : len(row_ids)] = 1
            targets[row, : len(row_ids)] = torch.tensor(row_mask, dtype=torch.bool, device=device)
        states, _ = merged.base.forward(ids, list(merged.layers.values()), attention_mask=attention)
        predicting = torch.zeros_like(targets)
        predicting[:, :-1] = targets[:, 1:]
        goal = ids[:, 1:][targets[:, 1:]]
        others = None
        if merged.other_layers and merged.carry_on is not None and alpha != 0:
            others = merged._other_states([list(row_ids) for row_ids, _ in group], longest)
        base_hidden, _ = merged._merge(states, alpha=0.0)
        merged_hidden, _ = merged._merge(states, alpha=alpha, others=others)
        base_total += float(chunked_nll(merged.head, base_hidden[predicting], goal))
        merged_total += float(chunked_nll(merged.head, merged_hidden[predicting], goal))
        tokens += int(goal.numel())
    if tokens == 0:
        raise ValueError("no target tokens to evaluate; check data.eval_size")
    return {"nll_base": base_total / tokens, "nll_merged": merged_total / tokens, "tokens": tokens}
