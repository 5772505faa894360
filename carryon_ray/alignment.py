"""Causal alignment of a second base's tokens to the primary's positions (SPEC §1).

The text is what the primary's tokens spell: `text = decode(s_1 … s_n)`, and primary position
i ends at character `e_i = len(decode(s_1 … s_i))` (an incomplete multi-byte character at the
tail, decoded as U+FFFD, does not count). Both depend only on `s_1 … s_i`, so the server,
which knows only the tokens so far, finds the same `e_i` as the embed stage did.

For position i, let `P = text[:e_i]` and `t_1 … t_m` the second tokenizer's tokens of P alone.
Every `t_k` ends at or before `e_i`. The final token `t_m` may still change as text grows
("4" becomes "48"), so whether it survives in the whole text's tokenization depends on text
after `e_i`; choosing by that would leak the future. The rule therefore drops it, always, and
uses the state of `t_{m-1}`, the last token that the tokenizer produces for `P` alone and that
later text can no longer change in practice (a zero vector if there is none). The state is a
function of `P` alone, so no position sees text after `e_i`, and the server, recomputing the
second base over the text so far, gets exactly the stored state.

Reading it off one pass over the whole text is exact when `t_1 … t_{m-1}` are also the first
tokens of the whole text's tokenization (a causal base then computes the same state); that is
the common case. Where they are not, `t_1 … t_{m-1}` get a pass of their own (a fallback,
counted in `Alignment.fallback`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

REPLACEMENT = "\ufffd"
NO_TOKEN = -1


@dataclass
class Alignment:
    """One sequence: the text, the second base's ids for it, and an index per primary position.

    `index[i]` is the token of `other_ids` whose state position i reads, or -1: a zero vector,
    or, for a position in `fallback`, the last state of a pass over `fallback[i]` alone.
    """

    text: str
    other_ids: list[int]
    index: list[int]
    fallback: dict[int, list[int]]


def primary_text(tokenizer, ids: list[int]) -> tuple[str, list[int]]:
    """(text, end character e_i per position) for primary token ids; special tokens spell ""."""
    prefixes = tokenizer.batch_decode(
        [ids[: i + 1] for i in range(len(ids))],
        skip_special_tokens=True,
        clean_up_tokenization_spaces=False,
    )
    text = prefixes[-1].rstrip(REPLACEMENT) if prefixes else ""
    ends = []
    for prefix in prefixes:
        prefix = prefix.rstrip(REPLACEMENT)
        if not text.startswith(prefix):  # a decoder that rewrites earlier text: keep what agrees
            prefix = _common_prefix(prefix, text)
        ends.append(max(len(prefix), ends[-1] if ends else 0))
    return text, ends


def _common_prefix(a: str, b: str) -> str:
    length = 0
    for x, y in zip(a, b):
        if x != y:
            break
        length += 1
    return a[:length]


def _encode(tokenizer, texts: list[str]) -> list[tuple[list[int], list[int]]]:
    """(ids, end offset per token) for each text; special tokens end at their start."""
    encoded = tokenizer(texts, return_offsets_mapping=True)
    return [
        (list(ids), [end for _, end in offsets])
        for ids, offsets in zip(encoded["input_ids"], encoded["offset_mapping"], strict=True)
    ]


def align(text: str, ends: list[int], other_tokenizer) -> Alignment:
    """The causal alignment of `other_tokenizer`'s tokens of `text` to positions ending at `ends`."""
    (other_ids, _), *_ = _encode(other_tokenizer, [text])
    distinct = sorted(set(ends))
    prefixes = _encode(other_tokenizer, [text[:end] for end in distinct])
    chosen: dict[int, tuple[int, list[int] | None]] = {}
    for end, (prefix_ids, _) in zip(distinct, prefixes, strict=True):
        kept = prefix_ids[:-1]  # the final token of text[:end] may still change as text grows
        if other_ids[: len(kept)] == kept:
            chosen[end] = (len(kept) - 1, None)  # read off the pass over the whole text
        else:
            chosen[end] = (NO_TOKEN, kept)  # a pass of its own
    index = [chosen[end][0] for end in ends]
    fallback = {i: chosen[end][1] for i, end in enumerate(ends) if chosen[end][1] is not None}
    return Alignment(text, other_ids, index, fallback)


def align_ids(primary_tokenizer, other_tokenizer, ids: list[int]) -> Alignment:
    """Align a second base to primary token ids (what both embed and serve call)."""
    text, ends = primary_text(primary_tokenizer, ids)
    return align(text, ends, other_tokenizer)


def gather(states: torch.Tensor, index: list[int]) -> torch.Tensor:
    """states (T_other, D) of one sequence -> (T_primary, D), zeros where index is -1."""
    positions = torch.tensor(index, dtype=torch.long)
    out = states.new_zeros(len(index), states.shape[-1])
    found = positions >= 0
    out[found] = states[positions[found]]
    return out


def aligned_states(
    primary, other, layers: list[int], rows: list[list[int]], *, start: int = 0, batch_size: int = 8
) -> dict[int, list[torch.Tensor]]:
    """A second base's states at `layers`, aligned to each row of primary ids.

    `primary` and `other` are `FrozenBase`s. Returns {layer index: [(T_r, D_other) float32 per
    row]}, one vector per primary position (zeros where no token of the other base qualifies).
    Positions before `start` may be left without their fallback pass (the server needs only
    the new ones). A base with the primary's tokenizer is aligned position by position: it
    reads the same ids.
    """
    layers = sorted({other.layer_index(layer) for layer in layers})
    if other.tokenizer_hash == primary.tokenizer_hash:
        return other.hidden_rows(rows, layers)
    alignments = [align_ids(primary.tokenizer, other.tokenizer, row) for row in rows]
    # A text with no characters still gets one token (BOS, or the pad id) so the forward runs.
    other_rows = [a.other_ids or [other.tokenizer.pad_token_id or 0] for a in alignments]
    states = {index: [] for index in layers}
    for first in range(0, len(rows), batch_size):  # rows come length-sorted from the caller
        chunk = other.hidden_rows(other_rows[first : first + batch_size], layers)
        for index in chunk:
            states[index] += chunk[index]
    out = {
        index: [gather(row_states, a.index) for row_states, a in zip(per_row, alignments, strict=True)]
        for index, per_row in states.items()
    }
    jobs: dict[tuple[int, ...], list[tuple[int, int]]] = {}  # ids -> [(row, position)]
    for row, alignment in enumerate(alignments):
        for position, ids in alignment.fallback.items():
            if position >= start and ids:
                jobs.setdefault(tuple(ids), []).append((row, position))
    ordered = sorted(jobs, key=len)
    for first in range(0, len(ordered), batch_size):
        group = ordered[first : first + batch_size]
        chunk = other.hidden_rows([list(ids) for ids in group], layers)
        for index in layers:
            for ids, row_states in zip(group, chunk[index], strict=True):
                for row, position in jobs[ids]:
                    out[index][row][position] = row_states[-1]
    return out
