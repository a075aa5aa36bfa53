"""A sweep's Optuna study: its journal file, the space's Tune domains and Optuna distributions, and the
warm start from an earlier sweep's trials. Importing this module imports neither Ray nor Optuna."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from uda_ray.errors import UserError
from uda_ray.search.space import SearchSpace
from uda_ray.storage import layout, store

STUDY_FILE = "optuna_journal.log"
BASELINE_ATTR = "uda_ray_baseline"  # the user attribute of the baseline trial in the Optuna study


def tune_domains(space: SearchSpace) -> dict:
    """The Tune search space of `space`: {"params": {key: domain}}."""
    from ray import tune

    out = {}
    for k, p in space.params.items():
        if p.kind == "choice":
            out[k] = tune.choice(list(p.values))
        elif p.kind == "int":
            out[k] = tune.randint(p.values[0], p.values[1] + 1)  # inclusive upper bound
        elif p.kind == "loguniform":
            out[k] = tune.loguniform(*p.values)
        else:
            out[k] = tune.uniform(*p.values)
    return {"params": out}


def study_storage(sweep_dir: Path) -> Any:
    """The sweep's persisted Optuna storage: a journal file under the sweep folder (what optuna-dashboard opens);
    under a storage URI's staging folder, mirrored to the store after every append (uda_ray.search.journal)."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    path = Path(sweep_dir).absolute() / STUDY_FILE
    remote = store.located(path)
    if remote is None:
        return JournalStorage(JournalFileBackend(str(path)))
    from uda_ray.search.journal import MirroredJournalFileBackend

    rel = path.relative_to(remote.staging).as_posix()
    return JournalStorage(MirroredJournalFileBackend(str(path), remote.uri, rel))


def load_study(sweep_dir: Path) -> Any:
    """The Optuna study of a sweep (named after it), read from its journal file."""
    import optuna

    sweep_dir = Path(sweep_dir)
    if not (sweep_dir / STUDY_FILE).is_file():
        raise UserError(f"sweep '{sweep_dir.name}' has no Optuna study ({sweep_dir / STUDY_FILE} is missing)")
    return optuna.load_study(study_name=sweep_dir.name, storage=study_storage(sweep_dir))


def optuna_distributions(space: SearchSpace) -> dict[str, Any]:
    """The Optuna distributions OptunaSearch derives from the space (names `params/<key>`)."""
    from ray.tune.search.optuna import OptunaSearch

    return OptunaSearch.convert_search_space(tune_domains(space))


def _fits(value: Any, dist: Any) -> bool:
    import optuna

    if isinstance(dist, optuna.distributions.CategoricalDistribution):
        return value in dist.choices
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if isinstance(dist, optuna.distributions.IntDistribution) and value != int(value):
        return False
    return dist.low <= value <= dist.high


def warm_start_points(earlier_dir: Path, space: SearchSpace) -> tuple[list[dict], list[tuple[str, str]]]:
    """The finished trials of an earlier sweep that fit `space`, as Optuna trials to seed its study, and the
    (trial, reason) of those skipped. A completed trial brings its objective value(s) at its last evaluation
    (what the searcher is told); one stopped early by the scheduler comes as PRUNED with its intermediate
    values; errored and unfinished trials are skipped, as are trials whose parameters are not exactly the
    new space's or fall outside its ranges / choices."""
    from uda_ray.config import experiment_dict
    from uda_ray.results.tables import read_table
    from uda_ray.target_labels import row_marked, trains_on_target_gt

    earlier_dir = Path(earlier_dir)
    dists = optuna_distributions(space)
    metrics = [o.metric for o in space.objectives]
    # a UDA search is not seeded by runs that saw the target's labels (values learnt from an oracle)
    oracle_ok = trains_on_target_gt(experiment_dict(space.base))
    evals = read_table(layout.results_dir(earlier_dir), "evals")
    points, skipped = [], []
    for t in read_table(layout.results_dir(earlier_dir), "trials"):
        point = (_warm_start_point(t, earlier_dir.name, evals, dists, metrics) if oracle_ok or not row_marked(t)
                 else "trained on target ground truth (it would seed a UDA search with an oracle's values)")
        if isinstance(point, str):
            skipped.append((t["trial_id"], point))
        else:
            points.append(point)
    return points, skipped


def _warm_start_point(t: dict, earlier: str, evals: list[dict], dists: dict, metrics: list[str]) -> dict | str:
    """The Optuna trial (create_trial's arguments) of the earlier sweep's trial row `t`, or why it is skipped."""
    import optuna

    tid = t["trial_id"]
    if t["status"] not in ("completed", "stopped_early"):
        return f"status {t['status']}"
    params = {f"params/{k}": v for k, v in json.loads(t.get("params") or "{}").items()}
    if set(params) != set(dists):
        extra = sorted(k[len("params/"):] for k in set(params) - set(dists))
        missing = sorted(k[len("params/"):] for k in set(dists) - set(params))
        return ("parameters differ" + (f"; not searched now: {', '.join(extra)}" if extra else "")
                + (f"; not searched then: {', '.join(missing)}" if missing else ""))
    bad = [f"{k[len('params/'):]}={v!r}" for k, v in params.items() if not _fits(v, dists[k])]
    if bad:
        return f"outside the new space: {', '.join(bad)}"
    mine = sorted((e for e in evals if e["trial_id"] == tid), key=lambda e: e["step"])
    inter = {int(e["step"]): float(e[metrics[0]]) for e in mine
             if isinstance(e.get(metrics[0]), (int, float)) and e[metrics[0]] == e[metrics[0]]}
    attrs = {"warm_start_from": earlier, "warm_start_trial_id": tid}
    if t["status"] == "stopped_early":
        return dict(params=params, distributions=dists, state=optuna.trial.TrialState.PRUNED,
                    intermediate_values=inter if len(metrics) == 1 else None, user_attrs=attrs)
    last = mine[-1] if mine else {}
    values = [last.get(m) for m in metrics]
    if not all(isinstance(v, (int, float)) and v == v for v in values):
        missing = [m for m, v in zip(metrics, values) if not (isinstance(v, (int, float)) and v == v)]
        return f"no {', '.join(missing)} at its last evaluation"
    return dict(params=params, distributions=dists, state=optuna.trial.TrialState.COMPLETE,
                values=[float(v) for v in values],
                intermediate_values=inter if len(metrics) == 1 else None, user_attrs=attrs)


def seed_study(sweep_dir: Path, space: SearchSpace, points: list[dict]) -> Any:
    """Create the sweep's persisted study holding `points` (before the searcher loads it: same name, same
    storage, so TPE's first suggestions already see them)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "A new study created" line on the console
    study = optuna.create_study(storage=study_storage(sweep_dir), study_name=Path(sweep_dir).name,
                                directions=["maximize" if o.mode == "max" else "minimize" for o in space.objectives])
    for p in points:
        study.add_trial(optuna.trial.create_trial(**p))
    return study
