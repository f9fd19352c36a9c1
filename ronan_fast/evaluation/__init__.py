"""Evaluation harness: the paper's Tables 2-8 reproduced offline on the model zoo.

``python -m ronan_fast.evaluation --config quick`` runs every table with few images and short
inversions (minutes on two CPU cores); ``--config full`` uses the paper's counts (a belonging
profile of 100 images, 100 belonging and 100 other images per cell). See
:mod:`ronan_fast.evaluation.__main__` for the options and :mod:`ronan_fast.evaluation.runner`
for how work is cached and resumed.

Programmatic use::

    from ronan_fast.evaluation import CONFIGS, Evaluation, build_cells
    from ronan_fast.evaluation.models import ZooModels

    models = ZooModels()
    plan = build_cells(CONFIGS["quick"], models)
    records = Evaluation(CONFIGS["quick"], "results/eval/quick", models).run(plan.cells)
"""

from ronan_fast.evaluation.config import CONFIGS, TABLES, Cell, EvalConfig, ImageSpec, build_cells, select_cells
from ronan_fast.evaluation.models import ModelSource, ZooModels
from ronan_fast.evaluation.runner import Evaluation, RunStats
from ronan_fast.evaluation.store import CacheWarning

__all__ = ["CONFIGS", "TABLES", "Cell", "EvalConfig", "ImageSpec", "build_cells", "select_cells", "ModelSource",
           "ZooModels", "Evaluation", "RunStats", "CacheWarning"]
