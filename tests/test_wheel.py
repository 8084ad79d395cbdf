"""The core wheel (``pip install detstream``) ships the product only: no test double is inside it."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e  # a build: ~6 s, too long for make test-fast

ROOT = Path(__file__).resolve().parents[1]
# What the build does not need and would only slow the copy: environments, caches, outputs, tests.
NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache",
                                    "tests", "runs", "out", "benchmarks")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    """The core wheel, built by pip from a copy of the repository (the emulator/ folder included,
    as a fresh clone has it), so that the build leaves nothing in the shared working tree."""
    tmp = tmp_path_factory.mktemp("wheel")
    shutil.copytree(ROOT, tmp / "src", ignore=NOT_SOURCE)
    assert (tmp / "src" / "emulator" / "detstream_testing").is_dir()
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(tmp / "dist"),
                           str(tmp / "src")], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    (path,) = (tmp / "dist").glob("detstream-*.whl")
    with zipfile.ZipFile(path) as zf:
        yield zf


def test_the_core_wheel_has_no_emulator_module(wheel):
    names = wheel.namelist()
    assert "detstream/counting.py" in names and "detstream/flows/cli.py" in names  # it is the product
    assert [n for n in names if "emulator" in n or "detstream_testing" in n] == []
    tops = {n.split("/")[0] for n in names}
    assert {t for t in tops if not (t.startswith("detstream-") and t.endswith(".dist-info"))} == {"detstream"}


def test_the_core_wheel_depends_on_no_emulator_distribution(wheel):
    (path,) = [n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")]
    metadata = wheel.read(path).decode()
    requires = [line for line in metadata.splitlines() if line.startswith(("Requires-Dist:", "Provides-Extra:"))]
    assert requires, metadata
    assert [line for line in requires if "emulator" in line or "detstream-testing" in line] == []
