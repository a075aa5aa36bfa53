"""The shape of the package: imports run downward through its layers, no import cycles, Ray only at the edges,
no method importing another method, small modules and functions.

Read from the source (the AST of every module), so the tests are fast and see imports inside functions too.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import uda_ray

PKG = Path(uda_ray.__file__).parent
# The modules that may import ray (at module level or inside functions): the Ray edge. Everything else
# (methods, models, data, losses, metrics, configs, checkpoints, stages, ...) is plain PyTorch / Python.
RAY_EDGE = {"uda_ray.training.launchers", "uda_ray.training.sessions", "uda_ray.results.rows",
            "uda_ray.cli", "uda_ray.api",
            "uda_ray.search.tune", "uda_ray.search.searcher", "uda_ray.search.scheduler", "uda_ray.search.callbacks",
            "uda_ray.search.driver", "uda_ray.search.cluster", "uda_ray.search.study", "uda_ray.search.private"}
# files under uda_ray/methods/ that are building blocks, not methods
METHOD_BLOCKS = {"uda_ray.methods", "uda_ray.methods.base", "uda_ray.methods.blocks"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def imported_modules(name: str, *, skip_root_getattr: bool = True) -> set[str]:
    """The uda_ray modules `name` imports anywhere in its file (module level and inside functions).
    `from uda_ray.x import y` counts as uda_ray.x.y when that is a module, else as uda_ray.x. The root
    package's module-level `__getattr__` (lazy re-exports of the API) is skipped: deferring is its purpose."""
    tree = ast.parse(MODULES[name].read_text())
    if name == "uda_ray" and skip_root_getattr:
        tree.body = [n for n in tree.body if not (isinstance(n, ast.FunctionDef) and n.name == "__getattr__")]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative imports are not used in this package; resolve them anyway
                base = name.split(".")[: -node.level + (1 if MODULES[name].name == "__init__.py" else 0) or None]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in MODULES else mod for a in node.names]
        else:
            continue
        out.update(t for t in targets if t in MODULES and t != name)
    return out


