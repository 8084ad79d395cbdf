"""detstream's Prefect flows."""

from .file_transfer_session import file_transfer_session
from .streaming_session import streaming_session

__all__ = ["file_transfer_session", "streaming_session"]
