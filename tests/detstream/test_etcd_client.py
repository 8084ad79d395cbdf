"""The etcd transport against a real etcd: reads, writes, transactions, prefix waits, leases, encoding."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from detstream.config import SessionSpec
from detstream.etcd import (
    EtcdClient,
    delete_op,
    from_json,
    key_missing,
    key_segment,
    put_op,
    range_op,
    to_json,
    value_is,
)
from detstream.etcd.client import _MAX_TXN_OPS


@pytest.fixture
def client(etcd_server):
    with EtcdClient(etcd_server.endpoint, timeout=10) as c:
        yield c


def test_put_get_range_delete(client, etcd_prefix):
    a, b = f"{etcd_prefix}/x/a", f"{etcd_prefix}/x/b"
    assert client.get(a) is None
    client.put(a, "1")
    client.put(b, b"\x00\xff")
    assert client.get(a) == b"1" and client.get(b) == b"\x00\xff"
    kvs, revision = client.range(f"{etcd_prefix}/x/", prefix=True)
    assert [kv.key for kv in kvs] == [a, b] and revision >= kvs[-1].mod_revision
    newest, _ = client.range(f"{etcd_prefix}/x/", prefix=True, keys_only=True, limit=1, descending=True)
    assert [kv.key for kv in newest] == [b] and newest[0].value == b""
    client.delete(a)
    client.delete(a)  # absent: fine
    assert client.get(a) is None


def test_txn_takes_a_missing_key_once_and_reports_the_holder(client, etcd_prefix):
    key = f"{etcd_prefix}/lock"
    first = client.txn([key_missing(key)], [put_op(key, "one")], [range_op(key)], what="take")
    second = client.txn([key_missing(key)], [put_op(key, "two")], [range_op(key)], what="take")
    assert first.succeeded and not second.succeeded
    assert [kv.text for kv in second.ranges[0]] == ["one"]
    assert not client.txn([value_is(key, "two")], [delete_op(key)], what="release").succeeded
    assert client.txn([value_is(key, "one")], [delete_op(key)], what="release").succeeded
    assert client.get(key) is None


def test_delete_keys_beyond_one_transactions_limit(client, etcd_prefix):
    keys = [f"{etcd_prefix}/many/{i:04d}" for i in range(_MAX_TXN_OPS * 2 + 5)]
    client.txn([], [put_op(k, "x") for k in keys[:100]], what="fill")
    for k in keys[100:]:
        client.put(k, "x")
    client.delete_keys(keys)
    assert client.range(f"{etcd_prefix}/many/", prefix=True)[0] == []


def test_leased_keys_vanish_with_the_lease(client, etcd_prefix):
    key = f"{etcd_prefix}/svc"
    with client.lease(5) as lease:
        client.put(key, "up", lease)
        kvs, _ = client.range(key)
        assert kvs[0].lease == lease.id
    assert client.get(key) is None


def test_wait_prefix_returns_once_done_or_none_at_the_deadline(client, etcd_prefix):
    prefix = f"{etcd_prefix}/w/"
    threading.Timer(0.2, client.put, (prefix + "a", "1")).start()
    found, current = client.wait_prefix(prefix, lambda cur: sorted(cur) or None, timeout_s=30)
    assert found == [prefix + "a"] and current == {prefix + "a": b"1"}
    found, current = client.wait_prefix(prefix, lambda cur: None, timeout_s=0.2)
    assert found is None and current == {prefix + "a": b"1"}


def test_every_request_goes_through_call(client, etcd_prefix, monkeypatch):
    """The one place a retry policy wraps: reads, writes, transactions and leases all pass `call`."""
    paths: list[str] = []
    real = client.call
    monkeypatch.setattr(client, "call", lambda path, payload, *, what: paths.append(path) or real(path, payload, what=what))
    key = f"{etcd_prefix}/k"
    client.put(key, "v")
    client.get(key)
    client.txn([], [delete_op(key)], what="delete")
    client.delete(key)
    client.wait_prefix(key, lambda cur: True, timeout_s=1)
    with client.lease(5) as lease:
        lease.time_to_live()
    client.ping()
    assert paths == ["kv/put", "kv/range", "kv/txn", "kv/deleterange", "kv/range", "lease/grant",
                     "kv/lease/timetolive", "kv/lease/revoke", "maintenance/status"]


def test_json_encoding(tmp_path):
    spec = SessionSpec(session_id="abc", output_dir=tmp_path)
    assert SessionSpec.model_validate(from_json(to_json(spec))) == spec
    assert to_json({"b": {1, 2} - {2}, "a": Path("/x")}) == b'{"a": "/x", "b": [1]}'
    assert from_json(None) is None
    with pytest.raises(TypeError, match="cannot store object"):
        to_json({"a": object()})


def test_key_segments_and_arguments_are_checked_before_any_request():
    assert key_segment(7, "scan") == "7"
    for bad in ("", "a/b", "a\nb"):
        with pytest.raises(ValueError, match="cannot be used in an etcd key"):
            key_segment(bad, "name")
    with pytest.raises(ValueError, match="scheme"):
        EtcdClient("ftp://127.0.0.1:2379")
    with pytest.raises(ValueError, match="both"):
        EtcdClient("http://127.0.0.1:2379", password="x")
    assert EtcdClient("127.0.0.1:2379").endpoint == "http://127.0.0.1:2379"
