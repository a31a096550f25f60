"""``ctmae evaluate``: what pretraining buys, measured three ways on a labelled dataset.

- ``probe`` (``probe.py``): a linear classifier per token on frozen features; Dice on fixed test cases, for each
  checkpoint, randomly initialised encoders of the same size (the mean of ``EvalSettings.probe_draws``) and the
  raw intensity of each patch (the floor).
- ``fewshot`` (``fewshot.py``): fine-tuning with k labelled cases, pretrained and from scratch, repeated.
- ``recon`` (``recon.py``): masked-voxel PSNR of the MAE next to trivial fills under the same block / random masks.

``cases.py`` splits and prepares the labelled cases, ``subjects.py`` lists what is compared and the units of work,
``runner.py`` runs them (journalled in ``journal.py``, resumable), ``report.py`` and ``chart.py`` write the report.
"""

from ctmae.experiments.evaluate.cases import EvalCases, check_cases, split_cases
from ctmae.experiments.evaluate.journal import ResumeMismatch
from ctmae.experiments.evaluate.report import OUTPUTS
from ctmae.experiments.evaluate.runner import JOURNAL, Progress, run_evaluation
from ctmae.experiments.evaluate.settings import PROTOCOLS, EvalSettings
from ctmae.experiments.evaluate.subjects import load_subjects

__all__ = [
    "EvalCases",
    "EvalSettings",
    "JOURNAL",
    "OUTPUTS",
    "PROTOCOLS",
    "Progress",
    "ResumeMismatch",
    "check_cases",
    "load_subjects",
    "run_evaluation",
    "split_cases",
]
