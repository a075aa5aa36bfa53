"""Nothing in the reproduction catalogue rots: every expressible entry of experiments/reproduce/catalogue.yaml runs,
through `uda-ray reproduce ENTRY`, on the synthetic benchmark's GTA5 / Cityscapes layouts (linked where the shipped
files look: data/GTA5, data/Cityscapes) at a tiny size for one step or one short epoch, in-process (no Ray). The
only overrides are sizes (images, crops, batches, and ResNet-101 backbones cut to one block per stage), lengths,
and what a CPU-only CI machine cannot have (a GPU, loader processes, fp16, the ImageNet download, the 512x1024
profile): a renamed key, a missing file or a broken pipeline fails here. Each distinct command runs once (several
rows can share one run); on a 2-core machine the file takes about 70 s of CPU time.

An entry's `needs` (the protocol options its command relies on, e.g. train.epochs) must all exist in the code: a
missing one fails, it is never skipped."""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import shlex
from pathlib import Path

import pytest
import torch
import yaml

from uda_ray import catalogue
from uda_ray.cli import main

REPO = Path(__file__).resolve().parents[1]
ENTRIES = catalogue.load_catalogue(REPO / "experiments" / "reproduce" / "catalogue.yaml")
W, H = 64, 32  # the benchmark's stored size and every resize; crops and random widths scale with it
SIZE_KEYS = {"data.source_size": [W, H], "data.target_size": [W, H], "data.eval_size": [W, H],
             "data.eval_label_size": [W, H], "data.crop_size": [48, 24], "data.random_width": [64, 80]}
# hardware and weights a CPU-only CI machine cannot have; and the evaluation's size
ALWAYS = {"train.use_gpu": "false", "train.cpus_per_worker": "1", "data.loader_workers": "0", "train.amp": "'off'",
          "train.profile": "false", "model.pretrained": "null", "train.batch_size": "2", "train.eval_batch_size": "1",
          "data.held_out_max": "2"}


def _commands() -> list[tuple[str, catalogue.Entry]]:
    """Each distinct command once (several rows of one table can share a run), named by its first entry."""
    seen: dict[str, catalogue.Entry] = {}
    for e in ENTRIES:
        if e.expressible:
            seen.setdefault(e.command, e)
    return [(e.id, e) for e in seen.values()]


# -- the protocol options an entry may rely on, and whether this checkout has them ---------------------------


def _has_field(cls: type, name: str) -> bool:
    return name in {f.name for f in dataclasses.fields(cls)}


def _supported(need: str) -> bool:
    from uda_ray.config import DataConfig, TrainConfig
    from uda_ray.methods import METHODS

    section, _, key = need.partition(".")
    if need.startswith("pseudo_labels threshold:"):
        import uda_ray.pipelines.pseudo_labels as pl

        return need.split(":")[1].strip() in inspect.getsource(pl)
    if section == "data":
        return _has_field(DataConfig, key)
    if section == "train":
        return _has_field(TrainConfig, key)
    if section == "method_cfg":  # the entries that need one use MPL's
        return _has_field(METHODS["mpl"].Config, key)
    raise AssertionError(f"catalogue: unknown kind of need {need!r}")


def _missing(entry: catalogue.Entry) -> list[str]:
    return [n for n in entry.needs if not _supported(n)]


# -- sizes and lengths ---------------------------------------------------------------------------------------


def _stage_configs(argv: list[str]) -> list:
    """The experiment configs a command trains or evaluates with (each pipeline stage's)."""
    from tests.conftest import load_shipped
    from uda_ray.build import load_experiment
    from uda_ray.pipelines.runner import load_pipeline

    cmd, path = argv[0], Path(argv[1])
    if cmd == "pipeline":
        pipe = load_pipeline(path)
        return [load_shipped(load_experiment, pipe.experiment_path(st), pipe.overrides(st))
                for st in pipe.cfg.stages if st.action is None]
    if cmd == "evaluate":
        path = Path(argv[argv.index("--experiment") + 1])
    sets = dict(a.split("=", 1) for a in argv[argv.index("--set") + 1::2]) if "--set" in argv else {}
    return [load_shipped(load_experiment, path, {k: yaml.safe_load(v) for k, v in sets.items()})]


def _tiny_overrides(cfgs: list) -> list[str]:
    sets = dict(ALWAYS)
    for key, value in SIZE_KEYS.items():
        section, name = key.split(".")
        if any(getattr(getattr(c, section), name, None) is not None for c in cfgs) or name in ("source_size",
                                                                                           "target_size"):
            sets[key] = f"[{value[0]}, {value[1]}]"
    if any(getattr(c.train, "epochs", None) for c in cfgs):  # one epoch of the benchmark's 8 source images
        sets.update({"train.epochs": "1", "train.batch_size": "4"})
    else:
        sets["train.max_steps"] = "1"
    sets["train.eval_every"] = "1000"  # one evaluation, at the last step
    return [f"{k}={v}" for k, v in sets.items()]


