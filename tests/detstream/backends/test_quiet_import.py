"""Loading a backend prints no third-party warning that a user of detstream cannot act on."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize("module", ["detstream.backends.sfapi", "detstream.backends.slurm", "detstream.blocks"])
def test_importing_prints_no_warning(module):
    # A fresh interpreter with Python's default filters, as the `detstream` command and Prefect's server start.
    done = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Warning" not in done.stderr, done.stderr


def test_without_the_backends_filter_authlib_does_warn():
    # The case the filter is for: sfapi_client imported first, authlib's own "always" filter in force.
    done = subprocess.run([sys.executable, "-c", "import sfapi_client"], capture_output=True, text=True, timeout=120)
    assert "AuthlibDeprecationWarning" in done.stderr, "authlib no longer warns: the filter in backends can go"
