"""The house rules a newcomer relies on (issue 19): imports point down the package layers, and every command the
README and docs quote exists."""

from __future__ import annotations

import ast
import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# moe/ at the bottom, data_pipeline/ above it, cluster/ and cascade/ side by side above that, serving/ on top
# (shared/STYLE.md, "Where things live").
LAYERS = {"moe": 0, "data_pipeline": 1, "cluster": 2, "cascade": 2, "serving": 3}
# The user's commands that start what lives above moe/: they may reach upward, inside a function only.
ENTRY_POINTS = {"moe/train.py", "moe/serve.py"}


def _imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported module, line, at module level?) of every absolute import in a file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    nested = {id(node) for parent in ast.walk(tree) if isinstance(parent, (ast.FunctionDef, ast.AsyncFunctionDef))
              for node in ast.walk(parent)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno, id(node) not in nested) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, node.lineno, id(node) not in nested))
    return found


def test_imports_point_down_the_package_layers() -> None:
    """No package imports one above it or beside it (cluster <-> cascade), so there are no cycles; moe/train.py and
    moe/serve.py alone reach up, lazily inside a function."""
    violations = []
    for package, layer in LAYERS.items():
        files = sorted((ROOT / package).rglob("*.py"))
        assert files, package
        for path in files:
            name = str(path.relative_to(ROOT))
            for module, line, top_level in _imports(path):
                target = module.split(".")[0]
                if target not in LAYERS or target == package or LAYERS[target] < layer:
                    continue
                if name in ENTRY_POINTS and not top_level:
                    continue
                violations.append(f"{name}:{line} imports {module} ({package} may import only "
                                  f"{sorted(p for p, l in LAYERS.items() if l < layer) or 'nothing above it'})")
    assert not violations, "\n".join(violations)


def test_the_layer_rule_catches_an_upward_import(tmp_path) -> None:
    """The scanner sees module-level and nested imports (a check that cannot fail would prove nothing)."""
    path = tmp_path / "m.py"
    path.write_text("import cluster.launch\n\ndef f():\n    from serving.app import build_app\n")
    assert _imports(path) == [("cluster.launch", 1, True), ("serving.app", 4, False)]


COMMAND = re.compile(r"python -m ([A-Za-z_][\w.]*)|python (benchmarks/[\w/]+\.py)|bash (benchmarks/[\w/]+\.sh)"
                     r"|\bmake ([a-z][\w-]*)|\+experiment=(\w+)")


def _documents() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")), ROOT / "infra" / "README.md"]


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


def test_every_documented_command_exists() -> None:
    """Each `python -m MODULE`, benchmark script, `make TARGET` and `+experiment=NAME` quoted in README.md and
    docs/ names something that exists (a module that imports, a file, a Makefile target, a config). Lines that
    record a command "at the time" of an old measurement are history, not instructions."""
    targets = set(re.findall(r"^([a-z][\w-]*):", (ROOT / "Makefile").read_text(), flags=re.M))
    experiments = {p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml")}
    missing, seen = [], 0
    for document in _documents():
        for number, line in enumerate(document.read_text().splitlines(), 1):
            if "at the time" in line:
                continue
            for module, script, shell, target, experiment in COMMAND.findall(line):
                seen += 1
                where = f"{document.relative_to(ROOT)}:{number}"
                if module and not _importable(module):
                    missing.append(f"{where}: python -m {module}: no such module")
                if (script or shell) and not (ROOT / (script or shell)).is_file():
                    missing.append(f"{where}: {script or shell}: no such file")
                if target and target not in targets:
                    missing.append(f"{where}: make {target}: no such Makefile target")
                if experiment and experiment not in experiments:
                    missing.append(f"{where}: +experiment={experiment}: no conf/experiment/{experiment}.yaml")
    assert seen > 50, seen  # the scan found the commands (a broken pattern would pass on nothing)
    assert not missing, "\n".join(missing)


def test_moved_commands_say_where_they_went() -> None:
    """`python -m moe.plan` / `moe.evaluate` moved to cluster/ (they compose configs and read data above moe/):
    the old names exit 2 naming the new command instead of failing with an import error."""
    import subprocess
    import sys

    for old, new in (("moe.plan", "python -m cluster.plan"), ("moe.evaluate", "python -m cluster.evaluate")):
        result = subprocess.run([sys.executable, "-m", old], capture_output=True, text=True, cwd=ROOT, timeout=60)
        assert result.returncode == 2 and new in result.stderr, (old, result.stderr)
