"""Causal alignment of a second base (SPEC §1): identity for the same tokenizer; for a
different tokenizer no primary position sees text after its own token, and the states stored
from a full pass equal those recomputed over each prefix (what the server does)."""

from __future__ import annotations

import pytest
import torch

from carryon_ray.alignment import align, align_ids, aligned_states, gather, primary_text
from carryon_ray.bases import FrozenBase
from tests.conftest import make_model

TEXTS = [
    "Question: Natalia sold 48 clips in April. How many in all?\nAnswer: 48 + 24 = 72 #### 72",
    "The quick brown fox jumps over the lazy dog; déjà vu, naïve café 你好 👍 done.",
    "def add(a, b): return a + b  # 0 1 2 3",
]


@pytest.fixture(scope="module")
def bases(tiny_tokenizer, other_tokenizer):
    primary = FrozenBase.from_model("tiny", make_model(len(tiny_tokenizer)), tiny_tokenizer)
    other = FrozenBase.from_model(
        "other", make_model(len(other_tokenizer), seed=1, hidden_size=48), other_tokenizer
    )
    return primary, other


def test_the_rule_lags_one_token_behind_the_text(tiny_tokenizer):
    """Applied to the primary's own tokenizer, the rule reads the token before each position
    (the final token of a prefix may still change). A base that shares the primary's tokenizer
    does not go through it: see test_same_tokenizer_is_the_identity."""
    for text in TEXTS:
        if not text.isascii():
            continue
        ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
        alignment = align_ids(tiny_tokenizer, tiny_tokenizer, ids)
        assert alignment.index == list(range(-1, len(ids) - 1)) and not alignment.fallback


def test_tokenizers_differ(tiny_tokenizer, other_tokenizer):
    ids = [tiny_tokenizer(t)["input_ids"] for t in TEXTS]
    assert ids != [other_tokenizer(t)["input_ids"] for t in TEXTS]


@pytest.mark.parametrize("text", TEXTS)
def test_no_position_sees_text_after_its_token(tiny_tokenizer, other_tokenizer, text):
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    full_text, ends = primary_text(tiny_tokenizer, ids)
    assert ends == sorted(ends) and ends[-1] == len(full_text)
    alignment = align(full_text, ends, other_tokenizer)
    encoded = other_tokenizer(full_text, return_offsets_mapping=True)
    for position, (end, j) in enumerate(zip(ends, alignment.index, strict=True)):
        # e_i depends only on the tokens up to i
        assert primary_text(tiny_tokenizer, ids[: position + 1])[1][-1] == end
        alone = other_tokenizer(full_text[:end])["input_ids"]
        used = alignment.fallback.get(position, alignment.other_ids[: j + 1])
        # what position i reads is the tokens of text[:e_i] alone, less the final one
        assert used == alone[:-1]
        if j >= 0:
            assert encoded["offset_mapping"][j][1] <= end  # so it ends by e_i


def test_a_token_that_changes_as_text_grows_is_never_read(other_tokenizer):
    """'48' may be one token of the whole text but '4' of the prefix: the prefix's final
    token is dropped whatever follows, so the choice never depends on later text."""
    text = "sold 48 clips"
    end = text.index("48") + 1
    for whole in (text, text[:end], text[:end] + "9 clips"):
        alignment = align(whole, [end], other_tokenizer)
        alone = other_tokenizer(text[:end])["input_ids"]
        assert alignment.fallback.get(0, alignment.other_ids[: alignment.index[0] + 1]) == alone[:-1]


def test_empty_prefix_gets_a_zero_vector():
    states = torch.ones(3, 4)
    out = gather(states, [-1, 0, 2])
    assert out[0].abs().sum() == 0 and torch.equal(out[1:], states[[0, 2]])


@pytest.mark.parametrize("text", TEXTS)
def test_full_pass_equals_prefix_recomputation(bases, text):
    """The embed stage's states (one pass over the whole text) equal the server's (a pass over
    the text up to each token): position i never depends on later text."""
    primary, other = bases
    ids = primary.tokenizer(text, add_special_tokens=False)["input_ids"]
    full = aligned_states(primary, other, [2, 1], [ids])
    for position in range(len(ids)):
        prefix = aligned_states(primary, other, [2, 1], [ids[: position + 1]])
        for layer in (2, 1):
            torch.testing.assert_close(
                prefix[layer][0][position], full[layer][0][position], atol=1e-5, rtol=1e-5
            )
    assert full[2][0].shape == (len(ids), 48)


def test_same_tokenizer_is_the_identity(bases, tiny_tokenizer):
    primary, _ = bases
    twin = FrozenBase.from_model("twin", make_model(len(tiny_tokenizer), seed=3), tiny_tokenizer)
    ids = tiny_tokenizer(TEXTS[0])["input_ids"]
    states = aligned_states(primary, twin, [2], [ids])[2][0]
    expected = twin.hidden_rows([ids], [2])[2][0]
    torch.testing.assert_close(states, expected)
