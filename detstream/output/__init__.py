"""What a scan produces, one module per job: the stempy layout, per-node parts and their
merge, the bright-field disk, the virtual detectors (bright field, annular dark field) and images,
and the JSON summary; every file written atomically."""

from .disk import DiskEstimate, disk_mask, estimate_disk, summed_pattern
from .images import VirtualBrightField, to_uint8, virtual_bright_field, write_png
from .layout import STEMPY_FORMAT_VERSION, write_counts
from .merge import BlockAccumulator, MergeReport, merge_parts
from .parts import Part, PartWriter, read_part
from .summary import write_summary
from .virtual import IMAGE_NAMES, VirtualDetectors, VirtualImages

__all__ = [
    "IMAGE_NAMES",
    "VirtualDetectors",
    "VirtualImages",
    "STEMPY_FORMAT_VERSION",
    "BlockAccumulator",
    "DiskEstimate",
    "MergeReport",
    "Part",
    "PartWriter",
    "VirtualBrightField",
    "disk_mask",
    "estimate_disk",
    "merge_parts",
    "read_part",
    "summed_pattern",
    "to_uint8",
    "virtual_bright_field",
    "write_counts",
    "write_png",
    "write_summary",
]
