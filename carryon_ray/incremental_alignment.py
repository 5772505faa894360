"""The causal alignment of a second base (`alignment.py`), kept up incrementally while serving.

`aligned_states` recomputes a position's state from scratch: for primary position i it
tokenizes `text[:e_i]` with the second tokenizer, drops the final token, and reads the state of
the last remaining one, K_i[-1] with `K_i = tok(text[:e_i])[:-1]`. Done at every generated
token, that re-decodes every prefix, re-tokenizes the whole text and re-runs the second base
over all of it: quadratic in the length. `SecondBaseStream` computes the same states in
linear time:

- the primary's text grows by decoding only a window of the newest ids (`PrimaryText`);
- the second tokenizer re-tokenizes only a window at the end of the text (`TailTokenizer`),
  checked to agree with the old tokens where the window starts (else the whole text, counted);
- the second base keeps its own KV cache over a prefix of K; each step it runs only the ids
  after the first one that differs from what the cache holds (the unstable tail, plus
  `HOLD_BACK` ids it keeps out of the cache because the next text may change them).

A causal base gives the state of K_i[-1] from any pass over ids that start with K_i, so the
states equal the full recomputation up to float rounding (tests/test_incremental_alignment.py).
"""

from __future__ import annotations

import logging

import torch

from carryon_ray.alignment import REPLACEMENT

logger = logging.getLogger(__name__)

WINDOW = 8  # second-base tokens re-tokenized at the end of the text
SYNC = 2  # of which the first ones must come out as before (else: the whole text)
HOLD_BACK = 2  # newest ids of K kept out of the second base's cache (re-run next step)


class PrimaryText:
    """The primary's text and the end e_i of its newest position, as `primary_text` gives them
    (`decode(ids[:i + 1])` less a trailing U+FFFD), one id at a time.

    Only a window is decoded: the ids since the text last ended cleanly, after one id of
    context (a decoder may spell a token differently at the very start, e.g. without its
    leading space); the text those add is the window's decode less the context's. While a
    character is incomplete the window grows; the text up to it still counts, as it does for
    `primary_text`. Where the window's decode does not start with the context's, every id is
    decoded (counted in `full_decodes`).
    """

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.stable = ""  # the text of ids[:read], which ended cleanly
        self.context = 0  # ids[context:read] are decoded again for context
        self.read = 0
        self.context_text = ""
        self.text = ""
        self.end = 0
        self.full_decodes = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(
            ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
        )

    def add(self, token: int) -> int:
        """Take one id; returns e_i, the end of the text its position may read."""
        self.ids.append(int(token))
        window = self._decode(self.ids[self.context :])
        if window.startswith(self.context_text):
            added = window[len(self.context_text) :]
        else:  # a decoder that spells the context differently with more after it
            self.full_decodes += 1
            whole = self._decode(self.ids)
            self.stable, self.context, self.read, self.context_text = "", 0, 0, ""
            added = whole
        self.text = self.stable + added.rstrip(REPLACEMENT)
        if not added.endswith(REPLACEMENT):  # a clean end: the window moves on
            self.stable += added
            self.context, self.read = len(self.ids) - 1, len(self.ids)
            self.context_text = self._decode(self.ids[self.context :])
        self.end = max(len(self.text), self.end)
        return self.end


