"""``ctmae study``: which corruption suits these scans, measured. Every point of a grid of pretraining settings is
pretrained on the same scans with the same seed and steps, then evaluated by ``ctmae evaluate`` on the same cases.

- ``grid.py``: the grid (``KEY=V1,V2`` or a YAML file), keys resolved to the config, every point checked.
- ``plan.py``: the points (stable index and name) and the manifest (study.json) tying a folder to its inputs.
- ``run.py``: pretrain and evaluate each point, skipping finished ones, recording failures, stopping on signals.
- ``report.py`` and ``chart.py``: study.md, study.json and study.png from whatever points are done.
"""

from ctmae.experiments.study.grid import GridError, load_grid_file, parse_grid
from ctmae.experiments.study.plan import MANIFEST, MAX_POINTS, Point, StudyMismatch, manifest, open_study, plan_points
from ctmae.experiments.study.report import gather
from ctmae.experiments.study.run import StudyHooks, run_study

__all__ = [
    "GridError",
    "MANIFEST",
    "MAX_POINTS",
    "Point",
    "StudyHooks",
    "StudyMismatch",
    "gather",
    "load_grid_file",
    "manifest",
    "open_study",
    "parse_grid",
    "plan_points",
    "run_study",
]
