"""The carry-on's AdamW and the memory tricks behind one `train` key each (no Ray here).

Float32 weights stepped after the backward pass are the default: a plain optimizer, nothing
else. Two options change how the step is taken; both keep the optimizer interface the loop
uses (`param_groups` whose "lr" it sets before every step, `state_dict()` /
`load_state_dict()` in torch's flat shape, `zero_grad()`, `step()`):

- `train.param_dtype: bfloat16` — the weights, and so their gradients, are bfloat16 (half the
  bytes) with no float32 master copy. Each update is computed in float32 on a scratch copy of
  one piece of one parameter and written back with stochastic rounding: rounded up or
  down at random, in proportion to the distance, so an update far below bfloat16's resolution
  (2^-8 to 2^-7 of the weight) still moves the weight in expectation instead of vanishing.
- `train.optimizer_in_backward: true` — torchtune's optimizer-in-backward: optimizers per
  parameter, stepped from a post-accumulate-grad hook as soon as that parameter's gradient is
  complete, which is then freed, so the gradients are never all alive at once. Global gradient
  clipping needs every gradient at once and DDP reduces gradients only after these hooks, so
  the config refuses it with `grad_clip` or with more than one worker.

Both go through `ParameterwiseOptimizer`. The optimizer's moments can be smaller too
(`train.optimizer`): `adamw8bit` is bitsandbytes' block-wise 8-bit AdamW (2 bytes of moments
per weight instead of 8), `adamw4bit` keeps them in 4 bits (`AdamW4bit`, about 1.06 bytes per
weight); either combines with both options above.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
from torch import nn

OPTIMIZERS = ("auto", "adamw", "adamw8bit", "adamw4bit")
BLOCK_4BIT = 128  # values per float32 scale of a 4-bit moment
MIN_4BIT = 4096  # smaller tensors keep float32 moments (as bitsandbytes' 8-bit AdamW does)


def resolve_optimizer(name: str, device: torch.device | str) -> str:
    """`auto` is 8-bit AdamW on CUDA and plain AdamW elsewhere."""
    if name == "auto":
        return "adamw8bit" if torch.device(device).type == "cuda" else "adamw"
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer '{name}' is unknown; choose one of {', '.join(OPTIMIZERS)}")
    return name


def adamw(
    name: str, parameters: list[torch.Tensor], *, lr: float, weight_decay: float
) -> torch.optim.Optimizer:
    """AdamW over `parameters`: torch's (`adamw`), bitsandbytes' block-wise 8-bit moments
    (`adamw8bit`) or `AdamW4bit` (`adamw4bit`); tensors under 4096 values keep float32
    moments in the last two."""
    if name == "adamw":
        return torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)
    if name == "adamw4bit":
        return AdamW4bit(parameters, lr=lr, weight_decay=weight_decay)
    if name != "adamw8bit":
        raise ValueError(f"optimizer '{name}' is unknown; choose adamw, adamw8bit or adamw4bit")
    return _flat_adamw8bit()(parameters, lr=lr, weight_decay=weight_decay)


def _flat_adamw8bit() -> type[torch.optim.Optimizer]:
    try:
        import bitsandbytes as bnb
    except ImportError as error:  # pragma: no cover - bitsandbytes is a dependency
        raise ImportError(
            "optimizer adamw8bit needs bitsandbytes: pip install bitsandbytes"
        ) from error

    class AdamW8bit(bnb.optim.AdamW8bit):
        """bitsandbytes' 8-bit AdamW with torch's flat state_dict: bitsandbytes nests its
        quantization state in a dict (for FSDP), which a checkpoint of tensors and numbers
        cannot store; its load_state_dict takes either shape."""

        def state_dict(self) -> dict:
            state = super().state_dict()
            for slots in state["state"].values():
                slots.update(slots.pop(self._FSDP_WRAPPED_QUANT_STATE_KEY, {}))
                for name in ("qmap1", "qmap2"):  # one tensor shared by every parameter
                    if name in slots:
                        slots[name] = slots[name].clone()
            return state

    return AdamW8bit


@functools.cache
def _code_books() -> tuple[torch.Tensor, torch.Tensor]:
    """The 16 values of each 4-bit moment, as torchao's AdamW4bit (after thu-ml's low-bit
    optimizers): the first moment on bitsandbytes' signed dynamic map with 3 exponent bits,
    the second on a linear map without zero (a second moment rounded to 0 would make its
    step m / sqrt(0))."""
    import bitsandbytes.functional as bnb_functional

    signed = torch.unique(
        bnb_functional.create_dynamic_map(signed=True, max_exponent_bits=3, total_bits=4)
    )
    return signed.float(), torch.linspace(0, 1, 17)[1:]


def quantize_4bit(values: torch.Tensor, book: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """values (n,) float32, n a multiple of 2·BLOCK_4BIT -> codes (n/2,) uint8 (two 4-bit
    indices into `book` per byte, each the nearest entry), scales (n/BLOCK_4BIT,) float32."""
    blocks = values.view(-1, BLOCK_4BIT)  # (n/128, 128)
    scales = blocks.abs().amax(dim=1).clamp_min_(1e-12)
    book = book.to(values.device)
    index = torch.bucketize(blocks / scales[:, None], (book[1:] + book[:-1]) / 2).to(torch.uint8)
    pairs = index.view(-1, 2)  # (n/2, 2)
    return pairs[:, 0] | (pairs[:, 1] << 4), scales


def dequantize_4bit(codes: torch.Tensor, scales: torch.Tensor, book: torch.Tensor) -> torch.Tensor:
    """The inverse of `quantize_4bit` up to rounding: (n,) float32."""
    index = torch.stack([codes & 15, codes >> 4], dim=1).view(-1)  # (n,)
    values = book.to(codes.device)[index.long()].view(-1, BLOCK_4BIT) * scales[:, None]
    return values.view(-1)


class AdamW4bit(torch.optim.Optimizer):
    """AdamW whose two moments are stored in 4 bits per value, in blocks of BLOCK_4BIT values
    that share a float32 scale (0.53 bytes per moment value instead of 4); the update itself is
    computed in float32. The recipe (code books, block size) is torchao's AdamW4bit, in plain
    torch: no compilation, and a state_dict of plain tensors. Tensors under MIN_4BIT values
    keep float32 moments."""

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
    ) -> None:
        super().__init__(
            params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
        )
        self.register_load_state_dict_post_hook(AdamW4bit._codes_as_bytes)

    @staticmethod
    def _codes_as_bytes(optimizer: AdamW4bit) -> None:
        """torch's load_state_dict casts every state tensor of a float parameter to its dtype;
        the codes are bytes (0..255, so the round trip is exact)."""
        for state in optimizer.state.values():
            for name in ("exp_avg", "exp_avg_sq"):
                if f"{name}_scale" in state:
                    state[name] = state[name].to(torch.uint8)

    @staticmethod
    def _quantized(parameter: torch.Tensor) -> bool:
        return parameter.numel() >= MIN_4BIT and parameter.numel() % (2 * BLOCK_4BIT) == 0

    def _init_state(self, parameter: torch.Tensor) -> dict:
        if not self._quantized(parameter):
            zeros = functools.partial(torch.zeros, parameter.numel(), device=parameter.device)
            return {"step": 0, "exp_avg": zeros(), "exp_avg_sq": zeros()}
        codes = functools.partial(
            torch.zeros, parameter.numel() // 2, dtype=torch.uint8, device=parameter.device
        )
        scales = functools.partial(
            torch.zeros, parameter.numel() // BLOCK_4BIT, device=parameter.device
        )
        return {
            "step": 0,
            "exp_avg": codes(),
            "exp_avg_scale": scales(),
            "exp_avg_sq": codes(),
            "exp_avg_sq_scale": scales(),
        }

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        signed, unsigned = _code_books()
        for group in self.param_groups:
            lr, (beta1, beta2) = group["lr"], group["betas"]
            for parameter in group["params"]:
                if parameter.grad is None:
                    continue
                state = self.state[parameter]
                if not state:
                    state.update(self._init_state(parameter))
                quantized = "exp_avg_scale" in state
                if quantized:
                    exp_avg = dequantize_4bit(state["exp_avg"], state["exp_avg_scale"], signed)
                    exp_avg_sq = dequantize_4bit(
                        state["exp_avg_sq"], state["exp_avg_sq_scale"], unsigned
                    )
                else:
                    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                weights = parameter.detach().view(-1)
                work = weights.float()  # the parameter itself when it is float32
                grad = parameter.grad.view(-1).float()
                state["step"] += 1
                work.mul_(1 - lr * group["weight_decay"])
                exp_avg.lerp_(grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2 ** state["step"])).add_(
                    group["eps"]
                )
                work.addcdiv_(exp_avg, denom, value=-lr / (1 - beta1 ** state["step"]))
                if work.data_ptr() != weights.data_ptr():
                    weights.copy_(work)
                if quantized:  # into the same buffers: long-lived state is never reallocated
                    for name, values, book in (
                        ("exp_avg", exp_avg, signed),
                        ("exp_avg_sq", exp_avg_sq, unsigned),
                    ):
                        codes, scales = quantize_4bit(values, book)
                        state[name].copy_(codes)
                        state[f"{name}_scale"].copy_(scales)
        return loss


def stochastic_round_(
    target: torch.Tensor, source: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Write float32 `source` into bfloat16 `target`, rounding each value to one of its two
    bfloat16 neighbours at random so that the expected result is `source` itself.

    bfloat16 is float32's top 16 bits: adding uniform noise to the low 16 bits and cutting
    them rounds up with probability equal to the cut fraction (sign-magnitude: for negative
    values "up" is away from zero, which is the same rule).
    """
    noise = torch.randint(
        0, 1 << 16, source.shape, dtype=torch.int32, device=source.device, generator=generator
    )
    rounded = noise.add_(source.contiguous().view(torch.int32)).bitwise_and_(
        -65536
    )  # -65536: 0xFFFF0000
    return target.copy_(rounded.view(torch.float32))  # exact: the low 16 bits are zero


