"""A sweep trial's experiment: the sweep's base config with the trial's sampled parameters applied."""

from __future__ import annotations

from uda_ray.config import experiment_dict
from uda_ray.config_loader import apply_overrides


def experiment_of(base_raw: dict, params: dict) -> dict:
    """The resolved experiment (the dict the results tables record) of `base_raw` with `params` applied,
    built through the registries (this imports torch: not for code that only reads tables)."""
    from uda_ray.build import build_experiment  # the registries (torch)

    return experiment_dict(build_experiment(apply_overrides(base_raw, params), "trial"))
