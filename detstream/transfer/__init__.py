"""Moving recorded files to the compute site's storage: the transfer stage of the file workflow.

``Transfer`` and its report types are in ``base``; ``LocalCopyTransfer``, the single-machine one, in ``local``.
"""

from ..pagecache import cached_pages, evict, storage_read_bytes  # detstream/services/ imports these from here
from .base import FileTransfer, RetriedFile, Transfer, TransferError, TransferProgress, TransferReport
from .local import LocalCopyTransfer

__all__ = [
    "FileTransfer",
    "LocalCopyTransfer",
    "RetriedFile",
    "Transfer",
    "TransferError",
    "TransferProgress",
    "TransferReport",
    "cached_pages",
    "evict",
    "storage_read_bytes",
]
