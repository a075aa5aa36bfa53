"""uda_ray: Ray-distributed hyperparameter search for unsupervised domain adaptation in segmentation.

The Python API is `uda_ray.api` (`from uda_ray import api`; `api.sweep`, `api.resume`, `api.best`, `api.train`,
`api.pipeline`, `api.report`, ...). Its main functions are re-exported here (`uda_ray.sweep`, `uda_ray.train`,
...), imported on first use, so `import uda_ray` stays light (no torch, no ray). No submodule of the package
may share a name with them: importing a submodule sets the package attribute of its name, which would hide
the function (the code lives in folders, uda_ray.training, uda_ray.pipelines, uda_ray.results, ..., whose
names differ from the functions').
"""

from typing import Any

__version__ = "0.1.0"
__all__ = ["Sweep", "best", "convert_weights", "evaluate", "export_best", "ls", "pareto", "pipeline", "report",
           "rerun", "resume", "show_progress", "sweep", "train", "validators"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from uda_ray import api

        return getattr(api, name)
    raise AttributeError(f"module 'uda_ray' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
