"""The core has no Prefect import: every detstream.* module outside the Prefect layer imports
without loading prefect, so nodes and services never pay for it."""

from __future__ import annotations

import subprocess
import sys
import textwrap

PREFECT_LAYER = ("detstream.flows", "detstream.tasks", "detstream.blocks")


def test_importing_every_core_module_leaves_prefect_out():
    code = textwrap.dedent(f"""
        import importlib, pkgutil, sys
        import detstream
        names = [m.name for m in pkgutil.walk_packages(detstream.__path__, "detstream.")
                 if not m.name.startswith({PREFECT_LAYER!r}) and not m.name.endswith("__main__")]
        for name in names:
            importlib.import_module(name)
        print(len(names), "prefect" in sys.modules)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert int(out[0]) > 30, "too few core modules imported: is the walk broken?"
    assert out[1] == "False", "a core module imports prefect"


def test_the_installed_command_starts_without_prefect():
    code = "import sys, detstream.flows.cli; print('prefect' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"


def test_no_core_source_reaches_for_the_prefect_layer_even_lazily():
    """Function-level imports count too: a core command that loads a flow breaks the boundary."""
    import ast
    from pathlib import Path

    import detstream

    offenders = []
    for path in Path(detstream.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                name = ("." * node.level) + (node.module or "")
            elif isinstance(node, ast.Import):
                name = " ".join(a.name for a in node.names)
            else:
                continue
            if any(s in name for s in ("prefect", "detstream.flows", "detstream.tasks", "detstream.blocks")) \
                    or (node.__class__ is ast.ImportFrom and node.level and
                        (node.module or "").split(".")[0] in ("flows", "tasks", "blocks")):
                offenders.append(f"{path.name}:{node.lineno} {name}")
    assert offenders == []


def test_every_core_package_is_in_the_wheel():
    """pyproject lists packages by hand (the Prefect layer lives outside detstream/): none may be missed."""
    import tomllib
    from pathlib import Path

    import detstream

    root = Path(detstream.__file__).parent
    on_disk = {"detstream"} | {"detstream." + ".".join(p.parent.relative_to(root).parts)
                               for p in root.rglob("__init__.py") if p.parent != root}
    listed = set(tomllib.loads((root.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    assert on_disk - listed == set()
