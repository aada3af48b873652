"""Import checks for the layering (flows -> pipeline -> registry, runtime below all): static and live."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imported_names(folder: Path) -> dict[str, list[str]]:
    """file -> every module it imports (top level, in functions and under TYPE_CHECKING alike)."""
    out: dict[str, list[str]] = {}
    for path in sorted(folder.rglob("*.py")):
        names = []
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names += [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        out[str(path.relative_to(ROOT))] = names
    return out


def forbidden_imports(folder: str, forbidden: tuple[str, ...]) -> list[str]:
    """'file: module' for each import in ROOT/folder of a module under one of `forbidden`."""
    return [
        f"{file}: {name}"
        for file, names in imported_names(ROOT / folder).items()
        for name in names
        if any(name == f or name.startswith(f + ".") for f in forbidden)
    ]


def loaded_after_import(package: str, watch: tuple[str, ...]) -> list[str]:
    """Import `package` and every submodule in a fresh interpreter; which of `watch` got loaded."""
    code = (
        "import importlib, pkgutil, sys\n"
        f"pkg = importlib.import_module({package!r})\n"
        "for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + '.'):\n"
        "    importlib.import_module(m.name)\n"
        f"print(','.join(w for w in {watch!r} if w in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True, text=True)
    return [w for w in done.stdout.strip().split(",") if w]
