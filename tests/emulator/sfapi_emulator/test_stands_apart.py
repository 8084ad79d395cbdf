"""The emulator stands apart from what it stands in for: none of its modules imports detstream."""

from __future__ import annotations

import subprocess
import sys

import pytest

from detstream_testing.sfapi_emulator.srun import compress_nodelist, expand_nodelist

pytestmark = pytest.mark.unit

# A fresh interpreter in which ``import detstream`` (or any of its modules) fails.
EVERY_MODULE_WITHOUT_DETSTREAM = """
import importlib, pkgutil, sys
sys.modules["detstream"] = None
import detstream_testing
names = [m.name for m in pkgutil.walk_packages(detstream_testing.__path__, "detstream_testing.")]
for name in names:
    importlib.import_module(name)
print(len(names), sorted(n for n in sys.modules if n == "detstream" or n.startswith("detstream.")))
"""


def test_every_module_of_the_emulator_imports_without_detstream():
    out = subprocess.run([sys.executable, "-c", EVERY_MODULE_WITHOUT_DETSTREAM], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    count, _, imported = out.stdout.strip().partition(" ")
    assert int(count) >= 10, out.stdout  # the package and its modules, __main__ and slurm included
    assert imported == "['detstream']", out.stdout  # only the blocked entry itself


def test_node_lists_read_and_write_as_slurm_writes_them():
    names = ["nid000998", "nid000999", "nid001000", "nid001001", "nid001005"]
    assert compress_nodelist(names) == "nid[000998-001001,001005]"
    assert expand_nodelist(compress_nodelist(names)) == names
    assert expand_nodelist("n[1-3],login01") == ["n1", "n2", "n3", "login01"]
    for placeholder in ("", None, "(null)", "None assigned", "(Resources)"):
        assert expand_nodelist(placeholder) == []

