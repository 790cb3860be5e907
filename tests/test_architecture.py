"""The import graph the tree promises: model/ is pure (no pipelines), and each stage package of pipelines/ imports
only the packages below it. Read from the source (every import statement, function-local ones included), so
a new upward import fails here before it can make a cycle."""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Package -> the pipelines packages it may import. `model` is below all of them and may import none.
ALLOWED = {
    "core": set(),
    "data": {"core"},
    "inference": {"core", "data"},
    "train": {"core", "data", "inference"},
    "vae": {"core", "data", "train"},
    "synthetic": {"core", "data"},
    "eval": {"core", "data", "inference", "synthetic"},
    "demo": {"core", "data", "inference", "train", "vae", "synthetic", "eval"},
}


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            if node.module == "pipelines":  # `from pipelines import data` names a package
                found.update(f"pipelines.{alias.name}" for alias in node.names)
    return found


def _package_of(path: Path) -> str:
    """pipelines/train/step.py -> train; pipelines/demo.py -> demo."""
    parts = path.relative_to(REPO / "pipelines").parts
    return parts[0] if len(parts) > 1 else Path(parts[0]).stem


def test_every_pipelines_module_lives_in_a_stage_package():
    top_level = sorted(p.name for p in (REPO / "pipelines").glob("*.py") if p.name != "__init__.py")
    assert top_level == ["demo.py"], "a module beside the stage packages: give it a package"
    packages = sorted(p.name for p in (REPO / "pipelines").iterdir() if (p / "__init__.py").is_file())
    assert packages == sorted(set(ALLOWED) - {"demo"})


@pytest.mark.parametrize("path", sorted((REPO / "pipelines").rglob("*.py")), ids=lambda p: str(p.relative_to(REPO)))
def test_pipelines_imports_point_down(path):
    package = _package_of(path)
    if package == "__init__":
        return
    used = {m.split(".")[1] for m in _imported_modules(path) if m.startswith("pipelines.")}
    upward = used - ALLOWED[package] - {package}
    assert not upward, f"{path.relative_to(REPO)} ({package}) imports {sorted(upward)}, above it"


@pytest.mark.parametrize("path", sorted((REPO / "model").rglob("*.py")), ids=lambda p: str(p.relative_to(REPO)))
def test_model_imports_no_pipeline_code(path):
    used = {m for m in _imported_modules(path) if m.split(".")[0] in {"pipelines", "jobs", "bench"}}
    assert not used, f"{path.relative_to(REPO)} imports {sorted(used)}: model/ is torch-only"


def test_the_rule_itself_catches_an_upward_import(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from pipelines.train.driver import run_training\n")
    assert "pipelines.train.driver" in _imported_modules(module)
