"""lm_eval task YAMLs for the packaged data (`carryon eval --tasks`); `TASKS_DIR` is this folder."""

from pathlib import Path

TASKS_DIR = Path(__file__).parent
