"""Which source files a stage runs, derived from its imports (never a hand-written list that can drift).

A stage's code dependencies are the transitive closure of the `qlora_pipeline` modules its module imports, at top
level or inside a function (lazy imports count: they run). The closure feeds the stage's code hash (the Prefect
cache key and the flow's currency check) and the `deps` of its dvc.yaml entry, so editing any file a stage can
reach re-runs it, and editing a file it cannot reach does not.
"""

from __future__ import annotations

import ast
import hashlib
from pathlib import Path

from qlora_pipeline.stages.contract.runtime import REPO_ROOT

NAMESPACE = "qlora_pipeline"
FOLDERS = ("kernels", "stages", "pipelines")
"""The product's top-level folders, installed as `qlora_pipeline.<folder>` (pyproject.toml `package-dir`)."""
SOURCE_ROOT = REPO_ROOT
"""Where the folders are read from (the checkout; tests point it at a copy to edit code safely)."""


def module_file(module: str, root: Path | None = None) -> Path | None:
    """The source file of a `qlora_pipeline.*` module or package (its `__init__.py`); None if not ours or absent."""
    root = SOURCE_ROOT if root is None else root
    parts = module.split(".")
    if parts[0] != NAMESPACE or len(parts) < 2 or parts[1] not in FOLDERS:
        return None
    base = root.joinpath(*parts[1:])
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(path: Path) -> set[str]:
    """Every `qlora_pipeline.*` module a file imports, anywhere in it (`from pkg import mod` names the module)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith(NAMESPACE + "."))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(NAMESPACE + "."):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)  # kept only where it is a module
    return found


def code_files(module: str, root: Path | None = None) -> tuple[str, ...]:
    """Repo-relative POSIX paths of `module` and every product module it reaches through imports, sorted."""
    root = SOURCE_ROOT if root is None else root
    seen: dict[str, Path] = {}
    todo = [module]
    while todo:
        name = todo.pop()
        path = module_file(name, root)
        if path is None or name in seen:
            continue
        seen[name] = path
        parts = name.split(".")
        for i in range(3, len(parts)):  # importing a.b.c runs the __init__ of each package on the way
            todo.append(".".join(parts[:i]))
        todo.extend(imported_modules(path))
    return tuple(sorted({p.relative_to(root).as_posix() for p in seen.values()}))


def code_hash(files: tuple[str, ...] | list[str], root: Path | None = None) -> str:
    """Content hash of a stage's source files (`StageSpec.code()`, repo-relative), for cache keys and currency."""
    root = SOURCE_ROOT if root is None else root
    h = hashlib.sha256()
    for rel in sorted(files):
        path = root / rel
        h.update(rel.encode())
        h.update(path.read_bytes() if path.is_file() else b"<missing>")
    return h.hexdigest()
