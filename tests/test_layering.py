"""The package layering, read from the source with `ast` (every import, lazy ones inside functions and
TYPE_CHECKING ones included):

    common/                      imports no role package
    actors/, learner/, rewards/  import common/ (and rollout workers import rewards.combine), never
                                 each other otherwise: what two roles share lives in common/
    cluster/                     the controller: any of the above
    bench/, deploy/              anything

and every first-party import names a module and names that exist, so a moved module cannot leave a
stale import behind in a function no test happens to call."""

from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("common", "actors", "learner", "rewards", "cluster", "bench", "deploy")
FORBIDDEN = {
    "common": {"actors", "learner", "rewards", "cluster", "bench", "deploy"},
    "actors": {"learner", "cluster", "bench"},
    "learner": {"actors", "rewards", "cluster", "bench"},
    "rewards": {"actors", "learner", "cluster", "bench"},
    "cluster": {"bench"},
}


def _imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, module as written, imported names) of every import statement in a file."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            # The project imports absolutely (relative imports would hide which package is reached).
            module = node.module if not node.level else "." * node.level + (node.module or "")
            out.append((node.lineno, module, [alias.name for alias in node.names]))
    return out


def _files(*dirs: str) -> list[Path]:
    return sorted(p for d in dirs for p in (ROOT / d).rglob("*.py"))


def forbidden_arrows() -> list[str]:
    bad = []
    for package, banned in FORBIDDEN.items():
        for path in _files(package):
            for line, module, _ in _imports(path):
                if module.split(".")[0] in banned:
                    bad.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    return bad


def test_no_package_imports_a_layer_above_it_or_a_sibling_role():
    assert forbidden_arrows() == []


def test_imports_are_absolute():
    relative = [
        f"{p.relative_to(ROOT)}:{line}"
        for p in _files(*PACKAGES, "tests")
        for line, module, _ in _imports(p)
        if module.startswith(".")
    ]
    assert relative == []


def test_the_check_sees_lazy_and_type_checking_imports(tmp_path, monkeypatch):
    # A forbidden arrow hidden in a function body or under TYPE_CHECKING is still one.
    fake = tmp_path / "common"
    fake.mkdir()
    (fake / "bad.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import cluster.driver\n"
        "def f():\n    from learner.update import arcopo_update\n"
    )
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert forbidden_arrows() == ["common/bad.py:3 imports cluster.driver", "common/bad.py:5 imports learner.update"]


@pytest.mark.parametrize("path", _files(*PACKAGES, "tests"), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_first_party_import_resolves(path):
    missing = []
    for line, module, names in _imports(path):
        if module.split(".")[0] not in PACKAGES + ("tests",):
            continue
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            missing.append(f"{line}: {module} ({exc})")
            continue
        for name in names:
            if name != "*" and not hasattr(mod, name) and importlib.util.find_spec(f"{module}.{name}") is None:
                missing.append(f"{line}: {module}.{name}")
    assert missing == []
