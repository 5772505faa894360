"""One base forward for the running rows' newest tokens and joining prompts' next chunks.

A decode step of a small base on a CPU costs about one read of its weights: for SmolLM2-135M
in bfloat16 a forward of one token takes 31 ms, a decode step of 8 rows 50 ms, a 40-token prompt
alone 57 ms. Fed in a forward of its own, each joining prompt costs the running rows a whole
extra read of the weights. Here the prompt's chunk rides in the decode step: every projection
and MLP runs once over the rows' tokens and the chunk's tokens stacked, (B + w, D), and only
attention is split (the rows against the batch's left-padded cache, the chunk causally against
its own cache). The chunk then costs about 0.65 ms a token instead of 31 ms and up.

The layer loop mirrors a Llama-style decoder layer (pre-norm attention with rotary positions,
pre-norm MLP, final norm) through the model's own modules and its SDPA attention function. `FusedStep.check` runs it against
the model's own forward on the engine thread when the engine starts, and the engine uses it
only where the two agree, so a base of another shape keeps the separate forwards.
"""

from __future__ import annotations

import itertools
import logging

import torch
import torch.nn.functional as F

from carryon_ray.bases import FrozenBase

logger = logging.getLogger(__name__)

# Largest |fused - plain| allowed in the check, relative to the largest hidden value.
CHECK_TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}
LAYER_PARTS = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")
ATTENTION_PARTS = ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling")


