"""The catalogue of bad input: every entry is one mistake a user can make, and each must end in exit status 2,
one line on stderr, no traceback, nothing written under the storage root (or at the output path), before
any Ray cluster starts or any training runs. In-process through `uda_ray.cli.main`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import tiny_experiment
from uda_ray.cli import main


class World:
    """Valid files for every command, and an existing sweep with results, under one folder."""

    def __init__(self, root: Path, synth: Path) -> None:
        self.root = root
        self.store = root / "store"
        self.base = tiny_experiment(synth)
        self.write_yaml("base.yaml", self.base)
        self.space = {"base": "base.yaml", "num_samples": 1, "params": {"optim.lr": {"loguniform": [1e-3, 1e-2]}}}
        self.write_yaml("space.yaml", self.space)
        self.write_yaml("exp.yaml", self.base)
        self.pipeline = {"name": "pipe", "stages": [
            {"name": "s1", "experiment": "exp.yaml"},
            {"name": "s2", "experiment": "exp.yaml"},
            {"name": "s3", "experiment": "exp.yaml"},
            {"name": "s4", "pseudo_labels": {"from": "s1", "percentile": 0.5, "cap": 0.9}}]}
        self.write_yaml("pipeline.yaml", self.pipeline)
        (root / "a_file").write_text("not a folder\n")
        (root / "latin1.yaml").write_bytes("name: caf\xe9\n".encode("latin-1"))
        (root / "binary.yaml").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
        torch.save([1, 2, 3], root / "a_list.pth")
        (root / "garbage.pth").write_bytes(b"PK\x03\x04 this is not a zip archive")
        torch.save({"conv.weight": torch.zeros(1)}, root / "wrong_keys.pth")
        self._sweep("done")

    def write_yaml(self, name: str, data) -> Path:
        p = self.root / name
        p.write_text(yaml.safe_dump(data))
        return p

    def _sweep(self, name: str) -> None:
        from uda_ray.build import build_experiment
        from uda_ray.config import experiment_dict
        from uda_ray.results.tables import ResultsWriter

        d = self.store / name
        d.mkdir(parents=True)
        (d / "sweep.json").write_text(json.dumps({"name": name, "seed": 0, "status": "completed", "num_samples": 1,
                                                  "objective": [{"metric": "test/miou", "mode": "max"}]}))
        exp = experiment_dict(build_experiment(self.base))
        w = ResultsWriter(d / "results", name, "test/miou", "max", 0)
        w.start("t1", exp, {"optim.lr": 0.01})
        w.result("t1", exp, {"optim.lr": 0.01}, {"step": 2, "test/miou": 0.3, "test/pixel_acc": 0.5})
        w.end("t1", exp, {"optim.lr": 0.01}, "completed")

    def variant(self, name: str, what: str, **over) -> Path:
        """A copy of base.yaml / space.yaml / exp.yaml / pipeline.yaml with dotted overrides."""
        from uda_ray.config_loader import apply_overrides

        src = {"base": self.base, "space": self.space, "exp": self.base, "pipeline": self.pipeline}[what]
        return self.write_yaml(name, apply_overrides(src, over))


def space_with_base(w: World, **base_over) -> list[str]:
    w.variant("bad_base.yaml", "base", **base_over)
    p = w.write_yaml("bad_space.yaml", {**w.space, "base": "bad_base.yaml"})
    return ["sweep", str(p)]


def pipeline_with(w: World, stages: list[dict]) -> list[str]:
    p = w.write_yaml("bad_pipeline.yaml", {"name": "pipe", "stages": stages})
    return ["pipeline", str(p)]


S1 = {"name": "s1", "experiment": "exp.yaml"}

# (id, argv builder, text the one line must contain)
CASES = [
    # --- sweep: the space file
    ("sweep-missing-file", lambda w: ["sweep", str(w.root / "nope.yaml")], "no such file"),
    ("sweep-file-is-a-folder", lambda w: ["sweep", str(w.root)], "not a file"),
    ("sweep-not-utf8", lambda w: ["sweep", str(w.root / "latin1.yaml")], "not UTF-8"),
    ("sweep-binary-file", lambda w: ["sweep", str(w.root / "binary.yaml")], "not UTF-8"),
    ("sweep-malformed-yaml", lambda w: ["sweep", str(_text(w, "s.yaml", "base: base.yaml\nparams: {a: [1\n"))],
     "malformed YAML"),
    ("sweep-top-level-list", lambda w: ["sweep", str(w.write_yaml("s.yaml", [1, 2]))], "expected a mapping"),
    ("sweep-unknown-key", lambda w: ["sweep", str(w.variant("s.yaml", "space", bogus=1))], "unknown key 'bogus'"),
    ("sweep-unknown-param", lambda w: ["sweep", str(w.write_yaml("s.yaml", {
        **w.space, "params": {"optim.lrr": {"loguniform": [1e-3, 1e-2]}}}))], "optim.lrr"),
    ("sweep-inverted-range", lambda w: ["sweep", str(w.write_yaml("s.yaml", {
        **w.space, "params": {"optim.lr": {"loguniform": [1e-2, 1e-3]}}}))], "inverted"),
    ("sweep-zero-samples", lambda w: ["sweep", str(w.variant("s.yaml", "space", num_samples=0))], "num_samples"),
    ("sweep-objective-not-reported", lambda w: ["sweep", str(w.variant(
        "s.yaml", "space", objective={"metric": "test/mIoU"}))], "test/mIoU"),
    ("sweep-objective-wrong-mode", lambda w: ["sweep", str(w.variant(
        "s.yaml", "space", objective={"metric": "test/miou", "mode": "maximize"}))], "mode"),
    ("sweep-searches-max-steps", lambda w: ["sweep", str(w.write_yaml("s.yaml", {
        **w.space, "params": {"train.max_steps": {"choice": [4, 6]}}}))], "train.max_steps cannot be searched"),
    ("sweep-base-missing", lambda w: ["sweep", str(w.variant("s.yaml", "space", base="nope.yaml"))], "not found"),
    ("sweep-unknown-method", lambda w: space_with_base(w, method="nope"), "unknown method 'nope'"),
    ("sweep-unknown-model", lambda w: space_with_base(w, **{"model.name": "nope"}), "unknown model 'nope'"),
    ("sweep-pretrained-missing", lambda w: space_with_base(w, **{"model.pretrained": str(w.root / "no.pth")}),
     "no.pth"),
    ("sweep-pretrained-not-a-state-dict", lambda w: space_with_base(
        w, **{"model.pretrained": str(w.root / "a_list.pth")}), "state dict"),
    ("sweep-pretrained-unreadable", lambda w: space_with_base(
        w, **{"model.pretrained": str(w.root / "garbage.pth")}), "garbage.pth"),
    ("sweep-pretrained-is-a-folder", lambda w: space_with_base(w, **{"model.pretrained": str(w.root)}),
     "model.pretrained"),
    ("sweep-model-kwarg-unknown", lambda w: space_with_base(w, **{"model.kwargs": {"bogus": 1}}), "bogus"),
    ("sweep-missing-dataset", lambda w: space_with_base(w, **{"data.source_root": str(w.root / "no_gta5")}),
     "no_gta5"),
    ("sweep-init-from-missing", lambda w: space_with_base(w, **{"train.init_from": str(w.root / "no_ckpt")}),
     "no_ckpt"),
    ("sweep-set-without-equals", lambda w: ["sweep", str(w.root / "space.yaml"), "--set", "optim.lr"],
     "expected KEY=VALUE"),
    ("sweep-set-unknown-key", lambda w: ["sweep", str(w.root / "space.yaml"), "--set", "optim.lrr=0.1"],
     "optim.lrr"),
    ("sweep-set-wrong-type", lambda w: ["sweep", str(w.root / "space.yaml"), "--set", "train.max_steps=many"],
     "train.max_steps"),
    ("sweep-name-with-slash", lambda w: ["sweep", str(w.root / "space.yaml"), "--name", "../escape"], "--name"),
    ("sweep-name-exists", lambda w: ["sweep", str(w.root / "space.yaml"), "--name", "done"], "already exists"),
    ("sweep-storage-is-a-file", lambda w: ["sweep", str(w.root / "space.yaml"), "--storage",
                                           str(w.root / "a_file")], "a_file"),
    ("sweep-storage-under-a-file", lambda w: ["sweep", str(w.root / "space.yaml"), "--storage",
                                              str(w.root / "a_file" / "sub")], "a_file"),
    ("sweep-top-zero", lambda w: ["sweep", str(w.root / "space.yaml"), "--top", "0"], "--top"),
    ("sweep-bad-address", lambda w: ["sweep", str(w.root / "space.yaml"), "--address", "nohostnoport"],
     "--address"),
    # --- resume
    ("resume-unknown-sweep", lambda w: ["resume", "nope"], "unknown sweep 'nope'"),
    ("resume-corrupt-sweep-json", lambda w: _corrupt_meta(w, "broken") or ["resume", "broken"], "sweep.json"),
    ("resume-no-tune-state", lambda w: ["resume", "done"], "no Tune state"),
    ("resume-storage-is-a-file", lambda w: ["resume", "done", "--storage", str(w.root / "a_file")], "a_file"),
    # --- best
    ("best-unknown-sweep", lambda w: ["best", "nope"], "unknown sweep 'nope'"),
    ("best-top-zero", lambda w: ["best", "done", "--top", "0"], "--top"),
    ("best-unknown-metric", lambda w: ["best", "done", "--metric", "test/mIoU"], "test/mIoU"),
    ("best-export-missing-folder", lambda w: ["best", "done", "--export", str(w.root / "no_dir" / "b.yaml")],
     "no_dir"),
    ("best-export-is-a-folder", lambda w: ["best", "done", "--export", str(w.root)], "--export"),
    ("best-corrupt-table", lambda w: _corrupt_table(w, "broken2") or ["best", "broken2"], "trials.parquet"),
    # --- ls
    ("ls-storage-is-a-file", lambda w: ["ls", "--storage", str(w.root / "a_file")], "a_file"),
    # --- train
    ("train-missing-file", lambda w: ["train", str(w.root / "nope.yaml")], "no such file"),
    ("train-not-utf8", lambda w: ["train", str(w.root / "latin1.yaml")], "not UTF-8"),
    ("train-unknown-key", lambda w: ["train", str(w.variant("e.yaml", "exp", **{"train.max_stepz": 3}))],
     "train.max_stepz"),
    ("train-negative-lr", lambda w: ["train", str(w.variant("e.yaml", "exp", **{"optim.lr": -1.0}))], "lr"),
    ("train-zero-workers", lambda w: ["train", str(w.variant("e.yaml", "exp", **{"train.num_workers": 0}))],
     "num_workers"),
    ("train-pretrained-missing", lambda w: ["train", str(w.variant(
        "e.yaml", "exp", **{"model.pretrained": str(w.root / "no.pth")}))], "no.pth"),
    ("train-pretrained-wrong-keys", lambda w: ["train", str(w.variant(
        "e.yaml", "exp", **{"model.pretrained": str(w.root / "wrong_keys.pth")}))], "wrong_keys.pth"),
    ("train-model-kwarg-unknown", lambda w: ["train", str(w.variant(
        "e.yaml", "exp", **{"model.kwargs": {"bogus": 1}}))], "bogus"),
    ("train-name-invalid", lambda w: ["train", str(w.root / "exp.yaml"), "--name", "a b/c"], "--name"),
    ("train-storage-is-a-file", lambda w: ["train", str(w.root / "exp.yaml"), "--storage", str(w.root / "a_file")],
     "a_file"),
    ("train-normalize-unknown", lambda w: ["train", str(w.root / "exp.yaml"), "--set", "data.normalize=bgr"],
     "data.normalize must be one of imagenet, caffe_bgr"),
    ("train-pseudo-threshold-unknown", lambda w: ["train", str(w.root / "exp.yaml"), "--set",
                                                  "data.pseudo_threshold=median"], "data.pseudo_threshold"),
    ("train-epochs-zero", lambda w: ["train", str(w.root / "exp.yaml"), "--set", "train.epochs=0"],
     "train.epochs must be >= 1"),
    ("train-epochs-disagree-with-max-steps", lambda w: ["train", str(w.root / "exp.yaml"), "--set", "train.epochs=1"],
     "but train.max_steps is 4"),
    ("train-eval-label-size-tiny", lambda w: ["train", str(w.root / "exp.yaml"), "--set",
                                              "data.eval_label_size=[4, 4]"], "data.eval_label_size"),
    ("train-mpl-fresh-student-without-teacher", lambda w: ["train", str(w.root / "exp.yaml"), "--set", "method=mpl",
                                                           "--set", "method_cfg.fresh_student=true"],
     "fresh_student needs method_cfg.teacher_from"),
    ("train-mpl-teacher-missing", lambda w: ["train", str(w.root / "exp.yaml"), "--set", "method=mpl", "--set",
                                             f"method_cfg.teacher_from={w.root / 'no_such_ckpt'}"], "no_such_ckpt"),
    ("train-max-failures-negative", lambda w: ["train", str(w.root / "exp.yaml"), "--set", "train.max_failures=-1"],
     "max_failures"),
    # --- pipeline
    ("pipeline-missing-file", lambda w: ["pipeline", str(w.root / "nope.yaml")], "no such file"),
    ("pipeline-typo-in-stage-4-action", lambda w: pipeline_with(w, [
        S1, {**S1, "name": "s2"}, {**S1, "name": "s3"},
        {"name": "s4", "pseudo_labels": {"from": "s1", "percentile": 0.5, "cpa": 0.9}}]), "cpa"),
    ("pipeline-action-arg-wrong-type", lambda w: pipeline_with(w, [
        S1, {"name": "s2", "pseudo_labels": {"from": "s1", "percentile": "half"}}]), "percentile"),
    ("pipeline-unknown-stage-ref", lambda w: pipeline_with(w, [
        S1, {"name": "s2", "pseudo_labels": {"from": "s9"}}]), "s9"),
    ("pipeline-duplicate-stage", lambda w: pipeline_with(w, [S1, S1]), "duplicate"),
    ("pipeline-stage-experiment-missing", lambda w: pipeline_with(w, [{"name": "s1", "experiment": "nope.yaml"}]),
     "nope.yaml"),
    ("pipeline-stage-4-experiment-bad", lambda w: pipeline_with(w, [
        S1, {**S1, "name": "s2"}, {**S1, "name": "s3"}, {**S1, "name": "s4", "set": {"optim.lrr": 1}}]), "optim.lrr"),
    ("pipeline-storage-is-a-file", lambda w: ["pipeline", str(w.root / "pipeline.yaml"), "--storage",
                                              str(w.root / "a_file")], "a_file"),
    ("pipeline-report-missing-folder", lambda w: ["pipeline", str(w.root / "pipeline.yaml"), "--report",
                                                  str(w.root / "no_dir" / "r.md")], "no_dir"),
    ("pipeline-set-unknown-key", lambda w: ["pipeline", str(w.root / "pipeline.yaml"), "--set", "optim.lrr=0.1"],
     "optim.lrr"),
    # --- evaluate
    ("evaluate-missing-checkpoint", lambda w: ["evaluate", str(w.root / "no_ckpt")], "no such file"),
    ("evaluate-folder-without-state", lambda w: ["evaluate", str(w.root)], "no checkpoint there"),
    ("evaluate-not-a-checkpoint", lambda w: ["evaluate", str(w.root / "a_list.pth")], "a_list.pth"),
    ("evaluate-weights-wrong-keys", lambda w: ["evaluate", str(w.root / "wrong_keys.pth"), "--experiment",
                                               str(w.root / "exp.yaml")], "wrong_keys.pth"),
    ("evaluate-experiment-missing", lambda w: ["evaluate", str(w.root / "wrong_keys.pth"), "--experiment",
                                               str(w.root / "nope.yaml")], "nope.yaml"),
    ("evaluate-out-missing-folder", lambda w: ["evaluate", str(w.root / "a_list.pth"), "--out",
                                               str(w.root / "no_dir" / "m.json")], "no_dir"),
    # --- profile
    ("profile-unknown-model", lambda w: ["profile", "nope"], "nope"),
    ("profile-bad-size", lambda w: ["profile", "bisenet_r18", "--size", "big"], "--size"),
    ("profile-tiny-size", lambda w: ["profile", "bisenet_r18", "--size", "4x4"], "--size"),
    # --- data
    ("data-zero-images", lambda w: ["data", "synth", "--out", str(w.root / "synth_out"), "--n-source", "0"],
     "--n-source"),
    ("data-bad-size", lambda w: ["data", "synth", "--out", str(w.root / "synth_out"), "--size", "x"], "--size"),
    ("data-out-is-a-file", lambda w: ["data", "synth", "--out", str(w.root / "a_file")], "a_file"),
]


def _text(w: World, name: str, text: str) -> Path:
    (w.root / name).write_text(text)
    return w.root / name


def _corrupt_meta(w: World, name: str) -> None:
    d = w.store / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "sweep.json").write_text("{not json")


def _corrupt_table(w: World, name: str) -> None:
    d = w.store / name
    (d / "results").mkdir(parents=True, exist_ok=True)
    (d / "sweep.json").write_text(json.dumps({"name": name, "seed": 0, "status": "completed", "num_samples": 1}))
    (d / "results" / "trials.parquet").write_bytes(b"PAR1 truncated")


@pytest.fixture(scope="module")
def world_template(tmp_path_factory, synth_root) -> World:
    return World(tmp_path_factory.mktemp("catalogue"), Path(synth_root))


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


@pytest.mark.parametrize("case, argv, needle", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_nothing_written(world_template, tmp_path, capsys, monkeypatch, case, argv,
                                                      needle):
    import shutil

    root = tmp_path / "w"
    shutil.copytree(world_template.root, root, symlinks=True)
    w = World.__new__(World)
    w.__dict__.update(world_template.__dict__)
    w.root, w.store = root, root / "store"
    monkeypatch.chdir(root)
    monkeypatch.setenv("UDA_RAY_DATA", str(tmp_path / "data"))
    import ray

    def no_ray(*a, **k):
        raise RuntimeError(f"{case}: got as far as starting Ray")

    monkeypatch.setattr(ray, "init", no_ray)
    args = argv(w)
    if "--storage" not in args and args[0] not in ("profile", "data"):
        args += ["--storage", str(w.store)]
    before = _snapshot(root)
    code = main(args)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, (case, code, err)
    assert len(lines) == 1 and "Traceback" not in err, err
    assert needle in lines[0], (needle, lines[0])
    assert _snapshot(root) == before, "nothing may be written"
    assert not (tmp_path / "data").exists()


def test_the_catalogue_has_at_least_40_distinct_entries():
    assert len({c[0] for c in CASES}) == len(CASES) >= 40
    commands = {c[0].split("-")[0] for c in CASES}
    assert commands >= {"sweep", "resume", "train", "pipeline", "best", "ls", "profile", "data"}
