"""`smearscope analyze`'s inputs and outputs: what is read, what may be written, and how names
are shown.

Inputs: files, directories (their image files) and `@LIST` files. A list file must be a regular
file of at most `MAX_LIST_BYTES` (a FIFO would block, `/dev/zero` would fill the memory). A
directory that cannot be listed is one rejected input, not the end of the batch.

Outputs (`--detections`, `--overlay`, `--fhir`): never an input image or `@LIST` (writing would
truncate it before it is read), never another option's output, never a FIFO or socket (opening
one blocks until a reader comes), in a directory checked writable before any work, written with Python's
file API (OpenCV's writer crashed on a file name that is not UTF-8). Names are printed with the
bytes that are not UTF-8 escaped (`\\xff`), so every line stays valid UTF-8 JSON.
"""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from smearscope.device.ingest import shown  # the name as messages show it; re-exported for the CLI

logger = logging.getLogger(__name__)

#: Files a directory given to `analyze` contributes (named files are always tried, and rejected if bad).
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff"})
#: What `--overlay` names each image's drawing in a directory: a directory's files so named are no fields.
OVERLAY_SUFFIX = ".overlay.png"
#: What `--fhir` names each image's bundle in a directory (docs/FHIR.md).
FHIR_SUFFIX = ".fhir.json"
#: The largest `@LIST` file read (about 100 000 paths).
MAX_LIST_BYTES = 16 * 1024 * 1024


def output_path(out: Path, image: Path, suffix: str, folder: bool, used: set[Path]) -> Path:
    """Where one image's output (an overlay, a bundle) goes: `out` itself for a lone image; in the
    directory `out`, STEM+suffix, or STEM-2+suffix, ... for a stem already used (noted in `used`)."""
    if not folder:
        return out
    path, n = out / f"{image.stem}{suffix}", 1
    while path in used:
        n += 1
        path = out / f"{image.stem}-{n}{suffix}"
    used.add(path)
    return path


class InputError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


@dataclass(frozen=True)
class Input:
    """One image to analyze, or an input that is already known to be unusable."""

    path: Path
    error: InputError | None = None


def _read_list(name: str) -> list[str]:
    try:
        st = os.stat(name)
    except OSError as exc:
        raise InputError("bad_list", f"cannot read image list {shown(name)}: {exc.strerror or exc}") from exc
    if not stat.S_ISREG(st.st_mode):
        raise InputError("bad_list", f"image list {shown(name)} is not a regular file (a FIFO, device or "
                         "directory)")
    if st.st_size > MAX_LIST_BYTES:
        raise InputError("bad_list", f"image list {shown(name)} has {st.st_size} bytes, over the limit of "
                         f"{MAX_LIST_BYTES}")
    try:
        with open(name, "rb") as fh:
            data = fh.read(MAX_LIST_BYTES + 1)
    except OSError as exc:
        raise InputError("bad_list", f"cannot read image list {shown(name)}: {exc.strerror or exc}") from exc
    if len(data) > MAX_LIST_BYTES or b"\0" in data:
        raise InputError("bad_list", f"image list {shown(name)} is not a text file of paths")
    # Paths are bytes on Linux: a name that is not UTF-8 is still a name (surrogate escapes).
    lines = (line.strip() for line in data.splitlines())
    return [os.fsdecode(line) for line in lines if line and not line.startswith(b"#")]  # `#` starts a comment


def list_files(items: list[str]) -> list[Path]:
    """The `@LIST` files among `items` (inputs too: no output may replace one)."""
    return [Path(item[1:]) for item in items if item.startswith("@")]


def no_images_message(items: list[str]) -> str:
    """Why no image was found, saying where the images may be: a folder is read one level deep,
    and one of class or slide subfolders (a dataset's) holds none itself."""
    text = f"no image files in {' '.join(shown(a) for a in items)}"
    for item in items:
        p = Path(item)
        try:
            subfolders = sorted(q for q in p.iterdir() if q.is_dir()) if p.is_dir() else []
        except OSError:
            continue
        if subfolders:
            # the one that holds the fields first: BCCD's Annotations/ sorts before its JPEGImages/; a second
            # one holding images looked for, so that the only one is not said as one of several to name
            holders = ((q, n) for q in subfolders if (n := _images_in(q)))
            held, other = next(holders, None), next(holders, None)
            from smearscope.service.analysis.wording import counted

            if held and not other and len(subfolders) > 1:  # BCCD: JPEGImages/ beside Annotations/ of XML
                named, more = f"only {shown(held[0])} holding images, {counted(held[1], 'image file')}", ""
            else:
                named = f"{shown(held[0])} holding {counted(held[1], 'image file')}" if held else shown(subfolders[0])
                more = ", ..." if len(subfolders) > 1 else ""
            return (f"{text}: a folder's subfolders are not searched, and {shown(p)} has {len(subfolders)} "
                    f"({named}{more}): name {'them' if more else 'it'}, or list the files in an @LIST")
    return text


