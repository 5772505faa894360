"""Export stage: a trained checkpoint becomes a new version of the carry-on artifact
RUN_DIR/carryons/<name>/ (published as a whole on any store, `carryon_ray/storage.py`), not yet
current: the evaluate stage scores it and promotes it or not (`carryon_ray/registry.py`).

The checkpoint describes itself (`carryon_ray/loop.py`): the carry-on is rebuilt in the shape
it was trained in and with the layout it read, whatever the current config says, and the
artifact (`carryon_ray/artifacts.py`) is what the evaluate stage scores and the server loads.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

from carryon_ray.artifacts import WEIGHTS, publish_carryon
from carryon_ray.loop import CheckpointInfo
from carryon_ray.stages.search import SearchResult
from carryon_ray.stages.train import TrainResult
from carryon_ray.storage import Location, location

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExportResult:
    name: str  # the model id a client asks for
    path: str  # the new version's files (what evaluate scores; `load_carryon` reads it)
    version: str  # its name in the registry (`name@version` pins it when serving)
    carryon: str  # the carry-on's registry entry (its pointer names the current version)
    parameters: int
    megabytes: float
    trained_steps: int

    def summary(self) -> dict:
        return asdict(self)


def export_stage(name: str, run_dir: Location, trained: TrainResult | SearchResult) -> ExportResult:
    """Publish the artifact of `trained`'s checkpoint as a new version, not current (a search:
    its best trial, as `<name>-best`)."""
    info = CheckpointInfo.read(trained.checkpoint)
    searched = isinstance(trained, SearchResult)
    name = trained.name if searched else name
    extra = {"name": name, "trained_steps": info.step, **({"search": trained.best} if searched else {})}
    carry_on = info.load()
    carryon = location(run_dir) / "carryons" / name
    path = publish_carryon(carryon, carry_on, info.layout, alpha=info.alpha, extra=extra)
    logger.info("export: %s (%d parameters, step %d; not current until evaluated)", path,
                carry_on.num_parameters(), info.step)
    return ExportResult(
        name=name,
        path=path.uri,
        version=path.name,
        carryon=carryon.uri,
        parameters=carry_on.num_parameters(),
        megabytes=(path / WEIGHTS).size() / 2**20,
        trained_steps=info.step,
    )
