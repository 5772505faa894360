"""Export stage: a trained checkpoint becomes a carry-on artifact in RUN_DIR/carryons/<name>/
(published as a whole on any store, `carryon_ray/storage.py`).

The checkpoint describes itself (`carryon_ray/loop.py`): the carry-on is rebuilt in the shape
it was trained in and with the layout it read, whatever the current config says, and the
artifact (`carryon_ray/artifacts.py`) is what the evaluate stage scores and the server loads.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

from carryon_ray.artifacts import WEIGHTS, artifact_files, save_carryon
from carryon_ray.loop import CheckpointInfo
from carryon_ray.stages.search import SearchResult
from carryon_ray.stages.train import TrainResult
from carryon_ray.storage import Location, location

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExportResult:
    name: str  # the model id a client asks for
    path: str
    parameters: int
    megabytes: float
    trained_steps: int

    def summary(self) -> dict:
        return asdict(self)


def export_stage(name: str, run_dir: Location, trained: TrainResult | SearchResult) -> ExportResult:
    """Write the artifact of `trained`'s checkpoint (a search: its best trial, as `<name>-best`)."""
    info = CheckpointInfo.read(trained.checkpoint)
    searched = isinstance(trained, SearchResult)
    name = trained.name if searched else name
    extra = {"name": name, "trained_steps": info.step, **({"search": trained.best} if searched else {})}
    carry_on = info.load()
    path = save_carryon(location(run_dir) / "carryons" / name, carry_on, info.layout, alpha=info.alpha,
                        extra=extra)
    logger.info("export: %s (%d parameters, step %d)", path, carry_on.num_parameters(), info.step)
    return ExportResult(
        name=name,
        path=path.uri,
        parameters=carry_on.num_parameters(),
        megabytes=(artifact_files(path) / WEIGHTS).size() / 2**20,
        trained_steps=info.step,
    )
