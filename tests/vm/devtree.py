"""Make ``import stallscope`` work from a read-only checkout without installing it.

The installed package is assembled from top-level folders ([tool.setuptools.package-dir]
in pyproject.toml); the test VM sees the repository as a read-only 9p share and has no
pip, so this builds the same tree out of symlinks under DEST, read from pyproject.toml
(the one place the mapping is written). Usage: ``python3 devtree.py REPO DEST`` then
``PYTHONPATH=DEST``.

Runs on every guest's python3, Debian 11's 3.9 included: where ``tomllib`` (3.11+) is
missing, the one table needed is read by :func:`package_dir_table`.
"""

import os
import re
import sys

TABLE = "tool.setuptools.package-dir"


def package_dir_table(text: str) -> dict:
    """The ``[tool.setuptools.package-dir]`` table of a pyproject.toml: its ``"key" = "value"``
    lines (the only form that table takes), without a TOML library."""
    mapping, inside = {}, False
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip() if not raw.lstrip().startswith('"') else raw.strip()
        if line.startswith("["):
            inside = line == f"[{TABLE}]"
            continue
        if inside and line:
            m = re.fullmatch(r'"([^"]+)"\s*=\s*"([^"]*)"\s*(#.*)?', line)
            if not m:
                raise ValueError(f"pyproject.toml [{TABLE}]: cannot read {raw!r}")
            mapping[m.group(1)] = m.group(2)
    if not mapping:
        raise ValueError(f"pyproject.toml has no [{TABLE}] table")
    return mapping


def read_mapping(pyproject: str) -> dict:
    try:
        import tomllib
    except ImportError:            # python < 3.11 (Debian 11's guest)
        with open(pyproject) as f:
            return package_dir_table(f.read())
    with open(pyproject, "rb") as f:
        return tomllib.load(f)["tool"]["setuptools"]["package-dir"]


def build(repo: str, dest: str) -> None:
    mapping = read_mapping(os.path.join(repo, "pyproject.toml"))
    root = os.path.join(dest, "stallscope")
    os.makedirs(root, exist_ok=True)
    src_root = os.path.join(repo, mapping["stallscope"])
    for name in os.listdir(src_root):           # the root package's own files
        if name != "__pycache__":
            os.symlink(os.path.join(src_root, name), os.path.join(root, name))
    for pkg, folder in mapping.items():
        if pkg == "stallscope":
            continue
        os.symlink(os.path.join(repo, folder), os.path.join(dest, *pkg.split(".")))


if __name__ == "__main__":
    build(sys.argv[1], sys.argv[2])
