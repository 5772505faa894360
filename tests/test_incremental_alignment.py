"""Mixtures served incrementally (issue 12, item 4): the second base keeps its own KV cache and
re-runs only the unstable tail of its tokenization, and the states it serves still equal the
states the embed stage stores (`aligned_states` over the whole sequence)."""

from __future__ import annotations

import pytest
import torch

from carryon_ray.alignment import aligned_states, primary_text
from carryon_ray.bases import FrozenBase
from carryon_ray.incremental_alignment import (
    HOLD_BACK,
    PrimaryText,
    SecondBaseStream,
    TailTokenizer,
)
from carryon_ray.merged import MergedModel, MixtureCache, SamplingParams
from tests.conftest import make_model, mixture_carryon

# Mixed text: numbers that grow ("4" -> "48"), punctuation, accents, CJK and an emoji (bytes of
# one character spread over several byte-level tokens), code, runs of spaces and newlines.
TEXT = (
    "Question: Natalia sold 48 clips in April and 24 in May. How many in all?\n"
    "Answer: 48 + 24 = 72 #### 72. déjà vu, naïve café 你好 👍 done.\n"
    "def add(a, b):  return a + b  # 0 1 2 3 4 5 6 7 8 9 = + - * / < >   end"
)


@pytest.fixture(scope="module")
def bases(tiny_tokenizer, other_tokenizer):
    primary = FrozenBase.from_model("tiny", make_model(len(tiny_tokenizer)), tiny_tokenizer)
    other = FrozenBase.from_model(
        "other", make_model(len(other_tokenizer), seed=1, hidden_size=48), other_tokenizer
    )
    return primary, other


# A special token's spelling arrives one character at a time: until its last character it is
# ordinary text, then one token that starts well before the end.
SPECIAL = "sold 48 clips <|endoftext|> and 24<|endoftext|>72 #### 72"


@pytest.mark.parametrize("which", ["tiny_tokenizer", "other_tokenizer"])
@pytest.mark.parametrize("step", [1, 3, 17])
@pytest.mark.parametrize("text", [TEXT, SPECIAL])
def test_tail_tokenizer_equals_tokenizing_the_whole_text(request, which, step, text):
    tokenizer = request.getfixturevalue(which)
    tail = TailTokenizer(tokenizer)
    for end in [*range(0, len(text), step), len(text)]:
        before = list(tail.ids)
        changed = tail.update(text[:end])
        expected = tokenizer(text[:end])["input_ids"]
        assert tail.ids == expected, end
        assert before[:changed] == expected[:changed]
    assert tail.full_passes <= 2  # the window almost always agrees where it starts


def emoji_tokenizer():
    """A byte-level BPE whose tokens join a space to the first bytes of an emoji (" \\xf0\\x9f"),
    as SmolLM2's do: the text of such a position ends with the space."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=262,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    core.train_from_iterator([" ".join(chr(c) for c in range(0x1F600, 0x1F650))] * 3, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>")


@pytest.mark.parametrize("which", ["tiny_tokenizer", "emoji"])
def test_primary_text_gives_the_ends_of_primary_text(request, which):
    tokenizer = emoji_tokenizer() if which == "emoji" else request.getfixturevalue(which)
    ids = tokenizer(TEXT + " ok 👍 fine 😀 and", add_special_tokens=False)["input_ids"]
    text, ends = primary_text(tokenizer, ids)
    stream = PrimaryText(tokenizer)
    assert [stream.add(token) for token in ids] == ends
    assert stream.text == text and stream.full_decodes == 0


@pytest.mark.parametrize("prompt_length", [1, 20])
def test_stream_states_equal_stored_states(bases, prompt_length):
    """A prompt, then one id at a time: every position's state equals the embed stage's."""
    primary, other = bases
    ids = primary.tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    assert len(ids) >= 80
    stored = aligned_states(primary, other, [2, 1], [ids])
    stream = SecondBaseStream(primary, other, [1, 2])
    served = [stream.extend(ids[:prompt_length])]
    served += [stream.extend([token]) for token in ids[prompt_length:]]
    for layer in (1, 2):
        torch.testing.assert_close(
            torch.cat([part[layer] for part in served]), stored[layer][0], atol=1e-5, rtol=1e-5
        )
    # Linear work: each step re-runs its new ids and a few held back, never the whole text.
    assert stream.tokens_run <= len(stream.sequence) + (HOLD_BACK + 3) * len(ids)
    assert stream.tokens.full_passes <= 2


def sliding_base(tokenizer) -> FrozenBase:
    """A tiny Gemma-3 (one sliding-window layer of 6, one global): its cache cannot be
    cropped back past what the latest pass added once the window is full."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(1)
    config = Gemma3TextConfig(
        vocab_size=len(tokenizer),
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=12,
        sliding_window=6,
        layer_types=["sliding_attention", "full_attention"],
        max_position_embeddings=512,
        pad_token_id=0,
        eos_token_id=0,
        bos_token_id=0,
    )
    return FrozenBase.from_model("sliding", Gemma3ForCausalLM(config).eval(), tokenizer)


