"""Make ``import stallscope`` work from a read-only checkout without installing it.

The installed package is assembled from top-level folders ([tool.setuptools.package-dir]
in pyproject.toml); the test VM sees the repository as a read-only 9p share and has no
pip, so this builds the same tree out of symlinks under DEST, read from pyproject.toml
(the one place the mapping is written). Usage: ``python3 devtree.py REPO DEST`` then
``PYTHONPATH=DEST``.
"""

import os
import sys

import tomllib


def build(repo: str, dest: str) -> None:
    with open(os.path.join(repo, "pyproject.toml"), "rb") as f:
        mapping = tomllib.load(f)["tool"]["setuptools"]["package-dir"]
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
