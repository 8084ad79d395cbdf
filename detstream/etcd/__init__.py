"""The etcd transport on etcd3gw: the client and its outage policy, leases, prefix waits and the wire encoding.

Every request goes through `EtcdClient.call`, which retries through etcd outages within a budget.
"""

from .client import DEFAULT_OUTAGE_BUDGET_S, EtcdClient, enable_auth
from .encoding import (KeyValue, TxnResult, delete_op, from_json, key_missing, key_segment, put_op, range_op,
                       to_json, value_is)
from .errors import AuthenticationError, CoordinationError
from .leases import KeepAliveLease, LeaseLike, RegrantCallback, lease_id

__all__ = [
    "AuthenticationError",
    "CoordinationError",
    "DEFAULT_OUTAGE_BUDGET_S",
    "EtcdClient",
    "KeepAliveLease",
    "KeyValue",
    "LeaseLike",
    "RegrantCallback",
    "TxnResult",
    "delete_op",
    "enable_auth",
    "from_json",
    "key_missing",
    "key_segment",
    "lease_id",
    "put_op",
    "range_op",
    "to_json",
    "value_is",
]
