"""Layers point down: every import of the package goes to its own stage or one before it in
:data:`STAGES` (the order of README's package layout), and the serving stage loads no Lightning."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "cascade_routing"

#: the declared stage order, first = lowest; a module may import its own stage and those before it.
#: ``configs`` holds packaged files (price table, YAML), ``__init__``/``__main__`` are the root API.
STAGES = ("configs", "data", "interfaces", "policies", "evaluation", "estimators", "calibration", "training",
          "serving", "cli", "root")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def stage_of(module: str) -> str:
    """``cascade_routing.<stage>...`` -> stage; the package root and ``__main__`` -> ``root``."""
    parts = module.split(".")
    if len(parts) == 1 or parts[1] == "__main__":
        return "root"
    return parts[1]


def _type_checking_only(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def package_imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported module) for every import of ``cascade_routing`` in the file, at any depth
    (a function-level import is a dependency too); imports under ``if TYPE_CHECKING:`` are skipped
    (they never run)."""
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[tuple[int, str]] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _type_checking_only(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.extend((node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "cascade_routing")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] == "cascade_routing":
                if target == "cascade_routing":
                    # `from cascade_routing import data` names a stage; `__version__` is metadata, not a
                    # stage; any other name is the root's lazy API (which reaches every stage)
                    for a in node.names:
                        if a.name in STAGES:
                            found.append((node.lineno, f"cascade_routing.{a.name}"))
                        elif not (a.name.startswith("__") and a.name.endswith("__")):
                            found.append((node.lineno, target))
                else:
                    found.append((node.lineno, target))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
    return found


def upward_imports() -> list[str]:
    rank = {stage: i for i, stage in enumerate(STAGES)}
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        here = stage_of(module_name(path))
        assert here in rank, f"{path.relative_to(ROOT)}: stage {here!r} is not in STAGES {STAGES}"
        for line, target in package_imports(path):
            there = stage_of(target)
            assert there in rank, f"{path.relative_to(ROOT)}:{line} imports {target}: unknown stage {there!r}"
            if rank[there] > rank[here]:
                problems.append(f"{path.relative_to(ROOT)}:{line} ({here}) imports {target} ({there})")
    return problems


def test_imports_point_down_the_stage_order():
    problems = upward_imports()
    assert not problems, "imports pointing up the stage order:\n" + "\n".join(problems)


def test_the_checker_sees_an_upward_import(tmp_path, monkeypatch):
    """The checker is not vacuous: a policy module importing the serving stage is reported, also when
    the import sits inside a function, and a TYPE_CHECKING-only import is not."""
    fake_root = tmp_path
    pkg = fake_root / "cascade_routing"
    (pkg / "policies").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "policies" / "__init__.py").write_text("")
    (pkg / "policies" / "bad.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "from cascade_routing.data import dataset\nfrom cascade_routing import __version__\n"
        "if TYPE_CHECKING:\n    from cascade_routing.training.module import X\n"
        "def f():\n    from cascade_routing.serving import router\n"
        "    from . import rollout\n")
    monkeypatch.setitem(globals(), "ROOT", fake_root)
    monkeypatch.setitem(globals(), "PACKAGE", pkg)
    assert upward_imports() == [
        "cascade_routing/policies/bad.py:7 (policies) imports cascade_routing.serving (serving)"]


def test_readme_declares_the_same_order():
    """README's layout section states the order this test enforces."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    match = re.search(r"^Stage order[^\n]*?:\s*(.+)$", readme, re.MULTILINE)
    assert match, "README.md has no 'Stage order ...: `a` → `b` ...' line"
    declared = tuple(re.findall(r"`([a-z_]+)`", match.group(1)))
    assert declared == STAGES[:-1], f"README declares {declared}, the test enforces {STAGES[:-1]}"
    for stage in STAGES[:-1]:
        if (PACKAGE / stage).is_dir():
            assert f"`cascade_routing/{stage}/`" in readme, f"README's layout table lacks cascade_routing/{stage}/"


def lightning_loaded_by(imports: str) -> str:
    """The Lightning modules a fresh interpreter has loaded after running ``imports``."""
    code = (f"import sys\n{imports}\n"
            "print(','.join(sorted(m for m in sys.modules\n"
            "                      if m == 'lightning' or m.startswith(('lightning.', 'pytorch_lightning')))))")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()


def test_serving_imports_no_lightning():
    loaded = lightning_loaded_by(
        "import cascade_routing.serving, cascade_routing.serving.server, cascade_routing.serving.router\n"
        "from cascade_routing.serving.checkpoint import router_parts\n"
        "import cascade_routing.estimators.artifact")
    assert loaded == "", f"serving loaded Lightning modules: {loaded[:200]}"


def test_policies_evaluation_and_calibration_import_no_lightning():
    """The engine stages and the calibration after training are plain torch: no Lightning."""
    loaded = lightning_loaded_by(
        "import cascade_routing.policies, cascade_routing.policies.relaxation, cascade_routing.evaluation\n"
        "import cascade_routing.evaluation.reproduce, cascade_routing.calibration")
    assert loaded == "", f"loaded Lightning modules: {loaded[:200]}"


def test_the_lightning_probe_sees_lightning():
    """The probe above is not vacuous: the training stage does load Lightning."""
    assert "lightning" in lightning_loaded_by("import cascade_routing.training.module").split(",")
