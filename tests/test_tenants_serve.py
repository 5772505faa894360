"""Per-tenant access through a deployed server and the official `openai` client: two tenants'
keys and an admin key from `serve.keys_file`, every cross-access refused exactly like an unknown
model (completions, chat, /v1/models, `name@version`), pinned versions, the per-key
concurrency limit answered 429 with Retry-After, and no key in any log."""

from __future__ import annotations

import time
from pathlib import Path

import openai
import pytest
import ray
import requests
import torch
from transformers import AutoTokenizer

from carryon_ray.access import hash_key
from carryon_ray.artifacts import load_carryon, publish_carryon
from carryon_ray.bases import FrozenBase
from carryon_ray.config import validate_config
from carryon_ray.stages.serve import deploy_stage
from tests.conftest import CHAT_TEMPLATE, save_endless_model
from tests.test_serve import MESSAGES, PROMPT, export_carryon, serve_section

pytestmark = pytest.mark.ray

ALICE, BOB, ADMIN = "sk-alice-0123456789", "sk-bob-0123456789", "sk-admin-0123456789"


@pytest.fixture(scope="module")
def endless_chat_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A tiny base that never ends a greedy answer early (zero EOS embedding), with a chat
    template: a stream that holds its key's slot as long as the test needs."""
    directory = save_endless_model(tmp_path_factory.mktemp("endless-chat"), tiny_tokenizer,
                                   hidden_size=64, layers=2)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tenants(local_ray, tmp_path_factory, endless_chat_dir) -> dict:
    """One deployment over a registry with alice, alice-math and bob; alice also has a newer
    version that is not current, pinned as `alice@VERSION`."""
    root = tmp_path_factory.mktemp("tenants")
    registry = root / "carryons"
    keys = root / "keys.yaml"
    keys.write_text(
        f'"{hash_key(ALICE)}": {{tenant: alice, models: [alice, "alice-*"], max_concurrent_requests: 1}}\n'
        f'"{hash_key(BOB)}": {{tenant: bob, models: [bob]}}\n'
        f'"{hash_key(ADMIN)}": {{tenant: ops, admin: true}}\n'
    )
    config = validate_config({
        "name": "tenants",
        "bases": [{"name": "endless", "path": str(endless_chat_dir)}],
        "data": {"max_length": 64},
        "serve": serve_section(registry=str(registry), keys_file=str(keys), max_new_tokens_limit=1000,
                               max_ongoing_requests=32),
    })
    base = FrozenBase(config.primary)
    for seed, name in enumerate(("alice", "alice-math", "bob"), 1):
        export_carryon(registry / name, base, seed=seed)
    pinned = publish_carryon_like(registry / "alice", base)
    # A carry-on whose only version was never promoted (its first did not beat the base).
    carry_on, layout, _ = load_carryon(registry / "alice")
    draft = publish_carryon(registry / "alice-draft", carry_on, layout, alpha=1.0).name
    deploy_stage(config.serve, root, bases=config.bases)
    url = f"http://127.0.0.1:{config.serve.port}"
    return {"url": url, "pinned": pinned, "draft": draft, "config": config}


def publish_carryon_like(directory: Path, base: FrozenBase) -> str:
    """A second version of a carry-on, published but not current."""
    carry_on, layout, artifact = load_carryon(directory)
    torch.nn.init.normal_(carry_on.delta.weight, std=2.0)
    return publish_carryon(directory, carry_on, layout, alpha=artifact["alpha"]).name


