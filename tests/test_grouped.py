"""Many tenants trained together through one shared frozen head (no Ray): each tenant ends
exactly where training it alone ends, a failing tenant leaves the others untouched, and a
grouped checkpoint resumes as if it never stopped."""

from __future__ import annotations

import dataclasses

import pyarrow as pa
import pytest
import torch

from carryon_ray.bases import OutputHead
from carryon_ray.config import CarryOnSpec, TrainSpec
from carryon_ray.grouped import GroupedLoop, GroupMember
from carryon_ray.loop import TrainLoop, carry_on_config, table_batches
from carryon_ray.quantized_head import QuantizedHead
from carryon_ray.records import Batch, LayerRef, Layout, encode_rows, to_table
from carryon_ray.training import train_step

D, V, ROWS = 16, 40, 12
FINAL = LayerRef("tiny", 2, D)
LAYOUT = Layout.build(codec="absmax", residual=(FINAL, 8), sources=[(FINAL, 4)],
                      bases=[{"name": "tiny", "fingerprint": "f00d", "tokenizer": "abcd"}])
SMALL = CarryOnSpec(hidden_size=16, num_layers=1, num_heads=2, max_positions=32)
LARGER = CarryOnSpec(hidden_size=32, num_layers=2, num_heads=4, max_positions=32)


def _table(seed: int) -> pa.Table:
    generator = torch.Generator().manual_seed(seed)
    lengths = [4 + (row + seed) % 5 for row in range(ROWS)]
    input_ids = [torch.randint(1, V, (n,), generator=generator).tolist() for n in lengths]
    masks = [[0] + [1] * (n - 1) for n in lengths]
    hidden = {FINAL.key: [torch.randn(n, D, generator=generator) for n in lengths]}
    columns = encode_rows(LAYOUT, ids=[f"{row:06d}" for row in range(ROWS)], input_ids=input_ids,
                          target_masks=masks, hidden=hidden)
    return to_table(LAYOUT, columns)


TABLES = {"alpha": _table(0), "beta": _table(1)}


def _head() -> OutputHead:
    generator = torch.Generator().manual_seed(1)
    return OutputHead(torch.randn(V, D, generator=generator) * 0.3, torch.randn(V, generator=generator))


def _member(tenant: str, shape: CarryOnSpec = SMALL, *, seed: int, total: int = 7, alpha: float = 1.0,
            lr: float = 3e-3, grad_clip: float | None = 0.05) -> GroupMember:
    # A small grad_clip, so that clipping acts on every step.
    spec = TrainSpec(batch_size=4, learning_rate=lr, warmup_steps=2, checkpoint_every=3, grad_clip=grad_clip,
                     seed=seed)
    return GroupMember(tenant, carry_on_config(shape, LAYOUT), alpha, spec, total)


def _batches(member: GroupMember, epoch: int, *, poison_at: int | None = None):
    """The tenant's seeded batches of one epoch; `poison_at`: that batch's residual is NaN."""
    for index, batch in enumerate(table_batches(LAYOUT, TABLES[member.tenant], member.spec.batch_size,
                                                seed=member.spec.seed, epoch=epoch)):
        if poison_at is not None and (epoch, index) == divmod(poison_at, 3):
            batch = dataclasses.replace(batch, residual=torch.full_like(batch.residual, float("nan")))
        yield batch


def _alone(member: GroupMember, head) -> tuple[TrainLoop, list[float]]:
    torch.manual_seed(member.spec.seed)  # as the single-tenant worker does
    loop = TrainLoop(member.carry_on, LAYOUT, head, member.spec, alpha=member.alpha, total_steps=member.total_steps)
    losses = []
    loop.run(lambda epoch: _batches(member, epoch), on_record=lambda record, periodic: losses.append(record["loss"]))
    return loop, losses


def _together(members: list[GroupMember], head, *, poison: dict[str, int] | None = None,
              stop_at: int | None = None, loop: GroupedLoop | None = None) -> tuple[GroupedLoop, dict, list]:
    loop = loop or GroupedLoop(members, LAYOUT, head, loss_chunk=5)  # chunks straddle tenants
    by_tenant = {member.tenant: member for member in members}
    losses: dict[str, list[float]] = {member.tenant: [] for member in members}
    records = []

    def on_record(tenant: str, record: dict, periodic: bool) -> bool:
        losses[tenant].append(record["loss"])
        records.append((record, periodic))
        return stop_at is not None and record["step"] >= stop_at

    loop.run(lambda tenant, epoch: _batches(by_tenant[tenant], epoch, poison_at=(poison or {}).get(tenant)),
             on_record=on_record, validate=lambda tenant: {"nll_base": 2.0, "nll_merged": 1.0})
    return loop, losses, records


