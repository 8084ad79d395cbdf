"""``detstream.sfapi_emulator`` without the ``emulator`` extra: it imports, and using it names the extra."""

from __future__ import annotations

import subprocess
import sys

# Run in a fresh interpreter in which the extra's modules cannot be imported.
WITHOUT_EXTRA = """
import sys
for name in ("fastapi", "starlette", "uvicorn", "cryptography", "joserfc"):
    sys.modules[name] = None
"""


def run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", WITHOUT_EXTRA + code], capture_output=True, text=True, timeout=120)


def test_the_package_imports_and_its_slurm_helpers_work_without_the_extra():
    out = run("import detstream.sfapi_emulator as emu\n"
              "print(emu.parse_sbatch_options('#!/bin/sh\\n#SBATCH -N 2\\n').nodes)\n")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["2"]


def test_using_the_server_without_the_extra_names_the_extra():
    for code in ("from detstream.sfapi_emulator import EmulatorServer",
                 "from detstream.sfapi_emulator import generate_client_credentials",
                 "import runpy; runpy.run_module('detstream.sfapi_emulator', run_name='__main__')"):
        out = run(code)
        assert out.returncode != 0, code
        assert "ModuleNotFoundError: the SFAPI emulator needs" in out.stderr, out.stderr
        assert "pip install 'detstream[emulator]'" in out.stderr, code


def test_with_the_extra_the_names_are_the_modules_own():
    from detstream import sfapi_emulator
    from detstream.sfapi_emulator import server

    assert sfapi_emulator.EmulatorServer is server.EmulatorServer
    assert set(sfapi_emulator.__all__) <= set(dir(sfapi_emulator))
