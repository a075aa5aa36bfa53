"""uda_ray: Ray-distributed hyperparameter search for unsupervised domain adaptation in segmentation.

The Python API is `uda_ray.api` (`from uda_ray import api`; `api.sweep`, `api.resume`, `api.best`, `api.train`,
`api.pipeline`, `api.report`, ...). The API names that are not also the names of submodules are re-exported
here (`uda_ray.sweep`, `uda_ray.best`, ...), imported on first use, so `import uda_ray` stays light (no torch,
no ray). `train`, `pipeline`, `report` and `validators` are not: `uda_ray.training.loop` etc. are modules, and importing
a submodule sets the package attribute of its name, which would hide a function of the same name.
"""

from typing import Any

__version__ = "0.1.0"
__all__ = ["Sweep", "best", "convert_weights", "export_best", "ls", "pareto", "rerun", "resume", "show_progress",
           "sweep"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from uda_ray import api

        return getattr(api, name)
    raise AttributeError(f"module 'uda_ray' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
