"""The package's architecture, checked: no import cycle in deeplab_fast, nothing outside deeplab_fast/cli imports the
command line (``python -m deeplab_fast``'s ``__main__`` aside), the test helpers live only in tests/helpers.py, and
the README's recipe table is the one ``deeplab_fast.train.recipes_table()`` makes."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "deeplab_fast"


def _modules() -> dict:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        mods[name[: -len(".__init__")] if name.endswith(".__init__") else name] = path
    return mods


def _imports(path: Path, module: str, mods: dict, is_pkg: bool) -> set:
    """The deeplab_fast modules ``path`` imports, anywhere in the file (function-level imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = module.split(".") if is_pkg else module.split(".")[:-1]
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join(parts + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        for n in names:
            while n and n not in mods:
                n = n.rpartition(".")[0]
            if n:
                found.add(n)
    return found


def _graph() -> dict:
    mods = _modules()
    graph = {}
    for m, p in mods.items():
        deps = _imports(p, m, mods, p.name == "__init__.py")
        # A package importing its own children, and a child reaching its parent package, are not cycles.
        graph[m] = {d for d in deps if d != m and not d.startswith(m + ".") and not m.startswith(d + ".")}
    return graph


def test_no_import_cycle():
    graph = _graph()
    index, low, stack, on, cycles = {}, {}, [], set(), []

    def strong(v, counter=[0]):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    assert not cycles, f"import cycles: {cycles}"


def test_nothing_outside_the_cli_imports_it():
    graph = _graph()
    offenders = sorted(m for m, deps in graph.items()
                       if not (m == "deeplab_fast.cli" or m.startswith("deeplab_fast.cli."))
                       and m != "deeplab_fast.__main__"
                       and any(d == "deeplab_fast.cli" or d.startswith("deeplab_fast.cli.") for d in deps))
    assert not offenders, f"library modules importing the CLI: {offenders}"
    for path in (ROOT / "benchmarks").glob("*.py"):
        assert "deeplab_fast.cli" not in path.read_text(), f"{path.name} imports the CLI"


# The Python layers outside the kernels: imports at module level, modules of a readable size.
_LAYERS = ("train", "models", "cli", "data")
_TOP_MODULES = ("io.py", "optimize.py", "benchmark.py")
MAX_LINES = 450


def _layer_files():
    for layer in _LAYERS:
        yield from sorted((PACKAGE / layer).rglob("*.py"))
    for name in _TOP_MODULES:
        yield PACKAGE / name


def test_imports_are_at_module_level():
    """A function-local import anywhere in the package carries a comment (on its line or the line above) saying
    what forces it; everything else is imported at the top of the module."""
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for sub in ast.walk(node):
                    if isinstance(sub, (ast.Import, ast.ImportFrom)):
                        here, above = lines[sub.lineno - 1], lines[sub.lineno - 2].strip()
                        if "#" not in here and not above.startswith("#"):
                            offenders.append(f"{path.relative_to(ROOT)}:{sub.lineno} in {node.name}()")
    assert not offenders, f"function-local imports without a comment saying why: {offenders}"


def test_modules_stay_readable():
    long = [f"{p.relative_to(ROOT)}: {n} lines" for p in _layer_files()
            if (n := len(p.read_text().splitlines())) > MAX_LINES]
    assert not long, f"modules over {MAX_LINES} lines (split them by responsibility): {long}"


def test_test_helpers_live_in_helpers_py():
    """Test files share code through tests/helpers.py only, never by importing each other."""
    tests = ROOT / "tests"
    names = {p.stem for p in tests.glob("test_*.py")}
    for path in tests.glob("test_*.py"):
        if path.name == "test_layout.py":
            continue
        text = path.read_text()
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Import):
                imported = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                imported = [node.module or ""]
            else:
                continue
            assert not set(imported) & names, f"{path.name} imports another test file: {set(imported) & names}"
        assert "spec_from_file_location" not in text, f"{path.name} loads a file as a module"


def _between(text: str, start_marker: str, end_marker: str) -> str:
    start = text.index("\n", text.index(start_marker)) + 1
    return text[start:text.index(end_marker)]


def test_docs_recipe_table_is_generated_from_the_recipes():
    from deeplab_fast.train import recipes_table

    page = (ROOT / "docs" / "guide" / "training.md").read_text()
    assert _between(page, "<!-- recipes table:", "<!-- end of recipes table -->") == recipes_table(), (
        "docs/guide/training.md's recipe table is stale: paste recipes_table()")


def test_readme_headline_table_is_generated_from_the_benchmark_results():
    """README's benchmark and model tables are docs/hooks/benchmark_tables.py's headline_table() and
    models_table(), made from benchmarks/results/*.json and the weights' metadata (run the script's function and
    paste it after a benchmark run)."""
    import runpy

    tables = runpy.run_path(str(ROOT / "docs" / "hooks" / "benchmark_tables.py"))
    readme = (ROOT / "README.md").read_text()
    assert _between(readme, "<!-- headline table:", "<!-- end of headline table -->") == tables["headline_table"](), (
        "README's headline table is stale: paste docs/hooks/benchmark_tables.py's headline_table()")
    assert _between(readme, "<!-- models table:", "<!-- end of models table -->") == tables["models_table"](), (
        "README's model table is stale: paste docs/hooks/benchmark_tables.py's models_table()")


def test_readme_sweep_table_is_generated_from_the_benchmark_results():
    """README's CPU sweep table is docs/hooks/benchmark_tables.py's sweep_table(), made from
    benchmarks/results/*-crf-sweep.json."""
    import runpy

    tables = runpy.run_path(str(ROOT / "docs" / "hooks" / "benchmark_tables.py"))
    readme = (ROOT / "README.md").read_text()
    assert _between(readme, "<!-- sweep table:", "<!-- end of sweep table -->") == tables["sweep_table"](), (
        "README's sweep table is stale: paste docs/hooks/benchmark_tables.py's sweep_table()")


def test_ci_runs_the_readme_test_command_verbatim():
    """.ci/run's step 3 runs the test command the README gives, character for character."""
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    command = ci[ci.index("  # README test command") + 1].strip()
    readme = (ROOT / "README.md").read_text()
    assert f"\n{command}\n" in readme, f"README.md does not give CI's test command {command!r}"
    assert len(readme.splitlines()) <= 200, "README.md is the front page: at most ~200 lines, the rest in docs/"


def test_cpp_includes_run_down_into_device_folders_only():
    """csrc/: a file shared by the devices (csrc/common/, csrc/<op>/*) includes nothing from a cpu/ or cuda/ folder,
    and a device folder nothing from the other device's: the include graph runs from the device folders to the
    shared files, never back up."""
    import re

    csrc = ROOT / "csrc"
    offenders = []
    for path in sorted(csrc.rglob("*")):
        if path.suffix not in (".h", ".cpp", ".cu", ".cuh"):
            continue
        folder = path.parent.name
        for line in path.read_text().splitlines():
            m = re.match(r'\s*#\s*include\s+"([^"]+)"', line)
            if not m:
                continue
            target = (path.parent / m.group(1)).resolve()
            if not target.exists():
                target = (csrc / m.group(1)).resolve()
            parts = target.relative_to(csrc).parts[:-1]
            device = next((p for p in parts if p in ("cpu", "cuda")), None)
            if device is not None and device != folder:
                offenders.append(f"{path.relative_to(ROOT)} includes {m.group(1)}")
    assert not offenders, "includes running up into a device folder:\n" + "\n".join(offenders)
