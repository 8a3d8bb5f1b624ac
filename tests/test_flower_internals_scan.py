"""Nothing outside fedfsd/flower/ imports a non-public flwr module or name.

What is public is read from the installed flwr 1.39 (see fedfsd/flower/__init__.py): the
packages `flwr/__init__.py` exports, and inside them only what their `__all__` lists.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import re
from pathlib import Path

import flwr

ROOT = Path(__file__).resolve().parent.parent
SCANNED = ("fedfsd", "experiments", "tests", "docker", "examples")
ALLOWED = ROOT / "fedfsd" / "flower"


def _top_level_public() -> set[str]:
    """flwr.__all__ plus the legacy packages flwr/__init__.py re-exports or lazily exports."""
    tree = ast.parse(Path(flwr.__file__).read_text(encoding="utf-8"))
    names = set(flwr.__all__)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module is None:
            names |= {a.name for a in node.names if a.asname == a.name}
    names |= set(getattr(flwr, "_LAZY_EXPORTS", {}))
    return names


TOP = _top_level_public()


def _exports(module: str) -> set[str]:
    if module == "flwr":
        return TOP
    return set(getattr(importlib.import_module(module), "__all__", ()))


def is_public(module: str, name: str | None = None) -> bool:
    """Whether `import module` (or `from module import name`) uses only public flwr API."""
    parts = module.split(".")
    for i in range(1, len(parts)):
        if parts[i] not in _exports(".".join(parts[:i])):
            return False
    return name is None or name in _exports(module)


def private_imports(path: Path) -> list[str]:
    """`file:line module[.name]` for each non-public flwr import in `path`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            bad = [a.name for a in node.names if a.name.split(".")[0] == "flwr"]
            bad = [m for m in bad if not is_public(m)]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] != "flwr":
                continue
            bad = [
                f"{node.module}.{a.name}" for a in node.names if not is_public(node.module, a.name)
            ]
        else:
            continue
        where = path.relative_to(ROOT) if ROOT in path.parents else path.name
        found += [f"{where}:{node.lineno} {b}" for b in bad]
    return found


def private_module_names(path: Path) -> list[str]:
    """`file:line name` for each string naming an existing non-public flwr module (a module
    reached by name, e.g. to patch it, is as much a use of internals as an import)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if not (isinstance(node, ast.Constant) and isinstance(node.value, str)):
            continue
        name = node.value
        if not re.fullmatch(r"flwr(\.[a-z_0-9]+)+", name) or is_public(name):
            continue
        try:
            exists = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:
            exists = False
        if exists:
            where = path.relative_to(ROOT) if ROOT in path.parents else path.name
            found.append(f"{where}:{node.lineno} {name}")
    return found


def test_the_rule_tells_public_from_private() -> None:
    assert TOP >= {"app", "clientapp", "serverapp", "common", "simulation"}
    assert is_public("flwr.app", "Error") and is_public("flwr.serverapp.strategy", "FedAvg")
    assert is_public("flwr.simulation", "run_simulation") and is_public("flwr.clientapp")
    assert not is_public("flwr.app.error", "Error")
    assert not is_public("flwr.supercore.task_identity", "TaskIdentity")
    assert not is_public("flwr.common.serde", "context_from_proto")
    assert not is_public("flwr.common", "serde") and not is_public("flwr.cli.app", "app")


def test_the_scan_finds_a_private_import(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text(
        "from flwr.app import Message\nimport flwr.supernode.cli\n"
        "from flwr.common import serde, Context\n",
        encoding="utf-8",
    )
    assert private_imports(probe) == [
        "probe.py:2 flwr.supernode.cli",
        "probe.py:3 flwr.common.serde",
    ]
    probe.write_text(
        'import logging\nlogging.getLogger("flwr.fedfsd.x")\n'
        'SITE = "flwr.superlink.grid.http_grid"\n',
        encoding="utf-8",
    )
    assert private_module_names(probe) == ["probe.py:3 flwr.superlink.grid.http_grid"]


def test_nothing_outside_fedfsd_flower_imports_flwr_internals() -> None:
    files = [
        p
        for d in SCANNED
        if (ROOT / d).is_dir()
        for p in sorted((ROOT / d).rglob("*.py"))
        if ALLOWED not in p.parents
    ]
    assert len(files) > 50
    found = [hit for p in files for hit in private_imports(p)]
    # This file names private modules as examples of the rule; every other file may not.
    me = Path(__file__).resolve()
    found += [hit for p in files if p != me for hit in private_module_names(p)]
    assert found == [], "non-public flwr imports outside fedfsd/flower/:\n" + "\n".join(found)