@pytest.mark.parametrize("hold_back", [HOLD_BACK, 0])
def test_sliding_window_second_base(bases, other_tokenizer, monkeypatch, hold_back):
    """With nothing held back, ids the cache holds do change, and a sliding-window cache past
    its window is rebuilt: the states still equal the stored ones."""
    import carryon_ray.incremental_alignment as incremental

    monkeypatch.setattr(incremental, "HOLD_BACK", hold_back)
    primary, _ = bases
    other = sliding_base(other_tokenizer)
    ids = primary.tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    stored = aligned_states(primary, other, [2], [ids])[2][0]
    stream = SecondBaseStream(primary, other, [2])
    served = torch.cat([stream.extend(ids[:20])[2]] + [stream.extend([t])[2] for t in ids[20:]])
    torch.testing.assert_close(served, stored, atol=1e-5, rtol=1e-5)
    assert (stream.rebuilds > 0) == (hold_back == 0)


def test_same_tokenizer_stream_reads_the_same_ids(bases, tiny_tokenizer):
    primary, _ = bases
    twin = FrozenBase.from_model("twin", make_model(len(tiny_tokenizer), seed=3), tiny_tokenizer)
    ids = tiny_tokenizer(TEXT[:80])["input_ids"]
    stream = SecondBaseStream(primary, twin, [2])
    served = torch.cat([stream.extend(ids[:5])[2]] + [stream.extend([t])[2] for t in ids[5:]])
    torch.testing.assert_close(served, twin.hidden_rows([ids], [2])[2][0], atol=1e-5, rtol=1e-5)


def mixture(primary: FrozenBase, other: FrozenBase) -> MergedModel:
    return MergedModel(primary, *mixture_carryon(primary, other), alpha=1.0, others={"other": other})


def served_hidden(merged: MergedModel, ids: list[int], prompt_length: int) -> torch.Tensor:
    """The merged hidden state of every position as the server computes it: the prompt in one
    step, then one id per step through `step_hidden`. Returns (T, D)."""
    layers = list(merged.layers.values())
    cache, carry, rows = merged.base.new_cache(), None, []
    position = 0
    for end in [prompt_length, *range(prompt_length + 1, len(ids) + 1)]:
        step = torch.tensor([ids[position:end]], dtype=torch.long)
        states, cache = merged.base.forward(step, layers, past_key_values=cache)
        hidden, carry = merged.step_hidden(
            states, ids[:end], alpha=merged.alpha, position=position, cache=carry
        )
        rows.append(hidden)
        position = end
    assert isinstance(carry, MixtureCache)
    return torch.cat(rows)


def test_served_logits_equal_the_full_recomputation(bases):
    """Teacher-forced over mixed text, and over a sampled generation of 48 tokens: the logits of
    each new position served incrementally equal those of one pass over the whole sequence,
    whose second-base states are the ones training stored."""
    primary, other = bases
    merged = mixture(primary, other)
    ids = primary.tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    prompt_length = 12
    full = merged.logits(torch.tensor([ids]))[0]
    served = merged.head(served_hidden(merged, ids, prompt_length))
    torch.testing.assert_close(served, full[prompt_length - 1 :], atol=1e-4, rtol=1e-4)
    no_second = merged.logits(torch.tensor([ids]), alpha=0.0)[0]
    assert not torch.allclose(full, no_second)  # the carry-on does change the logits

    prompt = ids[:prompt_length]
    params = SamplingParams(max_new_tokens=48, temperature=1.0, seed=3)
    generated = merged.generate(prompt, params)
    assert len(generated) == 48
    sequence = prompt + generated
    full = merged.logits(torch.tensor([sequence[:-1]]))[0]
    served = merged.head(served_hidden(merged, sequence[:-1], prompt_length))
    torch.testing.assert_close(served, full[prompt_length - 1 :], atol=1e-4, rtol=1e-4)


def test_batched_mixture_streams_equal_generate(bases):
    """Through the continuous batcher, several mixture streams at once (each its own
    `MixtureCache`) give the tokens one `generate` gives alone."""
    import threading

    from carryon_ray.batching import DecodeBatcher

    primary, other = bases
    merged = mixture(primary, other)
    tokenizer = primary.tokenizer
    prompts = [
        tokenizer(TEXT[20 * k : 60 + 35 * k], add_special_tokens=False)["input_ids"]
        for k in range(4)
    ]
    params = SamplingParams(max_new_tokens=24, temperature=1.0, seed=7)
    expected = [merged.generate(prompt, params) for prompt in prompts]
    engine = DecodeBatcher(primary, max_batch_size=4)
    out: list[list[int] | None] = [None] * len(prompts)

    def run(number: int) -> None:
        out[number] = list(engine.stream(merged, prompts[number], params))

    threads = [threading.Thread(target=run, args=(number,)) for number in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    engine.close()
    assert out == expected
    assert engine.mean_batch_size > 1
