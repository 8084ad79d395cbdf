"""detstream's Prefect flows."""

from .compare_workflows import compare_workflows
from .file_transfer_session import file_transfer_session
from .streaming_session import streaming_session

__all__ = ["compare_workflows", "file_transfer_session", "streaming_session"]
