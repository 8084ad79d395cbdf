"""Every exception class that detstream defines derives from DetstreamError, keeping its standard base."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

from detstream.errors import DetstreamError


# The Prefect layer lives in folders of its own (pyproject.toml's package-dir), not under detstream/.
PACKAGES = ("detstream", "detstream.flows", "detstream.tasks", "detstream.blocks")


def _modules():
    names = []
    for package in map(importlib.import_module, PACKAGES):
        names.append(package.__name__)
        names += [m.name for m in pkgutil.walk_packages(package.__path__, package.__name__ + ".")
                  if not m.name.endswith("__main__")]
    return [importlib.import_module(name) for name in dict.fromkeys(names)]


def _exception_classes():
    found = {}
    for module in _modules():
        for obj in vars(module).values():
            if inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == module.__name__:
                found[f"{obj.__module__}.{obj.__qualname__}"] = obj
    return found


@pytest.fixture(scope="module")
def exception_classes():
    return _exception_classes()


def test_the_walk_finds_the_package_and_its_layers(exception_classes):
    # the core, the Prefect layer (flows, tasks, blocks) and private classes alike
    assert "detstream.output.hdf5.DiskFull" in exception_classes
    assert "detstream.transfer.local._VerifyFailed" in exception_classes
    assert len(exception_classes) >= 20
    walked = {m.__name__ for m in _modules()}
    assert {"detstream.flows.cli", "detstream.tasks", "detstream.blocks"} <= walked


def test_every_exception_class_derives_from_detstream_error(exception_classes):
    outside = sorted(name for name, cls in exception_classes.items() if not issubclass(cls, DetstreamError))
    assert outside == []


def test_the_standard_bases_still_catch_them():
    from detstream.coordination import DetectorBusy
    from detstream.output.hdf5 import DiskFull
    from detstream.session.base import SessionCancelled
    from detstream.wire import MalformedMessage

    assert issubclass(DiskFull, OSError) and issubclass(MalformedMessage, ValueError)
    assert issubclass(DetectorBusy, RuntimeError) and issubclass(SessionCancelled, RuntimeError)
    with pytest.raises(OSError):
        raise DiskFull(28, "No space left on device")
