"""detstream's Prefect flows, imported on first use so that ``detstream.flows.cli`` starts fast."""

from __future__ import annotations

import importlib

_FLOWS = {"streaming_session": "streaming", "file_transfer_session": "file_transfer",
          "compare_workflows": "comparison"}

__all__ = list(_FLOWS)


def __getattr__(name: str):
    if name in _FLOWS:
        flow = getattr(importlib.import_module(f".{_FLOWS[name]}", __name__), name)
        globals()[name] = flow
        return flow
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
