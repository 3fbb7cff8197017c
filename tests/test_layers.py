"""The import graph runs one way: core → passes → pipeline → cli (docs/design.md, "Layers").

Every `import` / `from … import` in the package's source, at module level or inside a function, is read with
`ast`; a module may import only from its own layer or a lower one.  A new module must be given a layer here.
"""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORE = {"groups", "spaces", "rules", "trace", "graph", "data", "evaluate", "layers", "structure"}
PIPELINE = {"compile", "emit", "loader", "report", "recipe", "methods", "modelfile", "hf", "zoo", "speed",
            "hf_export", "modeling_surgeon", "progress", "cache", "distributed"}
CLI = {"cli"}
RANK = {"core": 0, "passes": 1, "pipeline": 2, "cli": 3}
# The one upward import: `surgeon_fx.load` is resolved on first use by the package's __getattr__ (lazy API).
ALLOWED = {("surgeon_fx", "surgeon_fx.loader")}


def layer_of(module: str) -> str | None:
    """Layer of a dotted module name inside surgeon_fx (None: outside the package)."""
    parts = module.split(".")
    if parts[0] != "surgeon_fx":
        return None
    if len(parts) == 1:
        return "core"  # the package itself exports the core only
    if parts[1] == "passes":
        return "passes"
    for name, members in (("core", CORE), ("pipeline", PIPELINE), ("cli", CLI)):
        if parts[1] in members:
            return name
    raise AssertionError(f"module {module} has no layer: add it to tests/test_layers.py")


def sources() -> list[tuple[str, Path]]:
    found = [(f"surgeon_fx.passes.{p.stem}", p) for p in sorted((ROOT / "passes").glob("*.py"))]
    found += [(f"surgeon_fx.{p.stem}", p) for p in sorted((ROOT / "surgeon_fx").glob("*.py"))]
    return [(name.removesuffix(".__init__"), path) for name, path in found]


def imported(name: str, path: Path) -> list[str]:
    """Dotted names of every module `path` imports (relative imports resolved against `name`)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            out += [mod] + [f"{mod}.{a.name}" for a in node.names if layer_of_safe(f"{mod}.{a.name}")]
    return out


def layer_of_safe(module: str) -> bool:
    """Whether `module` names a module of the package (a `from surgeon_fx import emit` imports a module)."""
    parts = module.split(".")
    return (len(parts) == 2 and parts[0] == "surgeon_fx"
            and parts[1] in CORE | PIPELINE | CLI | {"passes"})


@pytest.mark.parametrize("name,path", sources(), ids=[n for n, _ in sources()])
def test_imports_run_one_way(name, path):
    own = RANK[layer_of(name)]
    for mod in imported(name, path):
        assert not mod.startswith("passes"), f"{name} imports the top-level {mod}: use surgeon_fx.passes"
        layer = layer_of(mod)
        if layer is not None and (name, mod) not in ALLOWED:
            assert RANK[layer] <= own, f"{name} ({layer_of(name)}) imports {mod} ({layer}): a higher layer"


def test_core_import_loads_no_pipeline():
    """`import surgeon_fx` and a pass load no pipeline module (checked in a fresh interpreter)."""
    import subprocess
    import sys

    code = ("import sys, surgeon_fx, surgeon_fx.passes.surgeon, surgeon_fx.passes.rewrite; "
            "print(sorted(m for m in sys.modules if m.startswith('surgeon_fx.')))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    for module in PIPELINE | CLI:
        assert f"'surgeon_fx.{module}'" not in loaded, f"importing the core and passes loaded surgeon_fx.{module}"


def test_load_is_the_function():
    """`surgeon_fx.load` stays the loader function even after the loader module is imported."""
    import surgeon_fx
    import surgeon_fx.loader  # noqa: F401

    assert callable(surgeon_fx.load) and surgeon_fx.load.__module__ == "surgeon_fx.loader"


def test_wheel_has_no_top_level_passes(tmp_path):
    """The built wheel installs the passes as surgeon_fx.passes and nothing at the top level but surgeon_fx."""
    import shutil
    import subprocess
    import sys
    import zipfile

    pytest.importorskip("setuptools")
    src = tmp_path / "src"  # a copy: setuptools builds in-tree (build/, *.egg-info)
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for name in ("surgeon_fx", "passes"):
        shutil.copytree(ROOT / name, src / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(src),
                    "-w", str(tmp_path)], check=True, capture_output=True, cwd=tmp_path)
    (wheel,) = tmp_path.glob("surgeon_fx-*.whl")
    tops = {n.split("/")[0] for n in zipfile.ZipFile(wheel).namelist() if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"surgeon_fx"}
    assert "surgeon_fx/passes/surgeon.py" in zipfile.ZipFile(wheel).namelist()
