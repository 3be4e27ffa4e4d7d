"""Stage 1: every image path (CLI, station commands, evaluation) is read and checked here.

`load_image` turns a file or bytes into 8-bit BGR pixels or raises `IngestError` with a stable
`RejectReason`; `decode` runs the checks, `headers` reads container headers without decoding,
`errors` holds the reasons.
"""

from smearscope.service.ingest.decode import DecodedImage, ImageSource, IngestLimits, load_image
from smearscope.service.ingest.errors import IngestError, RejectReason

__all__ = ["DecodedImage", "ImageSource", "IngestError", "IngestLimits", "RejectReason", "load_image"]