# -- running ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A folder holding data/GTA5 and data/Cityscapes: the tiny benchmark's layouts."""
    from uda_ray.data.synthetic import generate

    root = tmp_path_factory.mktemp("reproduce")
    bench = generate(root / "bench", n_source=8, n_target=8, n_val=2, size=(W, H), seed=0)
    (root / "data").mkdir()
    (root / "data" / "GTA5").symlink_to(bench / "gta5")
    (root / "data" / "Cityscapes").symlink_to(bench / "cityscapes")
    return root


@pytest.fixture
def in_process(monkeypatch, world):
    """Every run in this process: no Ray cluster (refused if anything tries), runs as in the inline launcher."""
    import ray

    import uda_ray.api
    import uda_ray.search.cluster
    import uda_ray.training.launchers
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("a catalogue entry started Ray"))
    monkeypatch.setattr(uda_ray.api, "ray_connection", lambda address: contextlib.nullcontext())
    monkeypatch.setattr(uda_ray.search.cluster, "check_resources", lambda *a, **k: None)  # asks Ray
    monkeypatch.setattr(uda_ray.training.launchers, "fit_run", _inline_fit_run)
    _shallow_resnets(monkeypatch)
    monkeypatch.chdir(world)
    return world


def _shallow_resnets(monkeypatch) -> None:
    """Size: ResNet-101 backbones (DeepLab-v2 in both styles, BiSeNet-R101) with one bottleneck block per stage
    instead of (3, 4, 23, 3): the same layers, widths, dilations and module names, at CI speed."""
    import functools

    import torchvision.models as tvm

    import uda_ray.models.deeplabv2 as dl
    from uda_ray.models import resnet

    builder, weights = resnet.RESNETS[101]
    shallow = functools.partial(tvm.resnet.ResNet, tvm.resnet.Bottleneck, [1, 1, 1, 1])
    monkeypatch.setitem(resnet.RESNETS, 101, (lambda weights=None, **kw: shallow(**kw), weights))
    caffe = dl.caffe_resnet
    monkeypatch.setattr(dl, "caffe_resnet", lambda blocks=(3, 4, 23, 3): caffe((1, 1, 1, 1)))


def _inline_fit_run(cfg, storage: Path, name: str) -> dict:
    """`uda_ray.training.launchers.fit_run` with the inline launcher's task body run in this process instead of
    in a Ray task: the same session, results tables and returned metrics."""
    from uda_ray.config import experiment_dict
    from uda_ray.results.tables import ResultsWriter
    from uda_ray.storage import layout
    from uda_ray.training import launchers

    results_dir = layout.results_dir(storage / name)
    last = launchers._run_task(experiment_dict(cfg), str(storage / name), str(results_dir), name)
    ResultsWriter.for_run(results_dir, name, cfg.select).end(name, experiment_dict(cfg), {}, "completed")
    return dict(last)


# our ProDA-head DeepLab-v2 keys -> CPSL's (lslrh/CPSL models/deeplabv2.py ResNet101 / Classifier_Module2)
_TO_CPSL = (("backbone.", ""), ("classifier.branches.", "layer5.conv2d_list."),
            ("classifier.se.", "layer5.bottleneck.0.se."),
            ("classifier.fuse.0.", "layer5.bottleneck.1."), ("classifier.fuse.1.", "layer5.bottleneck.2."),
            ("classifier.cls.", "layer5.head.1."), ("bn_clr.", "bn_pretrain."))


def _weights_file(cfgs: list, out: Path, cpsl: bool = False) -> Path:
    """A segmenter state dict of the entry's network (a stand-in for a published, converted model); `cpsl`:
    saved as CPSL's released .pkl ({"ResNet101": {"model_state": ...}}, its key names), which evaluate converts."""
    from uda_ray.build import build_model

    torch.manual_seed(0)
    state = build_model(dataclasses.replace(cfgs[0].model, pretrained=None)).state_dict()
    if cpsl:
        renamed = {}
        for k, v in state.items():
            ours, theirs = next(p for p in _TO_CPSL if k.startswith(p[0]))
            renamed[theirs + k.removeprefix(ours)] = v
        state = {"ResNet101": {"model_state": renamed}, "iter": 1}
    torch.save(state, out)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("entry", [e for _, e in _commands()], ids=[i for i, _ in _commands()])
