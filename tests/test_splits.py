"""Splits: deterministic by file name, disjoint, recorded beside the run."""

from __future__ import annotations

import json
import random

import pytest

from tests.conftest import tiny_experiment
from uda_ray.build import build_experiment
from uda_ray.data.loading import build_datasets, names_of, splits_of
from uda_ray.data.splits import make_splits
from uda_ray.errors import ConfigError

KW = dict(source_val_fraction=0.1, target_holdout_fraction=0.2, selection_labeled=3, seed=0)


def test_splits_are_disjoint_deterministic_and_independent_of_listing_order():
    src = [f"{i:05d}.png" for i in range(50)]
    tgt = [f"train/c/{i}_leftImg8bit.png" for i in range(40)]
    a = make_splits(src, tgt, ["val/x.png"], **KW)
    rs, rt = src[:], tgt[:]
    random.Random(1).shuffle(rs)
    random.Random(2).shuffle(rt)
    assert make_splits(rs, rt, ["val/x.png"], **KW) == a
    assert a.counts() == {"source_train": 45, "source_val": 5, "target_train": 29, "target_holdout": 8,
                          "selection": 3, "test": 1}
    assert set(a.source_train) | set(a.source_val) == set(src) and not set(a.source_train) & set(a.source_val)
    parts = [set(a.target_train), set(a.target_holdout), set(a.selection)]
    assert set().union(*parts) == set(tgt) and sum(map(len, parts)) == len(tgt)
    # another split seed gives other (still disjoint) splits
    assert make_splits(src, tgt, [], **{**KW, "seed": 1}).target_holdout != a.target_holdout


def test_a_new_file_does_not_reshuffle_the_others():
    tgt = [f"{i}.png" for i in range(100)]
    a = make_splits(["s1", "s2", "s3"], tgt, [], **KW)
    b = make_splits(["s1", "s2", "s3"], tgt + ["zzz.png"], [], **KW)
    assert len(set(a.target_holdout) & set(b.target_holdout)) >= len(a.target_holdout) - 1


def test_a_selection_split_larger_than_its_pool_is_rejected():
    with pytest.raises(ConfigError, match="selection_labeled=9"):
        make_splits(["a", "b"], [f"{i}" for i in range(10)], [], **{**KW, "selection_labeled": 9})


def test_run_datasets_follow_the_splits(synth_root):
    cfg = build_experiment(tiny_experiment(synth_root, **{"data.selection_labeled": 2})).data
    sp = splits_of(cfg)
    ds = build_datasets(cfg, source=True, target=True, target_labels=False, splits=sp)
    assert names_of(ds["src"]) == sp.source_train and names_of(ds["src_val"]) == sp.source_val
    assert names_of(ds["tgt"]) == sp.target_train and names_of(ds["holdout"]) == sp.target_holdout
    assert names_of(ds["sel"]) == sp.selection and len(ds["test"]) == 4
    assert (ds["sel"][0]["lbl"] != 255).any() and (ds["holdout"][0]["lbl"] == 255).all()  # holdout: unlabeled
    assert json.loads(json.dumps(sp.counts())) == {"source_train": 11, "source_val": 1, "target_train": 9,
                                                   "target_holdout": 1, "selection": 2, "test": 4}
