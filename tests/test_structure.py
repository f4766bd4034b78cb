"""The shape of the code: lint and format clean, no import cycles, and the wall between the
Airflow side and the training stack, read from the source of every module."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = {"loraflow": REPO / "plugins" / "loraflow", "loraflow_trainer": REPO / "trainer_image" / "loraflow_trainer"}
TRAINING_STACK = {"torch", "transformers", "peft", "bitsandbytes", "opacus", "accelerate", "trl"}


def _modules() -> dict[str, Path]:
    found = {}
    for top, root in PACKAGES.items():
        for path in root.rglob("*.py"):
            parts = path.relative_to(root).with_suffix("").parts
            name = ".".join((top, *parts))
            found[name.removesuffix(".__init__")] = path
    return found


def _imports(path: Path, name: str, module_level_only: bool) -> set[str]:
    """What ``path`` imports (absolute names), at module level or anywhere in it."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    nodes = tree.body if module_level_only else list(ast.walk(tree))
    if module_level_only:  # `if TYPE_CHECKING:` blocks never run
        nodes = [n for n in nodes if not (isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test))]
    out = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            # `from pkg import mod` depends on pkg.mod; `from mod import func` on mod (resolved by the caller).
            out |= {f"{base}.{a.name}" if base else a.name for a in node.names}
    return out


def test_the_airflow_side_never_imports_the_training_stack_and_the_trainer_never_imports_airflow():
    offenders = []
    airflow_side = [p for p in (REPO / "plugins").rglob("*.py")] + list((REPO / "dags").rglob("*.py"))
    for path in airflow_side:
        heavy = {i for i in _imports(path, "loraflow.x", module_level_only=False) if i.split(".")[0] in TRAINING_STACK}
        offenders += [f"{path.relative_to(REPO)} imports {i}" for i in sorted(heavy)]
    for path in PACKAGES["loraflow_trainer"].rglob("*.py"):
        if any(i.split(".")[0] == "airflow" for i in _imports(path, "loraflow_trainer.x", module_level_only=False)):
            offenders.append(f"{path.relative_to(REPO)} imports airflow")
    assert not offenders, offenders


def test_the_contract_and_the_job_spec_import_nothing_heavy():
    for name in ("contract", "spec", "errors"):
        path = PACKAGES["loraflow_trainer"] / f"{name}.py"
        tops = {i.split(".")[0] for i in _imports(path, f"loraflow_trainer.{name}", module_level_only=False)}
        assert not tops & (TRAINING_STACK | {"airflow", "mlflow"}), (name, tops)


def test_the_module_import_graph_has_no_cycles():
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        deps = set()
        for imported in _imports(path, name, module_level_only=True):
            while imported and imported not in modules:
                imported = imported.rpartition(".")[0]
            if imported and imported != name:
                deps.add(imported)
        graph[name] = deps
    cycles, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":  # dep is on the path to node: a cycle
                cycles.append(" -> ".join([*path[path.index(dep) :], dep]))
            elif dep not in state:
                visit(dep, [*path, dep])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, cycles


def _ruff() -> list[str]:
    exe = Path(sys.executable).with_name("ruff")
    if exe.exists():
        return [str(exe)]
    if shutil.which("ruff"):
        return ["ruff"]
    pytest.fail("ruff is not installed; `make setup` installs the pinned one (pyproject's dev extra)")


def test_ruff_lint_is_clean():
    out = subprocess.run([*_ruff(), "check", "--no-cache", "."], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]


def test_ruff_format_is_clean():
    out = subprocess.run([*_ruff(), "format", "--check", "--no-cache", "."], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
