"""uda_ray: Ray-distributed hyperparameter search for unsupervised domain adaptation in segmentation.

The Python API (`uda_ray.sweep`, `resume`, `best`, `export_best`, `ls`, `train`, `pipeline`, `report`,
`validators`, `rerun`, `convert_weights`, `Sweep`, `show_progress`) lives in `uda_ray.api`; it is imported on
first use, so `import uda_ray` stays light (no torch, no ray).
"""

from typing import Any

__version__ = "0.1.0"
__all__ = ["Sweep", "best", "convert_weights", "export_best", "ls", "pipeline", "report", "rerun", "resume",
           "show_progress", "sweep", "train", "validators"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from uda_ray import api

        return getattr(api, name)
    raise AttributeError(f"module 'uda_ray' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
