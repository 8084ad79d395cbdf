"""Services stop when the orchestrator's leased alive key vanishes (it died), once they had seen it."""

from __future__ import annotations

from detstream.services.serve import EtcdLink, stop_requested


def test_a_service_stops_when_the_orchestrators_alive_key_expires(coordinator, wait_until):
    sid = "live1"
    lease = coordinator.lease(10)
    coordinator.put_alive(sid, lease)
    link = EtcdLink(coordinator, sid, 1, None, interval_s=0.05)
    try:
        wait_until(lambda: link.rounds >= 1, what="the link's first exchange with etcd (it sees the key)")
        assert link.should_stop() is None
        lease.revoke()  # what the orchestrator's death does once its lease runs out
        reason = wait_until(link.should_stop, timeout_s=10, what="the service to see the orchestrator gone")
        assert "orchestrator gone" in reason
    finally:
        link.close()


def test_a_service_of_a_session_without_an_alive_key_keeps_going(coordinator):
    check = stop_requested(coordinator, "no-orchestrator")
    assert check() is None and check() is None
