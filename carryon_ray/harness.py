"""The merged model as an `lm_eval` model, in-process (SPEC §2.6).

`CarryOnLM` is an `lm_eval.api.model.TemplateLM` over a `MergedModel` at one α (α = 0 is the
base exactly):

- `loglikelihood`: lm_eval's own context/continuation tokenization (`TemplateLM._encode_pair`:
  the whole string is tokenized and split at the context's length, trailing context spaces move
  to the continuation), then one right-padded forward per batch of the merged model; a causal
  model's positions before the padding do not see it, so each row scores as it would alone.
  Over-long inputs keep their last `context_length` tokens, as lm_eval's HF model does.
- `loglikelihood_rolling`: lm_eval's disjoint rolling windows, scored the same way and summed.
- `generate_until`: every request goes to one `DecodeBatcher` (the server's engine), so the
  requests share batched decode steps; greedy unless `do_sample`, ended at the eos token, at
  `max_gen_toks` or at the first `until` string (the text is cut before it).

lm_eval is a dev extra; importing this module without it raises an install hint.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

import torch

from carryon_ray.batching import DecodeBatcher
from carryon_ray.merged import MergedModel, SamplingParams

try:
    # lm_eval fills its model registry with the built-in models (local-completions, hf, ...)
    # only while it is empty: fill it first, or registering ours would hide them.
    import lm_eval.models  # noqa: F401
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as error:  # pragma: no cover - the install hint
    raise ImportError(
        "`carryon eval` needs lm_eval: pip install 'lm_eval[api]==0.4.13' (or -e '.[dev]')"
    ) from error

logger = logging.getLogger(__name__)

DEFAULT_MAX_GEN_TOKS = 256


@register_model("carryon")
class CarryOnLM(TemplateLM):
    """`lm_eval` model over a merged model (base + optional carry-on) at α = `alpha`."""

    def __init__(
        self,
        merged: MergedModel,
        *,
        alpha: float | None = None,
        batcher: DecodeBatcher | None = None,
        batch_size: int = 8,
        max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
        label: str | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.merged = merged
        self.alpha = merged.alpha if alpha is None else float(alpha)
        if self.alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {self.alpha}")
        self.tokenizer = merged.base.tokenizer
        if self.tokenizer is None:
            raise ValueError(f"base '{merged.base.name}' has no tokenizer; lm_eval sends text")
        self._owns_batcher = batcher is None
        self.batcher = batcher or DecodeBatcher(merged.base, max_batch_size=batch_size)
        self.batch_size = batch_size
        self.max_gen_toks = max_gen_toks
        self.label = label or merged.base.name

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> CarryOnLM:
        """`lm_eval --model carryon --model_args config=PATH,model=NAME|base,alpha=A`."""
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> CarryOnLM:
        """model_args: `config` (a pipeline YAML; default configs/demo.yaml), `model` (a
        carry-on in its registry, default the config's name, or `base`), `alpha` (default
        the artifact's), `batch_size`; the carry-on is loaded as `carryon eval` loads it."""
        from carryon_ray.config import load_config
        from carryon_ray.harness_run import HarnessRequest, build_models

        args = dict(arg_dict)
        config = load_config(args.pop("config", None), [])
        model, alpha = args.pop("model", None), args.pop("alpha", None)
        batch_size = args.pop("batch_size", None) or (additional_config or {}).get("batch_size")
        batch_size = int(batch_size) if str(batch_size).isdigit() else 8  # lm_eval's "auto": ours
        if args:
            raise ValueError(f"unknown carryon model_args {sorted(args)}; use config, model, alpha, batch_size")
        rows, _ = build_models(config, HarnessRequest(model=None if model is None else str(model)))
        label, merged, default_alpha = rows[-1]  # the carry-on at its own α (or the base alone)
        return cls(merged, alpha=default_alpha if alpha is None else float(alpha), batch_size=batch_size,
                   label=label)

    # -- tokenization ------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self.merged.context_length

    @property
    def tokenizer_name(self) -> str:
        return self.merged.base.name

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """The server's tokenization (`tokenizer(text)`), without a second BOS when the text
        already starts with one (a chat-rendered prompt)."""
        if add_special_tokens is None:
            bos = self.tokenizer.bos_token
            add_special_tokens = not (bos and string.startswith(bos))
        return self.tokenizer(string, add_special_tokens=add_special_tokens)["input_ids"]

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"base '{self.merged.base.name}' has no chat template; use a plain task")
        return self.tokenizer.apply_chat_template(
            chat_history, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    # -- scoring -----------------------------------------------------------------------------

    @torch.no_grad()
    def _loglikelihood_tokens(
        self, requests: list[tuple[tuple[str, str], list[int], list[int]]], disable_tqdm: bool = False, **kwargs
    ) -> list[tuple[float, bool]]:
        """(key, context ids, continuation ids) -> (sum of the continuation's log-probs, whether
        each continuation token is the argmax), in request order."""
        rows = []
        for _, context_ids, continuation_ids in requests:
            if not continuation_ids:
                raise ValueError("lm_eval sent an empty continuation to score")
            whole = (list(context_ids) + list(continuation_ids))[-(self.max_length + 1) :]
            rows.append((whole[:-1], len(continuation_ids)))
        order = sorted(range(len(rows)), key=lambda index: -len(rows[index][0]))
        out: list[tuple[float, bool] | None] = [None] * len(rows)
        device = self.merged.base.device
        for start in range(0, len(order), self.batch_size):
            group = order[start : start + self.batch_size]
            longest = len(rows[group[0]][0])
            ids = torch.full((len(group), longest), self.eot_token_id or 0, dtype=torch.long, device=device)
            for row, index in enumerate(group):
                inputs = rows[index][0]
                ids[row, : len(inputs)] = torch.tensor(inputs, dtype=torch.long, device=device)
            hidden = self.merged.hidden(ids, alpha=self.alpha)  # (B, T, D)
            for row, index in enumerate(group):
                inputs, count = rows[index]
                _, context_ids, continuation_ids = requests[index]
                targets = torch.tensor(continuation_ids[-count:], dtype=torch.long, device=device)
                at = hidden[row, len(inputs) - count : len(inputs)]  # (count, D): predict the continuation
                log_probs = torch.log_softmax(self.merged.head(at).float(), dim=-1)  # (count, V)
                chosen = log_probs.gather(1, targets[:, None])[:, 0]
                greedy = bool((log_probs.argmax(dim=-1) == targets).all())
                out[index] = (float(chosen.sum()), greedy)
        return out  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each string's whole log-likelihood, over lm_eval's disjoint rolling windows."""
        totals = []
        for (string,) in (request.args for request in requests):
            windows = [
                make_disjoint_window(window)
                for window in get_rolling_token_windows(
                    token_list=self.tok_encode(string),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                )
            ]
            scores = self._loglikelihood_tokens([(None, context, target) for context, target in windows])
            totals.append(sum(score for score, _ in scores))
        return totals

    # -- generation --------------------------------------------------------------------------

    def _params(self, gen_kwargs: dict) -> tuple[SamplingParams, list[str]]:
        kwargs = dict(gen_kwargs)
        until = kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        max_gen_toks = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
        do_sample = bool(kwargs.pop("do_sample", False))
        temperature = float(kwargs.pop("temperature", 1.0 if do_sample else 0.0))
        params = SamplingParams(
            max_new_tokens=max_gen_toks,
            temperature=temperature if do_sample else 0.0,
            top_p=float(kwargs.pop("top_p", 1.0) or 1.0),
            seed=kwargs.pop("seed", None),
            stop_token_ids=(self.eot_token_id,) if self.eot_token_id is not None else (),
        )
        if kwargs:
            logger.warning("carryon: generation settings %s are not supported and ignored", sorted(kwargs))
        return params, until

    def _generate_one(self, context: str, gen_kwargs: dict) -> str:
        params, until = self._params(gen_kwargs)
        ids = self.tok_encode(context)
        room = max(self.max_length - params.max_new_tokens, 1)
        ids = ids[-room:]  # lm_eval's HF model keeps the end of an over-long prompt too
        tokens: list[int] = []
        text = ""
        stream = self.batcher.stream(self.merged, ids, params, alpha=self.alpha)
        try:
            for token in stream:
                if token == self.eot_token_id:
                    break
                tokens.append(int(token))
                text = self.tokenizer.decode(tokens, skip_special_tokens=False)
                if any(stop in text for stop in until):
                    break
        finally:
            close = getattr(stream, "close", None)
            if close is not None:
                close()  # leaves the batch at once
        for stop in until:
            text = text.split(stop)[0] if stop else text
        return text

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Every request through the batcher at once (its rows share decode steps)."""
        arguments = [request.args for request in requests]
        workers = max(1, min(len(arguments), self.batcher.max_batch_size))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="carryon-eval") as pool:
            return list(pool.map(lambda pair: self._generate_one(pair[0], pair[1]), arguments))

    def close(self) -> None:
        if self._owns_batcher:
            self.batcher.close()
