"""Validator trust: Spearman correlation and selection regret against hand-computed values."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from uda_ray.results.stats import rankdata, spearman
from uda_ray.selection.study import RANDOM, measure

# two trials, two evaluations each; C has no test labels and must be ignored
EVALS = [
    {"trial_id": "A", "step": 1, "test/miou": 0.30, "uv/entropy": 0.50, "uv/snd": 1.0},
    {"trial_id": "A", "step": 2, "test/miou": 0.40, "uv/entropy": 0.40, "uv/snd": 2.0},
    {"trial_id": "B", "step": 1, "test/miou": 0.20, "uv/entropy": 0.45, "uv/snd": 2.0},
    {"trial_id": "B", "step": 2, "test/miou": 0.35, "uv/entropy": 0.60, "uv/snd": 0.5},
    {"trial_id": "C", "step": 1, "test/miou": None, "uv/entropy": 0.0, "uv/snd": 9.0},
]


def _rows() -> dict[str, dict]:
    return {r["validator"]: r for r in measure(EVALS, {"uv/entropy": "min", "uv/snd": "max"})}


def test_rankdata_averages_ties():
    assert rankdata([10, 20, 20, 30]) == [1, 2.5, 2.5, 4]
    assert rankdata([3, 1, 2]) == [3, 1, 2]


def test_spearman_with_ties_matches_hand_computation():
    # ranks x = 1, 2.5, 2.5, 4; y = 1, 3, 2, 4 -> 4.5 / sqrt(4.5 * 5)
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(4.5 / math.sqrt(22.5))
    assert spearman([1, 2, 3], [30, 20, 10]) == pytest.approx(-1.0)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))  # constant side: undefined
    assert math.isnan(spearman([1], [1]))


def test_min_mode_validator_is_negated_before_ranking():
    r = _rows()["uv/entropy"]
    # scores -0.5, -0.4, -0.45, -0.6 rank 2, 4, 3, 1; test ranks 2, 4, 1, 3: 1 - 6 * 8 / 60
    assert r["spearman"] == pytest.approx(0.2)
    assert (r["pick_trial"], r["pick_step"], r["n_tied"]) == ("A", 2, 1)
    assert r["pick_test"] == pytest.approx(0.40) and r["regret"] == pytest.approx(0.0)
    assert r["n_checkpoints"] == 4 and r["n_trials"] == 2  # C (no test labels) ignored


def test_tied_pick_averages_the_test_metric():
    r = _rows()["uv/snd"]
    # score ranks 2, 3.5, 3.5, 1 vs test ranks 2, 4, 1, 3: -0.5 / sqrt(4.5 * 5)
    assert r["spearman"] == pytest.approx(-0.5 / math.sqrt(22.5))
    assert (r["pick_trial"], r["pick_step"], r["n_tied"]) == ("A", 2, 2)
    assert r["pick_test"] == pytest.approx(0.30)  # mean of A@2 (0.40) and B@1 (0.20)
    assert r["regret"] == pytest.approx(0.10)
    assert (r["oracle_test"], r["oracle_trial"], r["oracle_step"]) == (0.40, "A", 2)


def test_final_variant_ranks_trials_by_their_last_evaluation():
    for name in ("uv/entropy", "uv/snd"):
        r = _rows()[name]
        assert r["spearman_final"] == pytest.approx(1.0)  # A@2 (0.40) above B@2 (0.35) under both
        assert r["pick_final_trial"] == "A" and r["regret_final"] == pytest.approx(0.0)
        assert r["oracle_final_test"] == pytest.approx(0.40)


def test_random_reference_row_is_the_expected_regret_of_a_uniform_pick():
    r = _rows()[RANDOM]
    assert r["regret"] == pytest.approx(0.40 - (0.30 + 0.40 + 0.20 + 0.35) / 4)
    assert r["regret_final"] == pytest.approx(0.40 - (0.40 + 0.35) / 2)
    assert math.isnan(r["spearman"])


def test_validator_missing_at_some_checkpoints_still_faces_the_full_oracle():
    evals = [{**e, "uv/im": 1.0 - e["test/miou"]} for e in EVALS if e["test/miou"] is not None]
    evals[1].pop("uv/im")  # the best checkpoint (A@2) has no value: it cannot be picked
    r = measure(evals, {"uv/im": "max"})[0]
    assert r["n_checkpoints"] == 3 and r["spearman"] == pytest.approx(-1.0)
    assert (r["pick_trial"], r["pick_step"]) == ("B", 1)
    assert r["regret"] == pytest.approx(0.40 - 0.20)


def test_no_test_labels_measures_nothing():
    assert measure([{"trial_id": "A", "step": 1, "uv/snd": 1.0}], {"uv/snd": "max"}) == []


def test_bad_mode_is_rejected():
    with pytest.raises(ValueError, match="mode"):
        measure(EVALS, {"uv/snd": "up"})


def _write_evals(results_dir, rows) -> None:
    from uda_ray.results.tables import ResultsWriter

    exp = {"seed": 0, "method": "m", "model": {"name": "x"}, "data": {"source": "s", "target": "t"},
           "train": {"max_steps": 2}}
    w = ResultsWriter(results_dir, "s", "uv/snd", "max", 0)
    for r in rows:
        w.result(r["trial_id"], exp, {}, {k: v for k, v in r.items() if k != "trial_id"})


def test_validators_command_on_a_sweep_prints_and_writes_the_table(tmp_path, capsys):
    import json

    import pyarrow.parquet as pq

    from uda_ray.cli import main

    (tmp_path / "sw").mkdir()
    (tmp_path / "sw" / "sweep.json").write_text(json.dumps({"name": "sw"}))
    _write_evals(tmp_path / "sw" / "results", [e for e in EVALS if e["test/miou"] is not None])
    assert main(["validators", "sw", "--storage", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "over 4 checkpoints of 2 trials" in out and "uv/entropy" in out
    rows = {r["validator"]: r for r in pq.read_table(tmp_path / "sw" / "results" / "validators.parquet").to_pylist()}
    assert set(rows) == {"uv/entropy", "uv/snd", RANDOM}
    assert rows["uv/entropy"]["mode"] == "min"  # from the metric registry
    assert rows["uv/entropy"]["spearman"] == pytest.approx(0.2)


def test_validators_command_on_a_pipeline_ranks_every_stage_checkpoint(tmp_path, capsys):
    from uda_ray.cli import main

    pdir = tmp_path / "pipelines" / "p"
    for stage in ("A", "B"):
        _write_evals(pdir / stage / "results",
                     [{**e, "trial_id": stage} for e in EVALS if e["trial_id"] == stage])
    assert main(["validators", "p", "--storage", str(tmp_path)]) == 0
    assert "over 4 checkpoints of 2 trials" in capsys.readouterr().out
    assert (pdir / "results" / "validators.parquet").is_file()


def test_validators_command_unknown_name_is_one_line_exit_2(tmp_path, capsys):
    from uda_ray.cli import main

    assert main(["validators", "nope", "--storage", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown sweep or pipeline 'nope'" in err[0]
    assert not list(tmp_path.rglob("*.parquet"))


def test_pick_vs_oracle_line_names_the_pick_the_oracle_and_the_regret():
    from uda_ray.selection.study import pick_vs_oracle

    line = pick_vs_oracle(EVALS, "uv/snd", "max")
    assert "A @ step 2 -> test/miou 30.0, mean over 2 tied" in line
    assert "oracle: A @ step 2 -> 40.0; regret 10.0 points" in line
    assert pick_vs_oracle(EVALS, "test/miou", "max") is None  # selecting by the test labels: no comparison


def test_markdown_report_puts_the_validator_selected_test_miou_beside_the_oracle(tmp_path):
    from uda_ray.results.markdown import markdown_report

    _write_evals(tmp_path / "run" / "results", [
        {"trial_id": "run", "step": 2, "test/miou": 0.30, "test/pixel_acc": 0.7, "uv/snd": 0.9},
        {"trial_id": "run", "step": 4, "test/miou": 0.40, "test/pixel_acc": 0.8, "uv/snd": 0.1}])
    md = markdown_report("t", [("run", tmp_path / "run")], selection="uv/snd")
    assert "| selected by uv/snd: test mIoU (step) | oracle: best test mIoU (step) |" in md
    assert "| run | m | x | 4 | 30.0 (2) | 40.0 (4) | 40.0 |" in md
    md = markdown_report("t", [("run", tmp_path / "run")], selection="uv/entropy")
    assert "| 4 | - | 40.0 (4) |" in md  # no uv/entropy in these tables: said, not invented


def test_seeds_report_gives_each_stage_mean_std_and_every_seed(tmp_path):
    """Three seeds of stage "a" (selected 30 / 40 / 50 by uv/snd, oracle 40 / 50 / 60) and one of stage "b"."""
    from uda_ray.results.markdown import markdown_seeds_report

    for seed, base in enumerate((0.30, 0.40, 0.50)):
        _write_evals(tmp_path / f"s{seed}" / "a" / "results", [
            {"trial_id": "a", "step": 2, "test/miou": base, "test/pixel_acc": 0.7, "uv/snd": 0.9},
            {"trial_id": "a", "step": 4, "test/miou": base + 0.1, "test/pixel_acc": 0.8, "uv/snd": 0.1}])
    _write_evals(tmp_path / "s0" / "b" / "results", [
        {"trial_id": "b", "step": 4, "test/miou": 0.25, "test/pixel_acc": 0.7, "uv/snd": 0.5}])
    md = markdown_seeds_report("t", [("a", [tmp_path / f"s{k}" / "a" for k in range(3)]),
                                     ("b", [tmp_path / f"s{k}" / "b" for k in range(3)]),
                                     ("never_ran", [tmp_path / "s0" / "c"])], selection="uv/snd")
    assert "| selected by uv/snd: test mIoU, mean ± std (per seed) |" in md
    assert ("| a | m | x | 4 | 3 | 40.0 ± 10.0 (30.0 / 40.0 / 50.0) | 50.0 ± 10.0 (40.0 / 50.0 / 60.0) | "
            "50.0 ± 10.0 |") in md
    assert "| b | m | x | 4 | 1 | 25.0 | 25.0 | 25.0 |" in md  # one seed: no spread, and the count says so
    assert "never_ran" not in md
    # against a control, paired by seed: "a" is the control of itself; "b" has only seed 0 (25.0 - 30.0)
    md = markdown_seeds_report("t", [("a", [tmp_path / f"s{k}" / "a" for k in range(3)]),
                                     ("b", [tmp_path / f"s{k}" / "b" for k in range(3)])],
                               selection="uv/snd", control="a")
    assert "| final mIoU, mean ± std | vs a (paired): selected, mean ± std (per seed) |" in md
    assert "50.0 ± 10.0 | - |" in md
    assert "| b | m | x | 4 | 1 | 25.0 | 25.0 | 25.0 | -5.0 (-5.0 / - / -) |" in md
    for seed, base in enumerate((0.31, 0.43, 0.52)):  # c at every seed: +1 / +3 / +2 over a's selections
        _write_evals(tmp_path / f"s{seed}" / "c" / "results", [
            {"trial_id": "c", "step": 4, "test/miou": base, "test/pixel_acc": 0.7, "uv/snd": 0.5}])
    md = markdown_seeds_report("t", [("a", [tmp_path / f"s{k}" / "a" for k in range(3)]),
                                     ("c", [tmp_path / f"s{k}" / "c" for k in range(3)])],
                               selection="uv/snd", control="a")
    assert "| 42.0 ± 10.5 | +2.0 ± 1.0 (+1.0 / +3.0 / +2.0) |" in md
    from uda_ray.results.markdown import _signed
    assert [_signed(v) for v in (-0.0004, 0.0004, 0.0, -0.012, float("nan"))] == ["0.0", "0.0", "0.0", "-1.2", "-"]


def test_pipeline_control_must_name_an_experiment_stage(tmp_path, capsys):
    from uda_ray.cli import main

    pipe = Path(__file__).resolve().parents[1] / "experiments" / "pipelines" / "synthetic_intrada.yaml"
    bad = tmp_path / "p.yaml"
    for control in ("nope", "rank"):  # no such stage; an action, not a training run
        text = pipe.read_text().replace("../", f"{pipe.parents[1]}/")  # its experiments from tmp_path
        bad.write_text(text.replace("stages:", f"control: {control}\nstages:", 1))
        assert main(["pipeline", str(bad), "--storage", str(tmp_path / "st")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"control '{control}' must name an experiment stage" in err[0], err
    assert not (tmp_path / "st").exists()


def test_pipeline_seeds_must_be_positive_one_line_exit_2(tmp_path, capsys):
    from uda_ray.cli import main

    pipe = Path(__file__).resolve().parents[1] / "experiments" / "pipelines" / "synthetic_intrada.yaml"
    assert main(["pipeline", str(pipe), "--seeds", "0", "--storage", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--seeds must be at least 1, got 0" in err[0]
    assert not any(tmp_path.iterdir())


def test_validators_command_on_a_single_run(tmp_path, capsys):
    from uda_ray.cli import main

    _write_evals(tmp_path / "runs" / "r" / "results", [e for e in EVALS if e["test/miou"] is not None])
    assert main(["validators", "r", "--storage", str(tmp_path)]) == 0
    assert "over 4 checkpoints of 2 trials" in capsys.readouterr().out
    assert (tmp_path / "runs" / "r" / "results" / "validators.parquet").is_file()


def test_pooled_evals_prefix_the_trials_and_drop_pool_relative_metrics():
    from uda_ray.selection.study import pooled_evals

    rows = pooled_evals({"a": [{"trial_id": "t1", "step": 1, "uv/ensv": 0.9, "uv/im": 0.2}],
                         "b": [{"trial_id": "t1", "step": 1, "uv/im": 0.3}]})
    assert rows == [{"trial_id": "a/t1", "step": 1, "uv/im": 0.2}, {"trial_id": "b/t1", "step": 1, "uv/im": 0.3}]


def test_across_averages_spearman_and_regret_and_counts_bottom_quarter_picks():
    from uda_ray.selection.study import across

    one = measure(EVALS, {"uv/entropy": "min", "uv/snd": "max"})
    # the second pool: B@1 (the worst checkpoint, 0.20) now has the lowest entropy, so uv/entropy picks it;
    # scores -0.5, -0.4, -0.1, -0.6 rank 2, 3, 4, 1 vs test ranks 2, 4, 1, 3: 1 - 6 * 14 / 60 = -0.4
    two = measure([{**e, "uv/entropy": 0.1} if (e["trial_id"], e["step"]) == ("B", 1) else e for e in EVALS],
                  {"uv/entropy": "min", "uv/snd": "max"})
    rows = {r["validator"]: r for r in across({"p1": one, "p2": two})}
    e = rows["uv/entropy"]
    assert e["n_pools"] == 2 and e["spearman_mean"] == pytest.approx((0.2 + -0.4) / 2)
    assert e["regret_mean"] == pytest.approx((0.0 + 0.20) / 2) and e["regret_max"] == pytest.approx(0.20)
    assert e["worst_rate"] == pytest.approx(0.5)  # B@1 is below none of the 4 checkpoints: bottom quarter
    assert rows["uv/snd"]["worst_rate"] == 0.0 and rows["uv/snd"]["regret_mean"] == pytest.approx(0.10)
    assert rows[RANDOM]["worst_rate"] == pytest.approx(0.25)  # the chance of a bottom-quarter pick of 4
    # a validator one pool does not measure is left out
    assert "uv/entropy" not in {r["validator"] for r in across({"p1": one, "p3": measure(EVALS, {"uv/snd": "max"})})}


def test_validators_command_on_several_sweeps_prints_each_then_pooled_then_across(tmp_path, capsys):
    import json

    from uda_ray.cli import main

    for sw in ("sa", "sb"):
        (tmp_path / sw).mkdir()
        (tmp_path / sw / "sweep.json").write_text(json.dumps({"name": sw}))
        _write_evals(tmp_path / sw / "results", [e for e in EVALS if e["test/miou"] is not None])
    assert main(["validators", "sa", "sb", "--storage", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "== sa ==" in out and "== sb ==" in out and out.count("over 4 checkpoints of 2 trials") == 2
    assert "over 8 checkpoints of 4 trials" in out  # pooled: sa/A, sa/B, sb/A, sb/B
    assert "validators over 2 pools measured apart" in out
    assert (tmp_path / "sa" / "results" / "validators.parquet").is_file()
    assert main(["validators", "sa", "sa", "--storage", str(tmp_path)]) == 2
    assert "given twice" in capsys.readouterr().err
