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