def _images_in(folder: Path) -> int:
    """How many files a folder holds that `analyze FOLDER` would read (0 when it cannot be listed)."""
    try:
        with os.scandir(folder) as entries:
            return sum(1 for e in entries if Path(e.name).suffix.lower() in IMAGE_SUFFIXES
                       and not e.name.startswith(".") and not e.name.lower().endswith(OVERLAY_SUFFIX))
    except OSError:
        return 0


def expand_inputs(items: list[str]) -> tuple[list[Input], bool]:
    """The images to analyze, in order, and whether the inputs name a set (not one image file).

    A directory adds its image files (by suffix, not the `*.overlay.png` --overlay writes nor hidden
    `.NAME` files), sorted by name; `@LIST` adds the paths a text
    file lists, one per line, no quoting or globbing (spaces around a line trimmed, blank lines
    and lines starting with # skipped; `./@name`, `./#name` and `./ name` name files whose names
    start with @, # or a space; relative paths from the current directory, as on the command
    line). Named files are always tried (and rejected if bad). An unusable list is an InputError (the whole call); a directory that cannot be listed is one rejected input.
    """
    out: list[Input] = []
    is_set = len(items) > 1
    for item in items:
        if item.startswith("@"):
            is_set = True
            out += [Input(Path(p)) for p in _read_list(item[1:])]
            continue
        p = Path(item)
        try:
            is_dir = stat.S_ISDIR(os.stat(p).st_mode)
        except OSError:
            is_dir = False  # missing or unreachable: load_image says why, for this input
        if not is_dir:
            out.append(Input(p))
            continue
        is_set = True
        try:
            # every entry named as an image but a directory: a broken link or a FIFO gets its error line;
            # not the overlays `--overlay` wrote here on an earlier run (drawings, not fields), nor hidden
            # files, as the station's watched folder skips them (macOS writes `._NAME.jpg` beside each
            # field copied to a FAT stick: resource data, no image)
            out += [Input(q) for q in sorted(p.iterdir()) if q.suffix.lower() in IMAGE_SUFFIXES and not q.is_dir()
                    and not q.name.lower().endswith(OVERLAY_SUFFIX) and not q.name.startswith(".")]
        except OSError as exc:
            out.append(Input(p, InputError("unreadable", f"cannot list directory {shown(p)}: {exc.strerror or exc}")))
    return out, is_set


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except (OSError, ValueError):  # ValueError: a NUL character in it, which no file's name holds
        return None
    return st.st_dev, st.st_ino


class OutputGuard:
    """Knows the inputs (images and `@LIST` files), so no output replaces one; refuses outputs that
    would block, two options writing one file, and directories that cannot be written."""

    def __init__(self, inputs: list[Input], lists: list[Path] | tuple[Path, ...] = ()) -> None:
        self._inputs = {ident for i in [*(x.path for x in inputs), *lists] if (ident := _identity(i)) is not None}
        self._claimed: dict[object, str] = {}  # an output's resolved path or (dev, inode) -> its option

    def check(self, path: Path, option: str) -> None:
        """InputError("bad_output") when `path` is an input, another option's output, a FIFO,
        socket or directory."""
        for key in (path.resolve(), _identity(path)):  # a name, and an existing file under any name
            owner = self._claimed.setdefault(key, option) if key is not None else option
            if owner != option:
                raise InputError("bad_output", f"{option} {shown(path)} is also {owner}'s output; they would "
                                 "overwrite each other")
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise InputError("bad_output", f"{option} {shown(path)}: {exc.strerror or exc}") from exc
        if (st.st_dev, st.st_ino) in self._inputs:
            raise InputError("bad_output", f"{option} {shown(path)} is one of the inputs; it would be overwritten")
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISCHR(st.st_mode)):
            raise InputError("bad_output", f"{option} {shown(path)} is not a regular file (a FIFO, socket "
                             "or directory would block or cannot be written)")

    @staticmethod
    def check_directory(directory: Path, option: str) -> None:
        """InputError("bad_output") unless a file can be created in `directory` (tried with a
        temporary file, removed at once): found before any work, not after the first image."""
        import tempfile

        try:
            with tempfile.TemporaryFile(dir=directory):
                pass
        except OSError as exc:
            raise InputError("bad_output", f"{option}: cannot write in {shown(directory)} "
                             f"({exc.strerror or exc})") from exc

    def write_image(self, path: Path, pixels: object, option: str) -> None:
        """Encode by the path's suffix and write (OSError, InputError or ValueError on failure)."""
        import cv2

        self.check(path, option)
        ok, buf = cv2.imencode(path.suffix.lower() or ".png", pixels)
        if not ok:
            raise ValueError(f"cannot encode {path.suffix} image")
        with open(path, "wb") as fh:
            fh.write(buf.tobytes())


def models_option_problem(models: Path) -> str | None:
    """What a command's `--models` folder lacks, with the fix (None: the three models are there).
    Said before the engines load: their own error names one manifest's errno, not the folder."""
    from smearscope.service.station.startup import models_problem

    missing = models_problem(models, setting="--models")
    return None if missing is None else f"{missing}; without --models the packaged models run"
