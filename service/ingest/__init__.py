"""Stage 1: every image path (CLI, station commands, evaluation) is read and checked here.

The decoder itself is `smearscope.device.ingest` (the frame sources in `device/` decode files
with it too, and `device/` may import nothing else); this is its name on the analysis side.
"""

from smearscope.device.ingest import (
    DecodedImage,
    ImageSource,
    IngestError,
    IngestLimits,
    OutsideFolders,
    RejectReason,
    load_image,
    read_image_file_within,
    shown,
    within,
)

__all__ = ["DecodedImage", "ImageSource", "IngestError", "IngestLimits", "OutsideFolders", "RejectReason",
           "load_image", "read_image_file_within", "shown", "within"]
