"""The import-linter contracts in pyproject.toml hold, and each would fail on a forbidden import."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _lint(package_parent: Path) -> subprocess.CompletedProcess:
    """lint-imports over the copy of the package in ``package_parent`` (it puts its working
    folder first on the path), with the repository's contracts."""
    env = {**os.environ, "PYTHONPATH": str(package_parent)}
    return subprocess.run([str(LINT_IMPORTS), "--no-cache", "--config", str(ROOT / "pyproject.toml")],
                          cwd=package_parent, env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def clean_copy(tmp_path_factory) -> Path:
    parent = tmp_path_factory.mktemp("layers")
    shutil.copytree(ROOT / "detstream", parent / "detstream", ignore=shutil.ignore_patterns("__pycache__"))
    return parent


def test_the_tree_keeps_every_contract(clean_copy):
    done = _lint(clean_copy)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "4 kept, 0 broken" in done.stdout


@pytest.mark.parametrize("module, forbidden, contract", [
    ("services/producer.py", "import detstream.session", "Services do not import the session"),
    ("output/merge.py", "import detstream.services", "Output does not import the services"),
    ("etcd/encoding.py", "import detstream.coordination", "The etcd transport does not import the key schema"),
    ("wire.py", "import prefect", "The core does not import Prefect"),
])
def test_a_forbidden_import_breaks_its_contract(tmp_path, module, forbidden, contract):
    shutil.copytree(ROOT / "detstream", tmp_path / "detstream", ignore=shutil.ignore_patterns("__pycache__"))
    with open(tmp_path / "detstream" / module, "a") as f:
        f.write(f"\n{forbidden}  # a forbidden import\n")
    done = _lint(tmp_path)
    assert done.returncode != 0, done.stdout
    broken = [line for line in done.stdout.splitlines() if line.endswith("BROKEN")]
    assert len(broken) == 1 and broken[0].startswith(contract), done.stdout
