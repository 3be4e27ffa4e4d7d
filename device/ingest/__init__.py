"""The one hardened image decoder: every image that enters the pipeline is read and checked here.

`load_image` turns a file or bytes into 8-bit BGR pixels or raises `IngestError` with a stable
`RejectReason`; `decode` runs the checks, `headers` reads container headers without decoding,
`errors` holds the reasons. It lives in `device/` because the frame sources (watched folder,
replay) decode files too and `device/` imports nothing of the rest; the CLI, the station's
commands and the evaluation reach it as `smearscope.service.ingest` (stage 1 of the analysis).
"""

from smearscope.device.ingest.decode import (
           DecodedImage,
           ImageSource,
           IngestLimits,
           load_image,
           sensor_depth,
           to_bgr8,
)
from smearscope.device.ingest.errors import IngestError, RejectReason, shown
from smearscope.device.ingest.files import OutsideFolders, read_image_file_within, within

__all__ = ["DecodedImage", "ImageSource", "IngestError", "IngestLimits", "OutsideFolders", "RejectReason",
           "load_image", "read_image_file_within", "sensor_depth", "shown", "to_bgr8", "within"]