def _assert_same_weights(one: torch.nn.Module, other: torch.nn.Module) -> None:
    for name, tensor in one.state_dict().items():
        torch.testing.assert_close(other.state_dict()[name], tensor, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "members",
    [
        [_member("alpha", seed=0), _member("beta", seed=5, lr=1e-2)],
        # Per-tenant overrides: another shape, alpha and length of run.
        [_member("alpha", seed=0), _member("beta", LARGER, seed=5, total=5, alpha=0.5)],
    ],
    ids=["same-shape", "other-shape"],
)
def test_each_tenant_trained_together_ends_where_training_it_alone_ends(members):
    head = _head()
    grouped, losses, records = _together(members, head)
    assert not grouped.failed
    for member in members:
        loop, alone_losses = _alone(member, head)
        together = grouped.loops[member.tenant]
        assert together.state.step == loop.state.step == member.total_steps
        assert (together.state.epoch, together.state.tokens) == (loop.state.epoch, loop.state.tokens)
        assert losses[member.tenant] == pytest.approx(alone_losses, abs=1e-5)
        _assert_same_weights(loop.carry_on, together.carry_on)
    assert grouped.loops["alpha"].head is grouped.loops["beta"].head is head  # never copied
    periodic = [(record["tenant"], record["step"]) for record, is_periodic in records if is_periodic]
    assert ("alpha", 3) in periodic and ("alpha", 7) in periodic and all("val_nll_merged" in r for r, p in records if p)


def test_a_tenant_with_a_non_finite_loss_fails_alone():
    members = [_member("alpha", seed=0), _member("beta", seed=5)]
    head = _head()
    grouped, losses, _ = _together(members, head, poison={"beta": 4})  # beta's 5th batch is NaN
    assert list(grouped.failed) == ["beta"] and "step 5" in grouped.failed["beta"]
    assert grouped.loops["beta"].state.step == 4 and len(losses["beta"]) == 4
    assert all(torch.isfinite(p).all() for p in grouped.loops["beta"].carry_on.parameters())  # it never stepped
    loop, alone_losses = _alone(members[0], head)
    assert losses["alpha"] == pytest.approx(alone_losses, abs=1e-5)
    _assert_same_weights(loop.carry_on, grouped.loops["alpha"].carry_on)


def test_a_restored_group_trains_exactly_as_one_that_never_stopped(tmp_path):
    members = [_member("alpha", seed=0), _member("beta", seed=5, total=5)]
    head = _head()
    whole, whole_losses, _ = _together(members, head)
    first, before, _ = _together(members, head, stop_at=4)
    first.save(tmp_path / "group")
    resumed = GroupedLoop(members, LAYOUT, head, loss_chunk=5)
    assert resumed.restore(tmp_path / "group") == {"alpha": 4, "beta": 4}
    _, after, _ = _together(members, head, loop=resumed)
    for member in members:
        assert before[member.tenant] + after[member.tenant] == pytest.approx(whole_losses[member.tenant], abs=1e-6)
        _assert_same_weights(whole.loops[member.tenant].carry_on, resumed.loops[member.tenant].carry_on)
    # A checkpoint holding some of the members restores those; the others start fresh.
    wider = GroupedLoop([*members, _member("gamma", seed=9)], LAYOUT, head)
    assert wider.restore(tmp_path / "group") == {"alpha": 4, "beta": 4}
    assert wider.loops["gamma"].state.step == 0


def test_a_quantized_head_gives_each_tenant_its_alone_loss_and_step():
    head = QuantizedHead.from_head(_head(), "nf4")
    head.rows_per_block = 7  # several vocabulary blocks, the last one short
    # No clipping for beta: its gradient itself (not only its direction) must be its alone one.
    members = [_member("alpha", seed=0), _member("beta", LARGER, seed=5, alpha=0.5, grad_clip=None)]
    batches = {member.tenant: next(_batches(member, 0)) for member in members}
    grouped = GroupedLoop(members, LAYOUT, head, loss_chunk=6)
    results = grouped.step(batches)
    for member in members:
        torch.manual_seed(member.spec.seed)
        alone = TrainLoop(member.carry_on, LAYOUT, head, member.spec, alpha=member.alpha, total_steps=7)
        alone.schedule_lr()
        loss, count = train_step(alone.carry_on, head, batches[member.tenant], alone.optimizer,
                                 alpha=member.alpha, grad_clip=member.spec.grad_clip)
        assert results[member.tenant][0] == pytest.approx(loss, abs=1e-5)
        assert results[member.tenant][1] == count
        together = grouped.loops[member.tenant].carry_on
        for name, parameter in alone.carry_on.named_parameters():
            torch.testing.assert_close(together.get_parameter(name).grad, parameter.grad, atol=1e-6, rtol=1e-5)
        _assert_same_weights(alone.carry_on, grouped.loops[member.tenant].carry_on)


def test_members_that_cannot_share_a_head_pass_are_refused():
    autocast = dataclasses.replace(_member("beta", seed=1), spec=TrainSpec(autocast="bfloat16"))
    with pytest.raises(ValueError, match="agree on train.autocast"):
        GroupedLoop([_member("alpha", seed=0), autocast], LAYOUT, _head())
    with pytest.raises(ValueError, match="not a safe directory name"):
        GroupedLoop([_member("../x", seed=0)], LAYOUT, _head())
    grouped = GroupedLoop([_member("alpha", seed=0)], LAYOUT, _head())
    with pytest.raises(ValueError, match="no member for tenants"):
        grouped.step({"nobody": Batch(*[torch.zeros(1)] * 4, [])})