PIECE = 1 << 20  # values per optimizer piece: 4 MB in float32; whole 8- and 4-bit blocks, >= 4096


class ParameterwiseOptimizer:
    """Inner optimizers over pieces of the parameters, behind the torch optimizer interface.

    Every parameter is cut into pieces of at most `piece` values (in its flat order), each
    with its own inner optimizer over a float32 stand-in that points at that piece only while
    it steps: a view of it for a float32 parameter (updated in place, exactly as one optimizer
    over the whole parameter: AdamW is element-wise and bitsandbytes quantizes its moments in
    blocks of 256 that the pieces keep aligned), or a float32 copy for a bfloat16 parameter,
    written back with `stochastic_round_`. So a step's float32 temporaries are a few pieces,
    whatever the size of the largest parameter. The rounding noise of a piece's step is drawn
    from (seed, piece, step), so a run restored from a checkpoint rounds exactly as one that
    never stopped.

    `in_backward`: each parameter steps in its post-accumulate-grad hook and its gradient is
    freed there; `step()` then has nothing left to do. Otherwise `step()` steps every
    parameter that has a gradient, after the backward pass. `state_dict()` is torch's shape
    with one entry per piece.
    """

    def __init__(
        self,
        parameters: list[nn.Parameter],
        make: Callable[[list[torch.Tensor]], torch.optim.Optimizer],
        *,
        lr: float,
        weight_decay: float,
        in_backward: bool,
        seed: int = 0,
        piece: int = PIECE,
    ) -> None:
        self.parameters = list(parameters)
        self.in_backward = in_backward
        self.param_groups = [{"lr": lr, "weight_decay": weight_decay, "params": self.parameters}]
        self.seed = seed
        # Per parameter: its (start, end, stand-in, inner optimizer) pieces.
        self._pieces: dict[int, list[tuple[int, int, nn.Parameter, torch.optim.Optimizer]]] = {}
        for parameter in self.parameters:
            if not parameter.is_contiguous():
                raise ValueError("ParameterwiseOptimizer needs contiguous parameters")
            pieces = []
            for start in range(0, parameter.numel(), piece):
                standin = nn.Parameter(torch.empty(0, device=parameter.device))
                pieces.append(
                    (start, min(start + piece, parameter.numel()), standin, make([standin]))
                )
            self._pieces[id(parameter)] = pieces
        self._generator = None
        if any(parameter.dtype != torch.float32 for parameter in self.parameters):
            self._generator = torch.Generator(self.parameters[0].device)
        self._index = {id(optimizer): index for index, optimizer in enumerate(self._optimizers)}
        if in_backward:
            for parameter in self.parameters:
                parameter.register_post_accumulate_grad_hook(self._step_in_backward)

    @property
    def _optimizers(self) -> list[torch.optim.Optimizer]:
        return [optimizer for p in self.parameters for *_, optimizer in self._pieces[id(p)]]

    def _step_in_backward(self, parameter: nn.Parameter) -> None:
        self._step_parameter(parameter)
        parameter.grad = None

    @torch.no_grad()
    def _step_parameter(self, parameter: nn.Parameter) -> None:
        group = self.param_groups[0]
        weights, grads = parameter.detach().view(-1), parameter.grad.view(-1)
        exact = parameter.dtype == torch.float32
        for start, end, standin, optimizer in self._pieces[id(parameter)]:
            inner = optimizer.param_groups[0]
            inner["lr"], inner["weight_decay"] = group["lr"], group["weight_decay"]
            standin.data = weights[start:end] if exact else weights[start:end].float()
            standin.grad = grads[start:end] if exact else grads[start:end].float()
            optimizer.step()
            if not exact:
                step = int(optimizer.state[standin]["step"])  # every AdamW here counts its steps
                self._generator.manual_seed(hash((self.seed, self._index[id(optimizer)], step)))
                stochastic_round_(weights[start:end], standin.data, self._generator)
            standin.data, standin.grad = torch.empty(0, device=parameter.device), None

    def step(self) -> None:
        """Step every parameter that has a gradient (none are left when in backward)."""
        for parameter in self.parameters:
            if parameter.grad is not None:
                self._step_parameter(parameter)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for parameter in self.parameters:
            parameter.grad = None

    def state_dict(self) -> dict:
        """{"state": {piece index: {slot: tensor or number}}, "param_groups": [one group]}."""
        optimizers = self._optimizers
        state = {}
        for index, optimizer in enumerate(optimizers):
            inner = optimizer.state_dict()["state"]
            if inner:
                state[index] = inner[0]
        group = {key: value for key, value in self.param_groups[0].items() if key != "params"}
        return {"state": state, "param_groups": [{**group, "params": list(range(len(optimizers)))}]}

    def load_state_dict(self, state_dict: dict) -> None:
        optimizers, groups = self._optimizers, state_dict["param_groups"]
        if len(groups) != 1 or len(groups[0]["params"]) != len(optimizers):
            raise ValueError(
                f"the optimizer state holds {sum(len(g['params']) for g in groups)} pieces in "
                f"{len(groups)} groups; this optimizer has {len(optimizers)} in one (saved with "
                "other memory options or another carry-on shape?)"
            )
        self.param_groups[0].update(
            {key: value for key, value in groups[0].items() if key != "params"}
        )
        for index, optimizer in enumerate(optimizers):
            group = {
                **optimizer.state_dict()["param_groups"][0],
                "lr": self.param_groups[0]["lr"],
                "weight_decay": self.param_groups[0]["weight_decay"],
            }
            slots = state_dict["state"].get(index)
            optimizer.load_state_dict(
                {"state": {0: slots} if slots else {}, "param_groups": [group]}
            )