class TailTokenizer:
    """`ids == tokenizer(text)["input_ids"]` kept up as text grows, re-tokenizing a window.

    The window starts at a token boundary `WINDOW` tokens back; its first `SYNC` tokens must be
    the old ones at the same offsets, or the whole text is re-tokenized (counted in
    `full_passes`, as is a text that does not extend the previous one).
    """

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        probe = "a"
        with_special = tokenizer(probe)["input_ids"]
        plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
        self.lead = next(
            (k for k in range(len(with_special)) if with_special[k : k + len(plain)] == plain), 0
        )
        self.trail = len(with_special) - self.lead - len(plain)
        # Added tokens are matched in the text before the model splits it: one whose spelling
        # began before the window and ends inside it would change the tokens before the window,
        # so the window reaches back at least the longest one's length.
        added = [*tokenizer.get_added_vocab(), *getattr(tokenizer, "all_special_tokens", [])]
        self.reach = max((len(token) for token in added), default=0)
        self.text = ""
        self.ids: list[int] = []  # with special tokens
        self.starts: list[int] = []  # character start of each body token
        self.ends: list[int] = []
        self.full_passes = 0
        self._full("")

    def _encode(self, text: str, *, special: bool) -> tuple[list[int], list[tuple[int, int]]]:
        encoded = self.tokenizer(text, return_offsets_mapping=True, add_special_tokens=special)
        return list(encoded["input_ids"]), [tuple(pair) for pair in encoded["offset_mapping"]]

    def _full(self, text: str) -> int:
        old = self.ids
        ids, offsets = self._encode(text, special=True)
        body = offsets[self.lead : len(offsets) - self.trail]
        self.text, self.ids = text, ids
        self.starts = [start for start, _ in body]
        self.ends = [end for _, end in body]
        return _first_difference(old, ids)

    def update(self, text: str) -> int:
        """Tokenize `text`; returns the first index of `ids` that changed."""
        if text == self.text:
            return len(self.ids)
        body = len(self.starts)
        if not text.startswith(self.text):
            self.full_passes += 1
            return self._full(text)
        anchor = self._anchor()
        if anchor is None:  # a text of a few tokens yet: the window would be all of it
            return self._full(text)
        start = self.starts[anchor]
        window, offsets = self._encode(text[start:], special=False)
        index = self.lead + anchor
        old = self.ids[index : index + SYNC]
        old_offsets = list(
            zip(self.starts[anchor : anchor + SYNC], self.ends[anchor : anchor + SYNC])
        )
        new_offsets = [(a + start, b + start) for a, b in offsets[:SYNC]]
        if window[:SYNC] != old or new_offsets != old_offsets or len(old) < SYNC:
            self.full_passes += 1
            return self._full(text)
        tail = self.ids[self.lead + body :]  # trailing special tokens
        changed = index + _first_difference(self.ids[index : self.lead + body], window)
        self.ids[index:] = window + tail
        self.starts[anchor:] = [a + start for a, _ in offsets]
        self.ends[anchor:] = [b + start for _, b in offsets]
        self.text = text
        return changed

    def _anchor(self) -> int | None:
        """A body token at least WINDOW back (and `reach` characters) whose start is a clean
        boundary (not inside the previous token's character, as bytes of one character split
        over tokens are)."""
        latest = len(self.text) - self.reach
        for anchor in range(len(self.starts) - WINDOW, 0, -1):
            start = self.starts[anchor]
            if 0 < start <= latest and start >= self.ends[anchor - 1]:
                return anchor
        return None


def _first_difference(a: list[int], b: list[int]) -> int:
    for index, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return index
    return min(len(a), len(b))


