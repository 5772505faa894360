"""Per-tenant access without a server: the keys file, who may use which model, 401s, and the
per-key concurrency slots."""

from __future__ import annotations

import json

import pytest

from carryon_ray.access import EVERYONE, ConcurrencyLimits, authenticate, hash_key, load_keys
from carryon_ray.openai_api import APIError

ALICE, BOB, ADMIN = "sk-alice-1", "sk-bob-2", "sk-admin-3"


@pytest.fixture()
def keys(tmp_path):
    path = tmp_path / "keys.yaml"
    path.write_text(
        f'"{hash_key(ALICE)}": {{tenant: alice, models: [alice, "alice-*"], max_concurrent_requests: 1}}\n'
        f'"{hash_key(BOB)}": {{tenant: bob, models: [bob]}}\n'
        f'"{hash_key(ADMIN)}": {{tenant: ops, admin: true}}\n'
    )
    return load_keys(str(path))


def test_a_key_may_use_base_and_its_own_models_only(keys):
    alice = authenticate(f"Bearer {ALICE}", keys=keys, shared_key=None)
    assert alice.tenant == "alice"
    assert [alice.may_use(m) for m in ("base", "alice", "alice-math", "alice@20260101T120000.000000000-0123abcd",
                                       "bob", "alicex", "bob-alice")] == [True, True, True, True, False, False, False]
    admin = authenticate(f"bearer {ADMIN}", keys=keys, shared_key=None)
    assert admin.may_use("bob") and admin.may_use("anything")


@pytest.mark.parametrize("header", [None, "", "Bearer", "Basic sk-alice-1", "Bearer sk-nobody", f"Bearer {hash_key(ALICE)}"])
def test_missing_or_unknown_keys_are_401(keys, header):
    with pytest.raises(APIError) as refused:
        authenticate(header, keys=keys, shared_key=None)
    assert refused.value.status == 401


def test_the_shared_key_and_no_key(keys):
    assert authenticate("Bearer s3cret", keys=None, shared_key="s3cret") is EVERYONE
    with pytest.raises(APIError):
        authenticate("Bearer other", keys=None, shared_key="s3cret")
    assert authenticate(None, keys=None, shared_key=None) is EVERYONE


def test_keys_file_problems_are_named_without_the_keys(tmp_path):
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"sk-pasted-the-key-itself": {"tenant": "a"},
                                hash_key("x"): {"tenant": "a", "models": ["../b"], "bogus": 1},
                                hash_key("y"): {"tenant": "ops", "admin": True, "models": ["a"]}}))
    with pytest.raises(ValueError) as error:
        load_keys(str(path))
    message = str(error.value)
    assert "sk-pas..." in message and "sk-pasted-the-key-itself" not in message
    assert "bogus" in message and "models" in message and "admin key" in message
    with pytest.raises(FileNotFoundError):
        load_keys(str(tmp_path / "none.yaml"))


def test_concurrency_slots_per_key(keys):
    limits = ConcurrencyLimits()
    alice = authenticate(f"Bearer {ALICE}", keys=keys, shared_key=None)
    bob = authenticate(f"Bearer {BOB}", keys=keys, shared_key=None)
    held = limits.acquire(alice)
    assert held is not None and limits.acquire(alice) is None  # limit 1
    assert all(limits.acquire(bob) is not None for _ in range(5))  # no limit
    held.release()
    held.release()  # idempotent
    again = limits.acquire(alice)
    assert again is not None
    del again  # a slot never released by hand is given back when collected
    assert limits.acquire(alice) is not None
    assert repr(keys) == "KeyTable(3 keys)"


def test_a_shared_key_and_a_keys_file_are_one_or_the_other():
    from carryon_ray.config import ServeSpec

    with pytest.raises(ValueError, match="not both"):
        ServeSpec(api_key="sk-1", keys_file="keys.yaml")
    assert ServeSpec(keys_file="keys.yaml").api_key is None
