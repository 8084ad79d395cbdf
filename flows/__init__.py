"""detstream's Prefect flows."""

from .streaming_session import streaming_session

__all__ = ["streaming_session"]
