"""The package's structure: every module imports on its own, and imports go one way."""

import ast
import subprocess
import sys
from pathlib import Path


PACKAGE = Path(__file__).resolve().parent.parent / "gradflow"

# Layers, lowest first: a module may import only from its own layer or lower ones.
LAYERS = [
    {"_status", "_validate", "_numerics", "models", "data", "datasets"},
    {"objectives", "_vector_field"},
    {"observers", "trajectory", "stiffness", "solvers", "_progress"},
    {"_solve", "_flow", "_sweep", "_descent"},
    {"analysis"},
    {"theorem2", "plotting", "experiments", "verify", "sweep_report", "cli"},
]


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        yield ".".join(p for p in parts if p != "__init__"), path


def _top(name: str) -> str:
    """`gradflow.models.cp` -> `models`."""
    return name.split(".")[1] if name.count(".") else ""


def _layer(top: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if top in layer)


def _imports(module: str, path: Path):
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            target = f"{base}.{node.module}" if node.module else base
            names = [f"{target}.{a.name}" for a in node.names] if not node.module else [target]
            # `from .. import __version__`: a name of the package, not a module of it
            yield from (n if _is_module(n) else target for n in names)


def _is_module(name: str) -> bool:
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.is_dir() or path.with_suffix(".py").is_file()


def test_every_module_imports_on_its_own():
    # `import gradflow.x` runs `gradflow/__init__.py` first, so every fresh interpreter
    # imports the whole package the same way: one interpreter per module would repeat
    # one import 50 times. One fresh interpreter imports the submodules, each through
    # its own name, in reverse layer order (the highest first, which is what a cycle
    # through a lower layer would break), and reports each failure.
    modules = sorted((m for m, _ in _modules()), key=lambda m: -_layer(_top(m) or "models"))
    code = ("import importlib, sys, traceback\nfailed = []\n"
            f"for name in {modules!r}:\n"
            "    try:\n        importlib.import_module(name)\n"
            "    except Exception:\n        failed.append(name + ': ' + traceback.format_exc())\n"
            "print('\\n'.join(failed)); sys.exit(bool(failed))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]


def test_imports_go_one_way():
    back_edges = []
    for module, path in _modules():
        if module == "gradflow":
            continue
        own = _top(module)
        for target in _imports(module, path):
            other = _top(target)
            if other and other != own and _layer(other) > _layer(own):
                back_edges.append(f"{module} -> {target}")
    assert not back_edges, back_edges


def test_every_module_is_in_a_layer():
    tops = {_top(m) for m, _ in _modules()} - {""}
    placed = set().union(*LAYERS)
    assert tops <= placed, tops - placed
