"""Who may use which model: API keys by their hashes, tenants, per-key concurrency.

`serve.keys_file` (YAML or JSON, local or any store) maps the sha256 hex digest of each API key
to what the key may use; the keys themselves are never stored, logged or printed:

    # carryon hash-key --tenant alice --models 'alice,alice-*' < key.txt  prints such a line
    "3c9909afec25354d551dae21590bb26e38d53f2173b8d3dc3eee4c047e7ab1c1":
      {tenant: alice, models: [alice, "alice-*"], max_concurrent_requests: 4}
    "<sha256 of another key>": {tenant: ops, admin: true}

The rule: a key may use `base` and the carry-ons whose names match one of its `models`
(exact names, or shell patterns with `*`: `alice-*`); `NAME@VERSION` follows NAME; an
`admin: true` key may use every model. `tenant` is a label for logs, never a secret. Another
tenant's model is answered exactly like an unknown one (`openai_api.model_not_found`).
`max_concurrent_requests` bounds a key's requests in flight on one replica (with N replicas a
key may hold up to N times as many); beyond it the answer is 429 with Retry-After.

Without a keys file, `serve.api_key` (or CARRYON_API_KEY) is one shared key that may use every
model, and without either the server is open.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import re
import threading
from dataclasses import dataclass, field

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from carryon_ray.openai_api import BASE_MODEL_ID, MODEL_ID, APIError
from carryon_ray.storage import location

KEY_HASH = re.compile(r"^[0-9a-f]{64}$")
MODEL_PATTERN = re.compile(r"^[A-Za-z0-9*][A-Za-z0-9_.*-]{0,127}$")
MAX_KEYS_FILE_BYTES = 16 * 2**20


def hash_key(key: str) -> str:
    """The sha256 hex digest of an API key (surrounding whitespace ignored): what the keys
    file holds."""
    return hashlib.sha256(key.strip().encode()).hexdigest()


class KeyEntry(BaseModel):
    """What one API key may use."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tenant: str
    models: tuple[str, ...] = ()
    admin: bool = False
    max_concurrent_requests: int | None = Field(None, gt=0)

    @field_validator("tenant")
    @classmethod
    def _tenant(cls, value: str) -> str:
        if not MODEL_ID.fullmatch(value):
            raise ValueError(f"tenant {value!r}: use letters, digits, '_', '.', '-'")
        return value

    @field_validator("models")
    @classmethod
    def _patterns(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        bad = [pattern for pattern in value if not MODEL_PATTERN.fullmatch(pattern) or ".." in pattern]
        if bad:
            raise ValueError(f"models {bad}: names or patterns of letters, digits, '_', '.', '-', '*'")
        return value

    @model_validator(mode="after")
    def _admin(self) -> KeyEntry:
        if self.admin and self.models:
            raise ValueError("an admin key may use every model: remove its `models`")
        return self


@dataclass(frozen=True)
class Caller:
    """The authenticated caller of one request."""

    tenant: str | None  # None: the shared key, or no authentication
    key_hash: str | None  # identifies the key for its concurrency limit (never the key)
    admin: bool
    models: tuple[str, ...] = ()
    max_concurrent_requests: int | None = None

    def may_use(self, model_id: str) -> bool:
        """Whether this caller may use `NAME` or `NAME@VERSION` (`base`: every caller)."""
        name = model_id.partition("@")[0]
        if self.admin or name == BASE_MODEL_ID:
            return True
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.models)


EVERYONE = Caller(tenant=None, key_hash=None, admin=True)


@dataclass(frozen=True)
class KeyTable:
    """The keys file, validated: key hash -> entry."""

    entries: dict[str, KeyEntry]

    def __repr__(self) -> str:  # hashes are not secrets, but a log needs no list of them
        return f"KeyTable({len(self.entries)} keys)"

    def caller(self, key: str) -> Caller | None:
        entry = self.entries.get(hash_key(key))
        if entry is None:
            return None
        return Caller(tenant=entry.tenant, key_hash=hash_key(key), admin=entry.admin,
                      models=entry.models, max_concurrent_requests=entry.max_concurrent_requests)