def imports_ray(name: str) -> bool:
    tree = ast.parse(MODULES[name].read_text())
    for node in ast.walk(tree):
        mods = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
        if any(m == "ray" or m.startswith("ray.") for m in mods):
            return True
    return False


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of the directed graph as a list of nodes (first == last), or None."""
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (found := visit(m)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


# The layers, bottom to top (docs/architecture.md draws them). A module imports only modules of its own layer or
# of layers below it (cycles inside a layer are caught by the cycle test). A new module must be placed here.
LAYERS: list[tuple[str, set[str]]] = [
    ("foundations: errors, names, the strict loader, the storage plan, statistics, heartbeat and timing", {
        "uda_ray", "uda_ray.errors", "uda_ray.metric_names", "uda_ray.config_loader", "uda_ray.storage",
        "uda_ray.storage.layout", "uda_ray.storage.lock",
        "uda_ray.storage.store", "uda_ray.results", "uda_ray.results.stats",
        "uda_ray.training", "uda_ray.training.timing", "uda_ray.training.progress", "uda_ray.training.optim",
        "uda_ray.search", "uda_ray.search.private", "uda_ray.data", "uda_ray.data.labels", "uda_ray.selection",
        "uda_ray.pipelines", "uda_ray.driver", "uda_ray.catalogue"}),
    ("plain PyTorch: configs, data, models, methods, losses, metrics, validators, the checkpoint format", {
        "uda_ray.config", "uda_ray.target_labels", "uda_ray.losses", "uda_ray.metrics", "uda_ray.fda",
        "uda_ray.data.transforms", "uda_ray.data.datasets", "uda_ray.data.splits", "uda_ray.data.scenes",
        "uda_ray.data.scenes_v2", "uda_ray.data.looks_v2",
        "uda_ray.data.synthetic", "uda_ray.data.loading", "uda_ray.selection.validators", "uda_ray.training.checkpoint",
        "uda_ray.selection.estimators", "uda_ray.selection.samples",
        *(m for m in MODULES if m.startswith(("uda_ray.models", "uda_ray.methods")))}),
    ("registries, input checks, the results tables' rows and files", {
        "uda_ray.build", "uda_ray.checks", "uda_ray.search.space", "uda_ray.results.rows", "uda_ray.results.tables",
        "uda_ray.results.reading",
        "uda_ray.results.trials_table", "uda_ray.results.tensorboard", "uda_ray.results.mlflow_log"}),
    ("training: the loop, its evaluations, sessions and launchers, and the label-making passes it runs", {
        "uda_ray.training.step", "uda_ray.training.evaluate", "uda_ray.training.sessions", "uda_ray.training.loop",
        "uda_ray.training.launchers", "uda_ray.training.replay", "uda_ray.pipelines.pseudo_labels",
        "uda_ray.pipelines.intrada_rank"}),
    ("reading results: queries, text, reports, the validator study, seed variance", {
        "uda_ray.results.queries", "uda_ray.results.text", "uda_ray.results.markdown", "uda_ray.results.report_data",
        "uda_ray.results.figures", "uda_ray.results.report", "uda_ray.selection.study", "uda_ray.selection.ensv",
        "uda_ray.selection.seed_variance"}),
    ("search and pipelines: Tune and Optuna, the trial driver, the cluster, pipeline stages and actions", {
        "uda_ray.search.experiments", "uda_ray.search.study", "uda_ray.search.journal", "uda_ray.search.searcher",
        "uda_ray.search.scheduler",
        "uda_ray.search.driver", "uda_ray.search.callbacks", "uda_ray.search.cluster", "uda_ray.search.tune",
        "uda_ray.pipelines.actions", "uda_ray.pipelines.runner"}),
    ("the driver side of each API call", {
        "uda_ray.driver.prepare", "uda_ray.driver.queries", "uda_ray.driver.sweeps", "uda_ray.driver.runs",
        "uda_ray.driver.evaluate"}),
    ("the surface: the Python API and the command line", {"uda_ray.api", "uda_ray.cli"}),
]
# Imports that go up a layer, each with the reason (none today).
UPWARD_IMPORTS: dict[tuple[str, str], str] = {}
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 450, 50
# modules allowed past ~400 lines, with the reason
LONG_MODULES = {
    "uda_ray.methods.cpsl": "a method is one file (its Config, its class): CPSL's stage 1 is the largest method",
    "uda_ray.methods.blocks": "the shared building blocks of the methods (discriminator step, EMA, projection heads)",
}


def layer_of(name: str) -> int:
    for i, (_, members) in enumerate(LAYERS):
        if name in members:
            return i
    raise AssertionError(f"{name} is in no layer of tests/test_architecture.py LAYERS: place it")


def test_every_module_is_in_exactly_one_layer():
    for name in MODULES:
        homes = [title for title, members in LAYERS if name in members]
        assert len(homes) == 1, f"{name}: in {len(homes)} layers ({homes})"


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return [f"{name} (layer {layer_of(name)}) imports {dep} (layer {layer_of(dep)})"
            for name in sorted(graph) for dep in sorted(graph[name])
            if layer_of(dep) > layer_of(name) and (name, dep) not in UPWARD_IMPORTS]


def test_imports_run_downward_through_the_layers():
    up = upward_imports({name: imported_modules(name) for name in MODULES})
    assert not up, "imports that go up a layer:\n" + "\n".join(up)


def test_the_layer_check_catches_a_planted_upward_import():
    planted = {"uda_ray.methods.base": {"uda_ray.training.loop"}, "uda_ray.api": {"uda_ray.errors"}}
    assert upward_imports(planted) == ["uda_ray.methods.base (layer 1) imports uda_ray.training.loop (layer 3)"]


def test_modules_and_functions_stay_small():
    long_modules = [f"{n}: {len(p.read_text().splitlines())} lines" for n, p in MODULES.items()
                    if len(p.read_text().splitlines()) > (MAX_MODULE_LINES if n in LONG_MODULES else 400)]
    assert not long_modules, long_modules
    long_functions = [f"{n}.{f.name}: {f.end_lineno - f.lineno + 1} lines" for n, p in MODULES.items()
                      for f in ast.walk(ast.parse(p.read_text()))
                      if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                      and f.end_lineno - f.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long_functions, long_functions


def test_cycle_finder_finds_a_planted_cycle_and_accepts_a_dag():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_import_graph_of_the_package_has_no_cycles_including_function_level_imports():
    graph = {name: imported_modules(name) for name in MODULES}
    assert graph["uda_ray.training.loop"], "the import walker must see loop.py's imports"
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_train_does_not_import_stages():
    assert "uda_ray.pipelines.actions" not in imported_modules("uda_ray.training.loop")


def test_config_imports_neither_methods_nor_models():
    deps = imported_modules("uda_ray.config")
    assert not {d for d in deps if d.startswith(("uda_ray.methods", "uda_ray.models", "uda_ray.build"))}, deps


def test_ray_is_imported_only_in_the_ray_edge_modules():
    importers = {name for name in MODULES if imports_ray(name)}
    assert importers, "the check must see the edge modules' ray imports"
    assert importers <= RAY_EDGE, f"ray imported outside the edge: {sorted(importers - RAY_EDGE)}"


def test_no_method_file_imports_another_method_file():
    methods = {n for n in MODULES if n.startswith("uda_ray.methods.")} - METHOD_BLOCKS
    assert len(methods) >= 10
    for name in sorted(methods):
        others = {d for d in imported_modules(name) if d in methods}
        assert not others, f"{name} imports the method module(s) {sorted(others)}"


def test_methods_use_the_shared_blocks_rather_than_copies():
    def defines(name: str, what: str) -> bool:
        return re.search(rf"^\s*{what}\b", MODULES[name].read_text(), flags=re.M) is not None

    for what in ("def global_rand", "def ema_update", "def projection_head", "class GeneratorState",
                 "class OutputAdversary", "def eval_mode", "def is_distributed", "def photometric",
                 "def pseudo_label_loss"):
        assert defines("uda_ray.methods.blocks", what)
        copies = [n for n in MODULES if n != "uda_ray.methods.blocks" and defines(n, what)]
        assert not copies, f"{what} is defined again in {copies}"


def test_no_name_the_package_exports_from_the_api_is_also_a_submodule():
    """Importing a submodule sets the package attribute of its name: a lazily exported API function of the
    same name would be hidden by the module (as `uda_ray.rerun` once was)."""
    for name in uda_ray.__all__:
        assert f"uda_ray.{name}" not in MODULES, f"uda_ray.{name} is both an API export and a module"
    import importlib

    for mod in ("uda_ray.cli", "uda_ray.training.loop", "uda_ray.pipelines.runner", "uda_ray.results.report",
                "uda_ray.selection.validators"):
        importlib.import_module(mod)
    api = importlib.import_module("uda_ray.api")
    assert all(getattr(uda_ray, name) is getattr(api, name) for name in uda_ray.__all__)


def test_importing_the_package_and_reaching_the_api_loads_neither_torch_nor_ray():
    import subprocess
    import sys

    code = ("import sys, uda_ray; uda_ray.sweep, uda_ray.best, uda_ray.Sweep; "
            "print(sorted(m for m in ('torch', 'ray') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# What users cannot open: the team's internal notes and reports, its issue tracker, its shared folder. User-facing
# text cites the papers and the original repositories instead.
UNCHECKABLE = re.compile(r"METHODS\.md|DESIGN\.md|RAY_NOTES|PERF_NOTES|STYLE\.md|(?<![/\w])[Ii]ssue #?\d+"
                         r"|seed report|the seed's|\bseed 0\d\d\b|(?<![/\w.])shared/")


def user_facing_files() -> list[Path]:
    root = PKG.parent
    return sorted([*PKG.rglob("*.py"), root / "README.md", *root.glob("docs/*.md"), root / "benchmarks" / "README.md",
                   *root.glob("experiments/**/*.md"),
                   *root.glob("experiments/**/*.yaml"), *root.glob("search_spaces/*.yaml"),
                   *root.glob("benchmarks/*.py")])


def test_the_uncheckable_pattern_catches_internal_references_and_spares_urls_and_seeds():
    for bad in ("see METHODS.md", "as in issue 11", "(issue #40)", "the seed report's figure", "the seed's model",
                "seed 001", "shared/PERF_NOTES"):
        assert UNCHECKABLE.search(bad), bad
    for ok in ("https://github.com/YanchaoYang/FDA/issues/40", "the seed recorded", "storage=\"/shared/uda\"",
               "with the seeds `seed + 1`", "seed 0"):
        assert not UNCHECKABLE.search(ok), ok


def test_user_facing_text_cites_no_document_users_do_not_have():
    files = user_facing_files()
    assert len(files) > 50 and any(p.name == "README.md" for p in files)
    hits = [f"{p.relative_to(PKG.parent)}:{i}: {m.group(0)}" for p in files
            for i, line in enumerate(p.read_text().splitlines(), 1) if (m := UNCHECKABLE.search(line))]
    assert not hits, "cite the paper or the original repository instead:\n" + "\n".join(hits)


def test_the_architecture_page_lists_every_module():
    page = (PKG.parent / "docs" / "architecture.md").read_text()
    missing = []
    for name, path in MODULES.items():
        if path.name == "__init__.py" and not path.read_text().strip():
            continue
        folder = path.parent.relative_to(PKG.parent).as_posix()
        section = page.split(f"### `{folder}/`", 1)[-1].split("\n### ", 1)[0] if f"### `{folder}/`" in page else ""
        if f"| `{path.name}` |" not in section:
            missing.append(name)
    assert not missing, f"docs/architecture.md does not list {missing}"