def client(tenants: dict, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{tenants['url']}/v1", api_key=key, max_retries=0, timeout=60)


def post(tenants: dict, key: str, path: str, **body) -> requests.Response:
    return requests.post(f"{tenants['url']}/v1/{path}", json=body, timeout=60,
                         headers={"Authorization": f"Bearer {key}"})


def test_models_lists_only_what_the_key_may_use(tenants):
    assert [m.id for m in client(tenants, ALICE).models.list()] == ["base", "alice", "alice-math"]
    assert [m.id for m in client(tenants, BOB).models.list()] == ["base", "bob"]
    assert [m.id for m in client(tenants, ADMIN).models.list()] == ["base", "alice", "alice-math", "bob"]
    with pytest.raises(openai.AuthenticationError):
        client(tenants, "sk-nobody").models.list()


def test_every_cross_access_is_refused_like_an_unknown_model(tenants):
    pinned = f"alice@{tenants['pinned']}"
    refused = {BOB: ["alice", "alice-math", pinned], ALICE: ["bob", f"bob@{tenants['pinned']}"]}
    for key, models in refused.items():
        openai_client = client(tenants, key)
        for model in models:
            with pytest.raises(openai.NotFoundError):
                openai_client.completions.create(model=model, prompt=PROMPT, max_tokens=4)
            with pytest.raises(openai.NotFoundError):
                openai_client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=4)
            with pytest.raises(openai.NotFoundError):
                openai_client.completions.create(model=model, prompt=PROMPT, max_tokens=4, stream=True)
            # Byte for byte the answer for a model that does not exist, save the name asked for.
            for path, body in (("completions", {"prompt": PROMPT}), ("chat/completions", {"messages": MESSAGES})):
                other = post(tenants, key, path, model=model, max_tokens=4, **body)
                unknown = post(tenants, key, path, model="zz-none", max_tokens=4, **body)
                assert other.status_code == unknown.status_code == 404
                assert other.text.replace(model, "zz-none") == unknown.text
                assert all(name not in unknown.text for name in ("alice", "bob"))  # no names listed


def test_own_models_pinned_versions_and_admin(tenants):
    alice = client(tenants, ALICE)
    current = alice.completions.create(model="alice", prompt=PROMPT, max_tokens=6, temperature=0)
    pinned = alice.completions.create(model=f"alice@{tenants['pinned']}", prompt=PROMPT, max_tokens=6,
                                      temperature=0)
    assert current.model == "alice" and pinned.model == f"alice@{tenants['pinned']}"
    assert current.choices[0].text != pinned.choices[0].text  # another version's weights
    assert alice.chat.completions.create(model="alice-math", messages=MESSAGES, max_tokens=4).choices
    assert alice.completions.create(model="base", prompt=PROMPT, max_tokens=2).choices
    with pytest.raises(openai.NotFoundError):
        alice.completions.create(model="alice@20200101T000000.000000000-0123abcd", prompt=PROMPT, max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        alice.completions.create(model="alice@latest", prompt=PROMPT, max_tokens=2)
    with pytest.raises(openai.NotFoundError):  # nothing current: not served by its name
        alice.completions.create(model="alice-draft", prompt=PROMPT, max_tokens=2)
    assert alice.completions.create(model=f"alice-draft@{tenants['draft']}", prompt=PROMPT, max_tokens=2).choices
    admin = client(tenants, ADMIN)
    assert admin.completions.create(model="bob", prompt=PROMPT, max_tokens=2).choices
    assert admin.completions.create(model=f"alice@{tenants['pinned']}", prompt=PROMPT, max_tokens=2).choices


def test_the_per_key_limit_answers_429_with_retry_after(tenants):
    body = {"model": "alice", "prompt": PROMPT, "max_tokens": 1000, "temperature": 0, "stream": True}
    held = requests.post(f"{tenants['url']}/v1/completions", json=body, stream=True, timeout=60,
                         headers={"Authorization": f"Bearer {ALICE}"})
    try:
        assert held.status_code == 200  # the stream runs (unread): alice's one slot is taken
        over = post(tenants, ALICE, "completions", model="alice", prompt=PROMPT, max_tokens=2)
        assert over.status_code == 429 and over.headers["Retry-After"] == "1", over.text
        assert over.json()["error"]["code"] == "rate_limit_exceeded"
        with pytest.raises(openai.RateLimitError):
            client(tenants, ALICE).chat.completions.create(model="alice", messages=MESSAGES, max_tokens=2)
        # Another key is not limited by alice's requests.
        assert post(tenants, BOB, "completions", model="bob", prompt=PROMPT, max_tokens=2).status_code == 200
    finally:
        held.close()
    deadline = time.time() + 60  # the slot comes back once the server sees the client gone
    while True:
        reply = post(tenants, ALICE, "completions", model="alice", prompt=PROMPT, max_tokens=2)
        if reply.status_code == 200 or time.time() > deadline:
            break
        time.sleep(0.5)
    assert reply.status_code == 200, reply.text


def test_no_key_reaches_a_log(tenants):
    for key in (ALICE, BOB, ADMIN):  # a wrong key is logged nowhere either
        post(tenants, key + "x", "completions", model="alice", prompt=PROMPT, max_tokens=2)
    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    for path in [p for p in logs.rglob("*") if p.is_file()]:
        text = path.read_bytes()
        assert all(key.encode() not in text for key in (ALICE, BOB, ADMIN)), path
