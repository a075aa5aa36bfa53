"""The shape of the package: no import cycles, Ray only at the edges, no method importing another method.

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
    return sorted([*PKG.rglob("*.py"), root / "README.md", *root.glob("experiments/**/*.md"),
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
