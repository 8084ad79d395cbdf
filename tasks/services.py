"""Task that starts the data plane once every node's distributor has registered."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from detstream.session import StreamingSession


@task(name="start-services", cache_policy=NO_CACHE)
def start_services(session: StreamingSession) -> dict:
    """Wait for the distributors in etcd, then start the aggregator and one producer per sector."""
    return session.start_services()