def test_every_catalogue_command_runs_tiny(entry, in_process, capsys):
    assert not _missing(entry), f"{entry.id} needs options the code lacks: {_missing(entry)}"
    store = in_process / "store"
    base = catalogue.entry_argv(entry, inputs={k: "CHECKPOINT" for k in entry.inputs}, repo_root=REPO)
    cfgs = _stage_configs(base)
    cpsl = entry.id == "cpsl_published_models"  # its checkpoint: CPSL's own .pkl, converted in memory
    inputs = {k: str(_weights_file(cfgs, in_process / f"{entry.id}.pth", cpsl)) for k in entry.inputs}
    argv = ["reproduce", entry.id, *(a for o in _tiny_overrides(cfgs) for a in ("--set", o)),
            *(a for k, v in inputs.items() for a in ("--with", f"{k}={v}")), "--storage", str(store)]
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.startswith("uda-ray " + shlex.split(entry.command)[1])
    kind = shlex.split(entry.command)[1]
    if kind == "pipeline":
        from uda_ray.pipelines.runner import load_pipeline

        pipe = load_pipeline(base[1])
        for st in pipe.cfg.stages:
            assert (store / "pipelines" / pipe.cfg.name / st.name).is_dir(), st.name
    elif kind == "train":
        assert (store / "runs" / cfgs[0].name / "results").is_dir()
    else:
        assert "test mIoU" in out


# -- the catalogue itself --------------------------------------------------------------------------------------


def test_the_readme_table_is_the_catalogue():
    text = (REPO / "experiments" / "README.md").read_text()
    begin, end = "<!-- catalogue:begin -->\n", "\n<!-- catalogue:end -->"
    assert begin in text and end in text, "experiments/README.md lost its catalogue markers"
    table = text.split(begin, 1)[1].split(end, 1)[0]
    assert table == catalogue.markdown_table(ENTRIES), "regenerate: uda-ray reproduce --markdown"


def test_every_entry_cites_a_paper_and_says_what_differs_or_why_not():
    for e in ENTRIES:
        assert e.paper and e.table and e.row, e.id
        if e.expressible:
            assert e.gpu_hours is not None and e.gpu_hours > 0, e.id
            assert e.differs, f"{e.id}: say what still differs from the original protocol"
        else:
            assert e.reason and not e.needs, e.id


def test_every_shipped_file_a_command_names_exists():
    for e in ENTRIES:
        if e.expressible:
            for tok in shlex.split(e.command):
                if tok.startswith("experiments/"):
                    assert (REPO / tok).is_file(), f"{e.id}: {tok}"


def test_every_need_is_an_option_the_code_has():
    for e in ENTRIES:
        for n in e.needs:
            assert _supported(n), f"{e.id}: {n}"  # _supported raises on a kind of option it cannot check


def test_a_malformed_entry_is_one_clear_error(tmp_path):
    from uda_ray.errors import UserError

    good = {"id": "a", "paper": "p", "table": "t", "row": "r", "reported": {}, "command": "uda-ray train x.yaml",
            "differs": "d", "gpu_hours": 1}
    for bad, match in [({**good, "comand": "x"}, "unknown keys"), ({**good, "reason": "r"}, "exactly one"),
                       ({**good, "command": "python train.py"}, "starts with"),
                       ({**good, "command": "uda-ray evaluate {ckpt}"}, "placeholders")]:
        (tmp_path / "c.yaml").write_text(yaml.safe_dump({"entries": [bad]}))
        with pytest.raises(UserError, match=match):
            catalogue.load_catalogue(tmp_path / "c.yaml")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"entries": [good, good]}))
    with pytest.raises(UserError, match="twice"):
        catalogue.load_catalogue(tmp_path / "c.yaml")


def test_dry_run_prints_the_command_with_overrides_and_inputs(capsys):
    code = main(["reproduce", "intrada_published_model", "--with", "checkpoint=/m/intrada.pth", "--set",
                 "data.target_root=/d/cs", "--dry-run"])
    out = capsys.readouterr().out.strip()
    assert code == 0
    assert out.startswith("uda-ray evaluate /m/intrada.pth --experiment /")
    assert out.endswith("--set model.kwargs.style=caffe --set model.pretrained=null --set data.target_root=/d/cs")


@pytest.mark.parametrize("argv, match", [
    (["reproduce", "no_such_entry"], "no catalogue entry"),
    (["reproduce", "singh_cmp_vgg_cbst"], "not expressible"),
    (["reproduce", "intrada_published_model"], "--with checkpoint="),
    (["reproduce", "intrada", "--with", "x=1"], "takes no inputs"),
    (["reproduce"], "name an ENTRY"),
])
def test_a_bad_reproduce_call_is_one_line_exit_2(argv, match, capsys):
    code = main(argv + ["--dry-run"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and match in err, err


def test_list_names_every_entry(capsys):
    assert main(["reproduce", "--list"]) == 0
    out = capsys.readouterr().out
    assert all(f"\n{e.id}\n" in f"\n{out}" for e in ENTRIES)
    assert f"{len(ENTRIES)} entries" in out
