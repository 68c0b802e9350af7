"""The house rules: every package folder is installed, and each stage imports only what
docs/design.md allows (bpf -> tracer -> wire -> collector -> analysis -> cli)."""

import ast
import os
import sys

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:                                   # pragma: no cover
    tomllib = pytest.importorskip("tomli")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SETUP = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))["tool"]["setuptools"]
MAPPING = SETUP["package-dir"]

# stage -> the stallscope subpackages it may import (besides itself)
ALLOWED = {
    "wire": {"bpf"},
    "tracer": {"wire", "bpf"},
    "collector": {"wire"},
    "analysis": {"wire"},
    "export": {"wire", "analysis"},
    "sim": set(),
}


def _packages_on_disk():
    found = set()
    for pkg, folder in MAPPING.items():
        base = os.path.join(ROOT, folder)
        for d, dirs, files in os.walk(base):
            dirs[:] = [x for x in dirs if x not in ("__pycache__", "build")]
            if "__init__.py" in files:
                rel = os.path.relpath(d, base)
                found.add(pkg if rel == "." else pkg + "." + rel.replace(os.sep, "."))
    return found


def test_every_package_folder_is_installed():
    missing = _packages_on_disk() - set(SETUP["packages"])
    assert not missing, f"add to [tool.setuptools] packages in pyproject.toml: {sorted(missing)}"


def _imports(path):
    tree = ast.parse(open(path).read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
        elif isinstance(node, ast.Import):
            for a in node.names:
                yield a.name


@pytest.mark.parametrize("stage", sorted(ALLOWED))
def test_stage_imports_only_what_the_design_allows(stage):
    folder = os.path.join(ROOT, MAPPING[f"stallscope.{stage}"])
    bad = []
    for d, dirs, files in os.walk(folder):
        dirs[:] = [x for x in dirs if x != "__pycache__"]
        for f in files:
            if not f.endswith(".py"):
                continue
            for mod in _imports(os.path.join(d, f)):
                parts = mod.split(".")
                if parts[0] in ("tracer", "collector", "wire", "analysis", "export", "sim"):
                    bad.append(f"{f}: {mod} (import stallscope.{mod})")
                elif parts[0] == "stallscope" and len(parts) > 1 and parts[1] != stage:
                    if parts[1] not in ALLOWED[stage]:
                        bad.append(f"{f}: {mod}")
    assert not bad, bad
