"""The metric registry: names, modes, schema-1 compatibility."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from uda_ray.errors import ConfigError
from uda_ray.metric_names import DEFAULT_SELECTION, LABEL_FREE, check_metric, mode_of, needs_test_labels
from uda_ray.results.queries import best_trials
from uda_ray.results.tables import read_table


def test_modes_come_from_the_registry():
    assert mode_of("test/miou") == "max" and mode_of("uv/entropy") == "min" and mode_of("uv/snd") == "max"
    assert mode_of("test/iou/road") == "max" and mode_of("train/loss/seg_src") == "min"
    assert mode_of("model/gflops") == "min" and mode_of("src_val/miou") == "max"


def test_unknown_metric_is_a_config_error_listing_the_valid_names():
    with pytest.raises(ConfigError, match=r"unknown metric 'uv/nope' \(valid: .*src_val/miou.*uv/snd"):
        check_metric("uv/nope", "objective.metric")
    with pytest.raises(ConfigError, match="cannot rank"):
        check_metric("train/lr")


def test_default_selection_is_label_free():
    assert DEFAULT_SELECTION in LABEL_FREE and not needs_test_labels(DEFAULT_SELECTION)
    assert needs_test_labels("test/miou") and needs_test_labels("test/iou/road")


def test_schema_1_names_map_to_test():
    assert check_metric("val/miou16") == "test/miou16"


def test_schema_1_tables_are_read_with_test_columns(tmp_path):
    trials = [{"schema_version": 1, "trial_id": "a", "method": "m", "objective": "val/miou", "mode": "max",
               "best_val_miou": 0.4}, {"schema_version": 1, "trial_id": "b", "method": "m",
                                       "objective": "val/miou", "mode": "max", "best_val_miou": 0.2}]
    evals = [{"schema_version": 1, "trial_id": t, "step": s, "val/miou": v, "checkpoint_path": f"/{t}/{s}"}
             for t, s, v in (("a", 2, 0.4), ("a", 4, 0.3), ("b", 2, 0.2))]
    pq.write_table(pa.Table.from_pylist(trials), tmp_path / "trials.parquet")
    pq.write_table(pa.Table.from_pylist(evals), tmp_path / "evals.parquet")
    (t,) = [r for r in read_table(tmp_path, "trials") if r["trial_id"] == "a"]
    assert t["objective"] == "test/miou" and t["best_test_miou"] == 0.4 and "best_val_miou" not in t
    assert all("test/miou" in e and "val/miou" not in e for e in read_table(tmp_path, "evals"))
    top = best_trials(tmp_path, top=1)
    assert top[0]["trial_id"] == "a" and top[0]["rank_step"] == 2
