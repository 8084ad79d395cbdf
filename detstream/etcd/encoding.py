"""How keys, values and transactions look on the gateway's wire: base64, JSON values, key-values, txn ops."""

from __future__ import annotations

import base64
import json
from datetime import date, datetime
from pathlib import PurePath
from typing import TYPE_CHECKING, Any, Mapping, NamedTuple, Optional, Union

if TYPE_CHECKING:
    from .leases import LeaseLike


def _b64(data: Union[str, bytes]) -> str:
    if isinstance(data, str):
        data = data.encode("utf-8")
    return base64.b64encode(data).decode("ascii")


def _unb64(data: Optional[str]) -> bytes:
    return base64.b64decode(data) if data else b""


def _prefix_end(prefix: bytes) -> bytes:
    """The range end covering every key that starts with `prefix` (etcd's "prefix" range)."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\0"  # all keys


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "model_dump"):  # pydantic models, e.g. SessionSpec
        return obj.model_dump(mode="json")
    if isinstance(obj, PurePath):
        return str(obj)
    if isinstance(obj, (datetime, date)):
        return obj.isoformat()
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    raise TypeError(f"cannot store {type(obj).__name__} as JSON in etcd")


def to_json(obj: Any) -> bytes:
    """A value as stored in etcd: sorted-key JSON; pydantic models, paths, dates and sets allowed."""
    if hasattr(obj, "model_dump"):
        obj = obj.model_dump(mode="json")
    return json.dumps(obj, sort_keys=True, default=_json_default, ensure_ascii=False).encode("utf-8")


def from_json(raw: Optional[bytes]) -> Any:
    """The inverse of `to_json`; None for a missing value."""
    return None if raw is None else json.loads(raw.decode("utf-8"))


def key_segment(value: Any, what: str) -> str:
    """One path segment of a key: non-empty, no '/', no control characters."""
    text = str(value)
    if not text or "/" in text or any(ord(c) < 32 for c in text):
        raise ValueError(f"{what} {value!r} cannot be used in an etcd key (empty, '/' or control character)")
    return text


class KeyValue:
    """One key-value pair as read from etcd, decoded."""

    __slots__ = ("key", "value", "create_revision", "mod_revision", "version", "lease")

    def __init__(self, raw: Mapping[str, Any]) -> None:
        self.key: str = _unb64(raw.get("key")).decode("utf-8", "replace")
        self.value: bytes = _unb64(raw.get("value"))
        self.create_revision = int(raw.get("create_revision", 0))
        self.mod_revision = int(raw.get("mod_revision", 0))
        self.version = int(raw.get("version", 0))
        self.lease = int(raw.get("lease", 0))

    @property
    def text(self) -> str:
        return self.value.decode("utf-8", "replace")

    def json(self) -> Any:
        return from_json(self.value)


def key_missing(key: str) -> dict:
    """Txn compare: `key` does not exist."""
    return {"key": _b64(key), "result": "EQUAL", "target": "CREATE", "create_revision": 0}


def value_is(key: str, value: Union[str, bytes]) -> dict:
    """Txn compare: `key` holds exactly `value`."""
    return {"key": _b64(key), "result": "EQUAL", "target": "VALUE", "value": _b64(value)}


def put_op(key: str, value: Union[str, bytes], lease: Optional[LeaseLike] = None) -> dict:
    """Txn operation: write `key`, attached to `lease` if given."""
    from .leases import lease_id  # leases build their put-backs from these ops: imported on use

    put: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
    attached = lease_id(lease)
    if attached:
        put["lease"] = attached
    return {"request_put": put}


def delete_op(key: str) -> dict:
    """Txn operation: delete `key`."""
    return {"request_delete_range": {"key": _b64(key)}}


def range_op(key: str) -> dict:
    """Txn operation: read `key` (its result is in `TxnResult.ranges`)."""
    return {"request_range": {"key": _b64(key)}}


class TxnResult(NamedTuple):
    succeeded: bool
    #: The key-values read by each operation of the branch that ran ([] for non-reads), in order.
    ranges: list[list[KeyValue]]