def load_keys(path: str) -> KeyTable:
    """Read and validate `serve.keys_file`; one ValueError naming the file and every problem."""
    where = location(path)
    if not where.is_file():
        raise FileNotFoundError(f"serve.keys_file {where} does not exist")
    if where.size() > MAX_KEYS_FILE_BYTES:
        raise ValueError(f"serve.keys_file {where} has more than {MAX_KEYS_FILE_BYTES} bytes")
    try:
        raw = yaml.safe_load(where.read_text())  # JSON is YAML
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ValueError(f"serve.keys_file {where} is not YAML or JSON: {error}") from None
    if not isinstance(raw, dict) or not raw:
        raise ValueError(
            f"serve.keys_file {where} must map sha256 hashes of API keys to entries "
            "({tenant, models, admin, max_concurrent_requests}); `carryon hash-key` prints one"
        )
    problems, entries = [], {}
    for digest, entry in raw.items():
        digest = str(digest).lower()
        if not KEY_HASH.fullmatch(digest):
            # Show only its start: a key pasted by mistake must not reach a log in full.
            problems.append(f"'{digest[:6]}...' is not a sha256 hex digest (64 hex characters): "
                            "`carryon hash-key` prints the hash of a key")
            continue
        try:
            entries[digest] = KeyEntry.model_validate(entry)
        except ValidationError as error:
            details = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'entry'}: {e['msg']}" for e in error.errors())
            problems.append(f"{digest[:12]}...: {details}")
    if problems:
        raise ValueError(f"serve.keys_file {where}: " + "; ".join(problems))
    return KeyTable(entries)


def bearer_token(authorization: str | None) -> str:
    """The token of `Authorization: Bearer <key>`; 401 when the header is missing or malformed."""
    if not authorization:
        raise APIError(401, "missing API key: send the header 'Authorization: Bearer <key>'",
                       code="invalid_api_key")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise APIError(401, "incorrect API key", code="invalid_api_key")
    return token.strip()


def authenticate(authorization: str | None, *, keys: KeyTable | None, shared_key: str | None) -> Caller:
    """The caller a request's Authorization header names: through the keys file when there is
    one, else the shared key, else everyone may use everything. 401 for a missing or unknown key."""
    if keys is None and shared_key is None:
        return EVERYONE
    token = bearer_token(authorization)
    if keys is not None:
        caller = keys.caller(token)
        if caller is None:
            raise APIError(401, "incorrect API key", code="invalid_api_key")
        return caller
    if not hmac.compare_digest(token.encode(), shared_key.encode()):
        raise APIError(401, "incorrect API key", code="invalid_api_key")
    return EVERYONE


@dataclass
class Slot:
    """One request in flight for a key; `release` is idempotent (also run when collected,
    should a stream never start)."""

    limits: ConcurrencyLimits | None
    key_hash: str | None

    def release(self) -> None:
        limits, self.limits = self.limits, None
        if limits is not None:
            limits._release(self.key_hash)

    def __del__(self) -> None:
        self.release()


@dataclass
class ConcurrencyLimits:
    """Requests in flight per key on this replica, bounded by each key's limit."""

    running: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def acquire(self, caller: Caller) -> Slot | None:
        """A slot for one request, or None when the key already has its limit in flight."""
        limit, key = caller.max_concurrent_requests, caller.key_hash
        if limit is None or key is None:
            return Slot(None, None)
        with self.lock:
            if self.running.get(key, 0) >= limit:
                return None
            self.running[key] = self.running.get(key, 0) + 1
        return Slot(self, key)

    def _release(self, key: str) -> None:
        with self.lock:
            left = self.running.get(key, 0) - 1
            if left > 0:
                self.running[key] = left
            else:
                self.running.pop(key, None)
