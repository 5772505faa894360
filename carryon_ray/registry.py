"""The carry-on registry's versions: scores, promotion, rollback.

A carry-on `NAME` in the registry (RUN_DIR/carryons or `serve.registry`) is
`NAME/.versions/<version>/` plus the pointer `NAME/CURRENT` (`carryon_ray/storage.py`). The
export stage adds a version without moving the pointer; the evaluate stage scores it and
writes `eval.json` beside its files (the held-out NLL of the base and of the merged model, and
the decision), then `decide_promotion` moves the pointer only when the new version's held-out
NLL beats the base's and the current version's recorded one (a current version without a
recorded score: the base's alone). A carry-on whose first version is not promoted has no
current version: the server answers 404 for `NAME` until one is promoted or a version is
promoted by hand (`carryon rollback NAME --to VERSION`); `NAME@VERSION` pins any stored one.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass

from carryon_ray.storage import Location, location

SCORE = "eval.json"
SCORE_FORMAT = "carryon_ray/eval-1"


@dataclass(frozen=True)
class Promotion:
    """What became of a new version: promoted or not, and why (for the summary)."""

    name: str
    version: str
    promoted: bool
    reason: str
    current: str | None  # the version the pointer names afterwards (None: nothing is served)

    def summary(self) -> dict:
        return asdict(self)


def write_score(carryon: str | Location, version: str, score: dict) -> None:
    """Record a version's held-out scores beside its files (one atomic write)."""
    where = location(carryon).version(version) / SCORE
    where.write_text(json.dumps({"format": SCORE_FORMAT, **score}, indent=2, sort_keys=True))


def read_score(carryon: str | Location, version: str) -> dict | None:
    """A version's recorded scores; None when it has none (published before scoring existed,
    by `save_carryon`, or never evaluated) or they are unreadable."""
    where = location(carryon).version(version) / SCORE
    if not where.is_file():
        return None
    try:
        score = json.loads(where.read_text())
    except ValueError:
        return None
    return score if isinstance(score, dict) and score.get("format") == SCORE_FORMAT else None


def decide_promotion(
    carryon: str | Location, version: str, *, nll_merged: float, nll_base: float, tokens: int
) -> Promotion:
    """Record the new version's scores and move the pointer to it when its held-out NLL beats
    the base's and the current version's (when that one has a recorded score)."""
    carryon = location(carryon)
    name = carryon.name
    previous = carryon.current_version()
    previous_score = None if previous in (None, version) else read_score(carryon, previous)
    if not nll_merged < nll_base:
        promoted = False
        reason = f"held-out NLL {nll_merged:.4f} does not beat the base's {nll_base:.4f}"
    elif previous_score is not None and not nll_merged < previous_score["nll_merged"]:
        promoted = False
        reason = (f"held-out NLL {nll_merged:.4f} does not beat the current version {previous}'s "
                  f"{previous_score['nll_merged']:.4f}")
    else:
        promoted = True
        reason = f"held-out NLL {nll_merged:.4f} beats the base's {nll_base:.4f}"
        if previous_score is not None:
            reason += f" and the previous version {previous}'s {previous_score['nll_merged']:.4f}"
        elif previous not in (None, version):
            reason += f" (the previous version {previous} has no recorded score)"
    if not promoted:
        if previous is None:
            reason += f"; '{name}' has no current version, so the server does not serve it (404) " \
                      f"until one is promoted (`carryon rollback {name} --to {version}` forces it)"
        elif previous != version:
            reason += f"; {previous} stays current"
        else:
            reason += "; it was current already and stays so (`carryon rollback` moves the pointer)"
    write_score(carryon, version, {"nll_merged": nll_merged, "nll_base": nll_base, "tokens": tokens,
                                   "promoted": promoted, "reason": reason,
                                   "evaluated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    if promoted:
        carryon.promote(version)
    return Promotion(name=name, version=version, promoted=promoted, reason=reason,
                     current=version if promoted else previous)


def version_table(carryon: str | Location) -> list[dict]:
    """Every stored version, oldest first, with its scores and whether it is current."""
    carryon = location(carryon)
    if not carryon.exists():
        raise FileNotFoundError(f"no carry-on at {carryon}; `carryon run` exports one")
    current = carryon.current_version()
    rows = []
    for version in carryon.versions():
        score = read_score(carryon, version) or {}
        rows.append({"version": version, "current": version == current,
                     "nll_merged": score.get("nll_merged"), "nll_base": score.get("nll_base"),
                     "promoted": score.get("promoted"), "reason": score.get("reason")})
    return rows


def rollback(carryon: str | Location, to: str | None = None) -> tuple[str | None, str]:
    """Move the pointer to `to`, or to the newest version older than the current one that
    evaluation did not refuse; returns (previous current, new current)."""
    carryon = location(carryon)
    versions = carryon.versions()
    current = carryon.current_version()
    if to is None:
        older = [v for v in versions if current is not None and v < current
                 and (read_score(carryon, v) or {}).get("promoted", True)]
        if not older:
            raise ValueError(
                f"{carryon.name}: no earlier version to roll back to (current: {current}, versions: "
                f"{versions or 'none'}); name one with --to"
            )
        to = older[-1]
    elif to not in versions:
        carryon.version(to)  # a malformed name: ValueError naming the format
        raise ValueError(f"{carryon.name} has no version {to!r}; its versions: {versions or 'none'}")
    carryon.promote(to)
    return current, to
