"""The splits of a run, so that nothing is selected on the test set.

    source_train     source images the model trains on
    source_val       a held-out fraction of the source set (labeled): src_val/... metrics
    target_train     target train images used for adaptation (their labels, if any, are not used)
    target_holdout   a held-out fraction of target train, UNLABELED for the run: the label-free
                     validators (uv/...) are computed on it
    selection        optionally N LABELED images of target train (never the test split): sel/miou, the
                     "few target labels" protocol
    test             the target test split (Cityscapes val): test/... metrics, reported, never used to select
                     unless a user names a test/ metric

Assignment is by file name: each name gets a seeded SHA-1 rank per split, and a split takes the names of
lowest rank. So it is deterministic, does not depend on the order files are listed in, and the splits are
disjoint by construction. The lists are written beside every run (splits.json).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from uda_ray.errors import ConfigError

SPLITS_FILE = "splits.json"


def _rank(name: str, seed: int, salt: str) -> str:
    return hashlib.sha1(f"{seed}\0{salt}\0{name}".encode()).hexdigest()


def take(names: Iterable[str], n: int, seed: int, salt: str) -> list[str]:
    """The `n` names of lowest seeded rank (sorted by name)."""
    return sorted(sorted(set(names), key=lambda x: (_rank(x, seed, salt), x))[:n])


def count_of(fraction: float, total: int, key: str, cap: int | None = None) -> int:
    """round(fraction * total), at least 1, at most `cap`; it must leave at least one image for training."""
    n = max(1, round(fraction * total))
    n = min(n, cap) if cap else n
    if n >= total:
        raise ConfigError(f"{key}={fraction}: {n} of {total} image(s) held out leaves none to train on")
    return n


@dataclass(frozen=True)
class Splits:
    source_train: list[str]
    source_val: list[str]
    target_train: list[str]
    target_holdout: list[str]
    selection: list[str]
    test: list[str]
    seed: int

    def counts(self) -> dict[str, int]:
        return {k: len(v) for k, v in asdict(self).items() if isinstance(v, list)}

    def write(self, run_dir: Path) -> Path:
        p = Path(run_dir) / SPLITS_FILE
        tmp = p.with_name(f".{p.name}.tmp")
        tmp.write_text(json.dumps({**asdict(self), "counts": self.counts()}, indent=1) + "\n")
        tmp.replace(p)
        return p


def make_splits(source: Iterable[str], target: Iterable[str], test: Iterable[str], *, source_val_fraction: float,
                target_holdout_fraction: float, selection_labeled: int, seed: int, held_out_max: int | None = None
                ) -> Splits:
    """Names of each split. The source val and target holdout splits take their fraction of the set, at
    most `held_out_max` images each; `selection` is drawn from what is left of target train after the
    holdout, and must leave at least one image for adaptation."""
    source, target = sorted(set(source)), sorted(set(target))
    n_sv = count_of(source_val_fraction, len(source), "data.source_val_fraction", held_out_max)
    n_th = count_of(target_holdout_fraction, len(target), "data.target_holdout_fraction", held_out_max)
    src_val = take(source, n_sv, seed, "source_val")
    holdout = take(target, n_th, seed, "target_holdout")
    pool = sorted(set(target) - set(holdout))
    if selection_labeled < 0:
        raise ConfigError(f"data.selection_labeled must be >= 0, got {selection_labeled}")
    if selection_labeled >= len(pool):
        raise ConfigError(f"data.selection_labeled={selection_labeled}: the labeled selection split comes from "
                          f"target train, which has {len(pool)} image(s) after the validator holdout (at least "
                          "one must stay for adaptation)")
    sel = take(pool, selection_labeled, seed, "selection")
    return Splits(source_train=sorted(set(source) - set(src_val)), source_val=src_val,
                  target_train=sorted(set(pool) - set(sel)), target_holdout=holdout, selection=sel,
                  test=sorted(set(test)), seed=seed)
