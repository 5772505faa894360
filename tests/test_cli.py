"""The `carryon` command: user errors are one clear line and exit status 2, no traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from carryon_ray.cli import main


def carryon(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "carryon_ray.cli", *args], check=False, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["validate", "--set", "train.bogus=1"], "train.bogus: unknown key"),
        (["validate", "--set", "carry_on.hidden_size=abc"], "carry_on.hidden_size"),
        (["validate", "/no/such.yaml"], "does not exist"),
        (["run", "--set", "bases.0.path=/no/such/model"], "/no/such/model"),
        (["run", "--set", "data.dataset=/no/such.jsonl"], "/no/such.jsonl"),
        (["run", "--stages", "train,search"], "both train and search"),
        (["run", "--stages", "export,embed"], "in pipeline order"),
        (["run", "--stages", "embed,export"], "list one of them before it"),
        (["run", "--stages", "evaluate", "--set", "run_dir=/no/such/run"], "embed stage first"),
        (["run", "--stages", "deploy", "--set", "run_dir=/no/such/run"], "carry-on registry"),
    ],
)
def test_user_errors_are_one_clear_line(args, message):
    done = carryon(*args)
    assert done.returncode == 2
    assert message in done.stderr
    assert "Traceback" not in done.stderr


def test_validate_prints_the_resolved_config(capsys):
    assert main(["validate", "--set", "train.max_steps=7"]) == 0
    assert '"max_steps": 7' in capsys.readouterr().out


def test_versions_and_rollback_move_the_registry_pointer(tmp_path, capsys):
    from carryon_ray.registry import decide_promotion
    from carryon_ray.storage import location

    carryon = location(tmp_path / "run" / "carryons" / "alice")
    versions = []
    for number, nll in ((1, 2.5), (2, 2.0)):
        source = tmp_path / f"v{number}"
        source.mkdir()
        (source / "config.json").write_text("{}")
        versions.append(carryon.publish_version(source))
        assert decide_promotion(carryon, versions[-1], nll_merged=nll, nll_base=3.0, tokens=8).promoted
    common = ["--set", f"run_dir={tmp_path / 'run'}"]
    assert main(["versions", "alice", *common]) == 0
    listing = capsys.readouterr().out
    assert f"| {versions[0]} |  | 2.5000 | 3.0000 | yes |" in listing
    assert f"| {versions[1]} | * | 2.0000 |" in listing
    assert main(["rollback", "alice", *common]) == 0
    assert f"{versions[1]} -> {versions[0]}" in capsys.readouterr().out
    assert carryon.current_version() == versions[0]
    assert main(["rollback", "alice", "--to", versions[1], *common]) == 0
    assert carryon.current_version() == versions[1]
    assert main(["rollback", "alice", "--to", "latest", *common]) == 2
    assert "not a version name" in capsys.readouterr().err
    assert main(["versions", "nobody", *common]) == 2


def test_hash_key_prints_a_keys_file_line_without_the_key():
    import hashlib

    import yaml

    done = subprocess.run([sys.executable, "-m", "carryon_ray.cli", "hash-key", "--tenant", "alice",
                           "--max-concurrent-requests", "2"], input="sk-alice-secret\n",
                          capture_output=True, text=True, timeout=120, check=True)
    assert "sk-alice-secret" not in done.stdout + done.stderr
    line = yaml.safe_load(done.stdout)
    digest = hashlib.sha256(b"sk-alice-secret").hexdigest()
    assert line == {digest: {"tenant": "alice", "models": ["alice", "alice-*"], "max_concurrent_requests": 2}}