class FusedStep:
    """`__call__` runs the fused forward of a base whose decoder is Llama-shaped."""

    def __init__(self, base: FrozenBase) -> None:
        self.base = base
        inner = base.model.model
        self.inner = inner
        self.layers = list(inner.layers)
        self.rotary = inner.rotary_emb
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        self.apply_rotary = apply_rotary_pos_emb
        self.attend = ALL_ATTENTION_FUNCTIONS["sdpa"]

    @staticmethod
    def shaped(base: FrozenBase) -> bool:
        """Whether the base's decoder has the parts the fused loop uses (no more: extra norms,
        soft-capping or sliding windows are other shapes)."""
        config = base.model.config.get_text_config()
        inner = getattr(base.model, "model", None)
        if config.model_type != "llama" or inner is None:
            return False
        if getattr(config, "_attn_implementation", None) != "sdpa":  # its masks are SDPA's
            return False
        if not all(hasattr(inner, part) for part in ("embed_tokens", "layers", "norm", "rotary_emb")):
            return False
        return all(
            all(hasattr(layer, part) for part in LAYER_PARTS)
            and all(hasattr(layer.self_attn, part) for part in ATTENTION_PARTS)
            for layer in inner.layers
        )

    @torch.no_grad()
    def __call__(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        positions: torch.Tensor,
        cache,
        chunks: list[tuple[torch.Tensor, object]],
        layers: list[int],
    ) -> tuple[dict[int, torch.Tensor], list[dict[int, torch.Tensor]]]:
        """Rows: `ids` (B, 1), `mask` (B, past + 1) over `cache`'s columns and the new one,
        `positions` (B, 1). Chunks: (ids (1, w), the cache of that prompt so far) each. Every
        cache takes its new keys and values. -> ({layer: (B, 1, D)}, [{layer: (1, w, D)} per
        chunk]) for the normalised `layers` (num_layers = the final, normed state)."""
        device = self.base.device
        rows = ids.shape[0]
        widths = [chunk.shape[1] for chunk, _ in chunks]
        starts = [chunk_cache.get_seq_length() for _, chunk_cache in chunks]
        chunk_positions = [
            torch.arange(start, start + width, device=device)
            for start, width in zip(starts, widths, strict=True)
        ]
        tokens = torch.cat([ids.reshape(-1)] + [chunk.reshape(-1) for chunk, _ in chunks])
        all_positions = torch.cat([positions.reshape(-1).to(device), *chunk_positions])
        x = self.inner.embed_tokens(tokens.to(device))[None]  # (1, B + sum w, D)
        cos, sin = self.rotary(x, all_positions[None])
        bounds = [rows]
        for width in widths:
            bounds.append(bounds[-1] + width)
        spans = list(itertools.pairwise(bounds))  # each chunk's (low, high) in the stacked tokens
        # Rows: (B, 1, d) rotary parts, one position each; chunk i: (1, w_i, d).
        row_rotary = (cos[:, :rows].transpose(0, 1), sin[:, :rows].transpose(0, 1))
        chunk_rotary = [
            (cos[:, low:high], sin[:, low:high])
            for low, high in spans
        ]
        row_mask = mask.to(device=device, dtype=torch.bool)[:, None, None, :]  # (B, 1, 1, past+1)
        chunk_masks = [  # causal: (1, 1, w, start + w)
            (torch.arange(start + width, device=device)[None, :] <= where[:, None])[None, None]
            for start, width, where in zip(starts, widths, chunk_positions, strict=True)
        ]
        wanted = set(layers)
        row_states: dict[int, torch.Tensor] = {}
        chunk_states: list[dict[int, torch.Tensor]] = [{} for _ in chunks]

        def keep(index: int, hidden: torch.Tensor) -> None:
            if index in wanted:
                row_states[index] = hidden[0, :rows, None]
                for states, (low, high) in zip(chunk_states, spans, strict=True):
                    states[index] = hidden[:, low:high]

        # The rows, then each chunk: its cache, mask, rotary parts, span in the stacked tokens,
        # and its attention shape (batch, length).
        parts = [(cache, row_mask, row_rotary, 0, rows, rows, 1)]
        parts += [
            (chunk_cache, chunk_mask, rotary, low, high, 1, high - low)
            for (_, chunk_cache), chunk_mask, rotary, (low, high) in zip(
                chunks, chunk_masks, chunk_rotary, spans, strict=True
            )
        ]
        for number, layer in enumerate(self.layers):
            keep(number, x)
            attention = layer.self_attn
            h = layer.input_layernorm(x)[0]  # (B + sum w, D)
            projected = (attention.q_proj(h), attention.k_proj(h), attention.v_proj(h))
            d = attention.head_dim
            outputs = []
            for part_cache, part_mask, (part_cos, part_sin), low, high, batch, length in parts:
                # (batch, heads, length, d): each row one token, or one chunk of `length`.
                q, k, v = (
                    t[low:high].view(batch, length, -1, d).transpose(1, 2) for t in projected
                )
                q, k = self.apply_rotary(q, k, part_cos, part_sin)
                k, v = part_cache.update(k, v, number)
                # The model's own SDPA call (its grouped-query handling included): -> (batch,
                # length, heads, d).
                out, _ = self.attend(
                    attention, q, k, v, part_mask, scaling=attention.scaling, is_causal=False
                )
                outputs.append(out.reshape(high - low, -1))
            x = x + attention.o_proj(torch.cat(outputs))[None]
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        keep(len(self.layers), self.inner.norm(x))
        return row_states, chunk_states

    def check(self) -> bool:
        """Whether the fused forward gives the model's own hidden states, on two left-padded
        rows and two chunks continuing their prompts (every layer compared)."""
        base = self.base
        layers = list(range(base.num_layers + 1))
        generator = torch.Generator().manual_seed(0)
        vocab = base.model.config.get_text_config().vocab_size
        draw = lambda *shape: torch.randint(0, vocab, shape, generator=generator)
        row_ids = [draw(1, 5), draw(1, 3)]
        prompts, chunks = [draw(1, 4), draw(1, 6)], [draw(1, 3), draw(1, 1)]

        def batch_cache():
            caches = []
            for ids in row_ids:
                _, cache = base.forward(ids, layers, past_key_values=base.new_cache())
                caches.append(cache)
            for mine, theirs in zip(caches[0].layers, caches[1].layers, strict=True):
                mine.keys = torch.cat([mine.keys, F.pad(theirs.keys, (0, 0, 2, 0))])
                mine.values = torch.cat([mine.values, F.pad(theirs.values, (0, 0, 2, 0))])
            return caches[0]

        step = draw(2, 1)
        mask = torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]])
        positions = torch.tensor([[5], [3]])
        want_rows, _ = base.forward(
            step, layers, attention_mask=mask, position_ids=positions,
            past_key_values=batch_cache(),
        )
        want_chunks, fed = [], []
        for prompt, chunk in zip(prompts, chunks, strict=True):
            _, prompt_cache = base.forward(prompt, layers, past_key_values=base.new_cache())
            want_chunks.append(base.forward(chunk, layers, past_key_values=prompt_cache)[0])
            _, prompt_cache = base.forward(prompt, layers, past_key_values=base.new_cache())
            fed.append((chunk, prompt_cache))
        got_rows, got_chunks = self(step, mask, positions, batch_cache(), fed, layers)
        allowed = CHECK_TOLERANCE.get(base.dtype, 5e-2)
        for want, got in zip([want_rows, *want_chunks], [got_rows, *got_chunks], strict=True):
            for index in layers:
                scale = max(float(want[index].abs().max()), 1.0)
                if not float((want[index] - got[index]).abs().max()) <= allowed * scale:
                    logger.info(
                        "base '%s': the fused prefill differs from its forward at layer %d; "
                        "joining prompts get forwards of their own", base.name, index,
                    )
                    return False
        return True


def fused_step(base: FrozenBase) -> FusedStep | None:
    """The fused forward for `base` where it reproduces the base's own, else None. Call it on
    the thread that will run it (it runs the base)."""
    if not FusedStep.shaped(base):
        return None
    fused = FusedStep(base)
    try:
        return fused if fused.check() else None
    except Exception:
        logger.exception("base '%s': the fused prefill check failed", base.name)
        return None