class SecondBaseStream:
    """One generating sequence's view of one second base: `extend(new primary ids)` returns the
    aligned states of the new positions, {layer index: (t, D_other) float32 on the CPU}, as
    `aligned_states` gives them for the whole sequence.

    `primary` and `other` are `FrozenBase`s; `layers` normalised indices of `other`. Counters:
    `rebuilds` (the cache was rebuilt because ids it held changed and could not be cropped)
    and `tokens_run` (ids fed to the second base).
    """

    def __init__(self, primary, other, layers: list[int]) -> None:
        self.other, self.layers = other, sorted(layers)
        # A base with the primary's tokenizer reads the same ids (as `aligned_states` does).
        self.same_tokenizer = other.tokenizer_hash == primary.tokenizer_hash
        self.text = PrimaryText(primary.tokenizer)
        self.tokens = None if self.same_tokenizer else TailTokenizer(other.tokenizer)
        self.cache = self._new_cache()
        self.sequence: list[int] = []  # S: the ids whose states `states` holds
        self.cached = 0  # S[:cached] is in the cache
        self.floor = 0  # ids before it may be gone from a sliding-window layer
        self.states: dict[int, torch.Tensor] = {}  # {layer: (capacity, D)}, row k: S[k]'s state
        self.rebuilds = 0
        self.tokens_run = 0

    def _new_cache(self):
        cache = self.other.new_cache()
        cache.activate_past_recording()  # a sliding-window layer keeps the latest pass to crop
        return cache

    def extend(self, new_ids: list[int]) -> dict[int, torch.Tensor]:
        if not new_ids:
            return {layer: torch.zeros(0, self.other.hidden_size) for layer in self.layers}
        if self.same_tokenizer:
            self.sequence.extend(int(token) for token in new_ids)
            start = self.cached
            self._run()
            self._crop(0)
            self.floor = self.cached
            return {layer: self.states[layer][start : self.cached].clone() for layer in self.layers}
        results: list[dict[int, torch.Tensor] | None] = []
        pending: list[tuple[int, int]] = []  # (new position, index of S) awaiting a pass
        for token in new_ids:
            self.text.add(token)
            before = len(self.tokens.ids) - 1
            changed = self.tokens.update(self.text.text[: self.text.end])
            ids = self.tokens.ids
            kept = len(ids) - 1  # K_i = ids[:kept]: the final token may still change
            conflict = self._conflict(kept, min(changed, max(before, 0)))
            if conflict is not None:
                self._run()
                for number, index in pending:
                    results[number] = self._state(index)
                pending = []
                self._truncate(conflict)
            if kept > len(self.sequence):
                self.sequence.extend(ids[len(self.sequence) : kept])
            results.append(None)
            pending.append((len(results) - 1, kept - 1))
        self._run()
        for number, index in pending:
            results[number] = self._state(index)
        self._commit()
        return {layer: torch.stack([result[layer] for result in results]) for layer in self.layers}

    def _conflict(self, kept: int, start: int) -> int | None:
        """The first index where K = ids[:kept] differs from S, or None where one starts the
        other. K before `start` is the previous K, which S starts with."""
        ids = self.tokens.ids
        for index in range(start, min(kept, len(self.sequence))):
            if ids[index] != self.sequence[index]:
                return index
        return None

    def _state(self, index: int) -> dict[int, torch.Tensor]:
        if index < 0:  # nothing of the second base's survives: a zero vector
            return {layer: torch.zeros(self.other.hidden_size) for layer in self.layers}
        # A copy: the row is overwritten if S changes there later.
        return {layer: self.states[layer][index].clone() for layer in self.layers}

    def _run(self) -> None:
        """Feed S[cached:] to the second base; its states go to rows cached.. of `states`."""
        new = self.sequence[self.cached :]
        if not new:
            return
        ids = torch.tensor([new], dtype=torch.long, device=self.other.device)
        out, self.cache = self.other.forward(ids, self.layers, past_key_values=self.cache)
        self.tokens_run += len(new)
        for layer in self.layers:
            self._store(layer, self.cached, out[layer][0].float().cpu())
        self.cached = len(self.sequence)

    def _store(self, layer: int, start: int, values: torch.Tensor) -> None:
        buffer = self.states.get(layer)
        need = start + values.shape[0]
        if buffer is None or buffer.shape[0] < need:  # grow by doubling: linear overall
            size = max(need, 64, 0 if buffer is None else 2 * buffer.shape[0])
            grown = values.new_zeros(size, values.shape[-1])
            if buffer is not None:
                grown[: buffer.shape[0]] = buffer
            self.states[layer] = buffer = grown
        buffer[start:need] = values

    def _truncate(self, length: int) -> None:
        """Make S (and the cache) its first `length` ids."""
        del self.sequence[length:]
        if length >= self.cached:
            return
        if length >= self.floor or not self._sliding_past_window():
            self._crop(self.cached - length)
            self.cached = self.floor = length
            return
        # A sliding-window layer no longer holds what it would need: rebuild the cache.
        self.rebuilds += 1
        self.cache, self.cached = self._new_cache(), 0
        self._run()  # recomputes states equal to those it had
        self._crop(0)
        self.floor = self.cached

    def _sliding_past_window(self) -> bool:
        for layer in getattr(self.cache, "layers", []):
            window = getattr(layer, "sliding_window", None)
            if window is not None and layer.get_seq_length() >= window - 1:
                return True
        return False

    def _commit(self) -> None:
        """Keep the newest HOLD_BACK ids of S out of the cache: the next text may change them,
        and re-running them is cheaper than a rebuild."""
        remove = max(self.cached - max(len(self.sequence) - HOLD_BACK, self.floor), 0)
        self._crop(remove)
        self.cached -= remove
        self.floor = self.cached

    def _crop(self, remove: int) -> None:
        """Drop the newest `remove` ids from the cache; 0 still lets a sliding-window layer
        give up what it kept of the latest pass (an empty cache has nothing to crop)."""
        if all(getattr(layer, "is_initialized", True) for layer in self.cache.layers):
            self.cache.crop(-remove)
