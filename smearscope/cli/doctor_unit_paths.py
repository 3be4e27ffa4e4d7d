"""doctor's `unit paths` lines: the folders the station's configuration writes, against what its
systemd unit lets it write.

From a shell every folder the station's user may write passes doctor; under the unit's
`ProtectSystem=strict` only the unit's own directories (StateDirectory= and the like) and its
ReadWritePaths= are writable, so a watched folder or outbox elsewhere stops the station at start
(exit 78). The unit FILE is read, with its drop-ins, not systemctl: the installed one
(/etc/systemd/system/UNIT, where install-jetson.sh puts it), else the repository's systemd/UNIT (said
as not installed: a WARN, not a FAIL). Drop-ins as systemd finds them: `UNIT.d/*.conf` and the
type-wide `service.d/*.conf` beside the unit and in the other unit folders (`DROPIN_ROOTS`), one of a
name in a folder earlier in that list hiding the later ones, applied in file-name order. Paths in
ReadWritePaths=, ReadOnlyPaths=, InaccessiblePaths=, BindPaths= (its destination, writable) and
BindReadOnlyPaths= count, with the system manager's specifiers (%S, %L, %C, %t, %E, %T, %V, %n, %N,
%p, %i, %%) resolved; where such settings nest, the deepest path decides, as systemd's mounts do. A
path with a specifier this cannot resolve (%h: the user's home) is left out.
"""

from __future__ import annotations

import logging
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

Check = tuple[str, str, str]

#: Where install-jetson.sh installs the station's unit, and `systemctl edit` puts its drop-ins.
UNIT_DIR = Path("/etc/systemd/system")
#: The system manager's unit folders, in systemd's order (the first hides a drop-in of the same name in
#: the later ones); the unit file's own folder is searched first.
DROPIN_ROOTS = (UNIT_DIR, Path("/run/systemd/system"), Path("/usr/local/lib/systemd/system"),
                Path("/usr/lib/systemd/system"), Path("/lib/systemd/system"))
#: The repository's units, when doctor runs from a checkout (absent in an installed wheel).
REPO_UNIT_DIR = Path(__file__).resolve().parents[2] / "systemd"
#: The fields whose folder the station cannot start without (BLOCKING in service/station/state_access.py).
BLOCKING = frozenset({"mqtt.outbox.path", "source.path", "source.state_file"})
_HOMES = (Path("/home"), Path("/root"), Path("/run/user"))
_DIRECTORIES = {"StateDirectory": "/var/lib", "LogsDirectory": "/var/log", "CacheDirectory": "/var/cache",
                "RuntimeDirectory": "/run", "ConfigurationDirectory": "/etc"}
_READ_ONLY = {"yes": ("/usr", "/boot", "/efi"), "true": ("/usr", "/boot", "/efi"),
              "full": ("/usr", "/boot", "/efi", "/etc")}


@dataclass
class UnitSandbox:
    """What a unit's [Service] section (its drop-ins applied) says about the file system."""

    files: list[Path]
    protect_system: str = "no"
    protect_home: str = "no"
    private_tmp: bool = False
    read_write: list[Path] = field(default_factory=list)  # ReadWritePaths=, BindPaths= and the unit's own directories
    read_only: list[Path] = field(default_factory=list)  # ReadOnlyPaths=, BindReadOnlyPaths=
    inaccessible: list[Path] = field(default_factory=list)  # InaccessiblePaths=

    def deepest(self, folder: Path) -> tuple[str, Path] | None:
        """("rw" | "ro" | "hidden", the setting's path) of the deepest path setting over `folder`."""
        rules = [(p, mode) for mode, paths in (("rw", self.read_write), ("ro", self.read_only),
                                               ("hidden", self.inaccessible)) for p in paths if _under(folder, p)]
        if not rules:
            return None
        path, mode = max(rules, key=lambda r: len(os.path.realpath(r[0])))
        return mode, path


def find_unit_file(unit: str, given: Path | None = None) -> tuple[Path | None, bool]:
    """(the unit file, whether it is the installed one): `given`, else UNIT_DIR's, else the repository's."""
    if given is not None:
        return given, True
    for path, installed in ((UNIT_DIR / unit, True), (REPO_UNIT_DIR / unit, False)):
        if path.is_file():
            return path, installed
    return None, False


def _lines(path: Path) -> list[str]:
    """The unit file's logical lines (a trailing backslash continues one)."""
    out: list[str] = []
    pending = ""
    for raw in path.read_text(errors="replace").splitlines():
        line = raw.strip()
        if not pending and line.startswith(("#", ";")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        out.append(pending + line)
        pending = ""
    return out + ([pending] if pending else [])


def dropin_files(unit_file: Path, roots: tuple[Path, ...] | None = None) -> list[Path]:
    """The unit's drop-ins (module doc), in the order systemd applies them."""
    unit_type = unit_file.suffix.lstrip(".") or "service"
    found: dict[str, Path] = {}
    for root in dict.fromkeys((unit_file.parent, *(DROPIN_ROOTS if roots is None else roots))):
        for folder in (root / f"{unit_file.name}.d", root / f"{unit_type}.d"):
            for path in sorted(folder.glob("*.conf")) if folder.is_dir() else ():
                found.setdefault(path.name, path)  # an earlier folder's of the same name hides it
    return [found[name] for name in sorted(found)]


_SPECIFIERS = {"S": "/var/lib", "L": "/var/log", "C": "/var/cache", "t": "/run", "E": "/etc", "T": "/tmp",
               "V": "/var/tmp", "%": "%"}


def resolve_specifiers(value: str, unit_name: str) -> str | None:
    """`value` with the system manager's specifiers resolved; None where one cannot be (%h, %u...)."""
    stem = unit_name.rsplit(".", 1)[0]
    prefix, _, instance = stem.partition("@")
    known = {**_SPECIFIERS, "n": unit_name, "N": stem, "p": prefix, "i": instance, "I": instance}
    out, i = [], 0
    while i < len(value):
        if value[i] == "%" and i + 1 < len(value):
            if value[i + 1] not in known:
                return None
            out.append(known[value[i + 1]])
            i += 2
        else:
            out.append(value[i])
            i += 1
    return "".join(out)


#: Path-list settings: (what they make of a path, whether the word is SRC[:DEST[:OPTIONS]]).
_PATH_LISTS = {"ReadWritePaths": ("rw", False), "ReadOnlyPaths": ("ro", False), "InaccessiblePaths": ("hidden", False),
               "BindPaths": ("rw", True), "BindReadOnlyPaths": ("ro", True)}


def _seen_path(word: str, bind: bool) -> str:
    """The path a path-list word makes the unit see: "-" (may be absent) and "+" (under RootDirectory=)
    dropped; a bind's SRC[:DEST[:OPTIONS]] is its DEST (SRC where none is given)."""
    word = word.lstrip("-+")
    if not bind:
        return word
    source, _, rest = word.partition(":")
    return rest.partition(":")[0] or source


def read_sandbox(unit_file: Path, roots: tuple[Path, ...] | None = None) -> UnitSandbox:
    """The unit file's [Service] settings, then its drop-ins' in name order, as systemd applies them
    (a list setting given empty is reset)."""
    sandbox = UnitSandbox(files=[unit_file, *dropin_files(unit_file, roots)])
    lists: dict[str, list[str]] = {key: [] for key in _PATH_LISTS}
    own: list[str] = []
    for path in sandbox.files:
        section = ""
        for line in _lines(path):
            if line.startswith("["):
                section = line.strip("[] ")
                continue
            key, sep, value = (part.strip() for part in line.partition("="))
            if section != "Service" or not sep:
                continue
            if key == "ProtectSystem":
                sandbox.protect_system = value.lower() or "no"
            elif key == "ProtectHome":
                sandbox.protect_home = value.lower() or "no"
            elif key == "PrivateTmp":
                sandbox.private_tmp = value.lower() in ("yes", "true", "1", "on")
            elif key in _PATH_LISTS:
                words = shlex.split(value)
                lists[key] = lists[key] + [_seen_path(w, _PATH_LISTS[key][1]) for w in words] if words else []
            elif key in _DIRECTORIES:
                words = shlex.split(value)
                base = _DIRECTORIES[key]
                own = own + [f"{base}/{w.split(':')[0]}" for w in words] if words else own

    def paths(values: list[str]) -> list[Path]:
        resolved = (resolve_specifiers(v, unit_file.name) for v in values)
        return [Path(v) for v in resolved if v is not None and v.startswith("/")]

    by_mode: dict[str, list[str]] = {"rw": list(own), "ro": [], "hidden": []}
    for key, (mode, _) in _PATH_LISTS.items():
        by_mode[mode] += lists[key]
    sandbox.read_write, sandbox.read_only, sandbox.inaccessible = (paths(by_mode[m]) for m in ("rw", "ro", "hidden"))
    return sandbox


def station_folders(config) -> list[tuple[str, Path]]:
    """(config field, folder) for each folder the station writes in (creates files or folders there)."""
    from smearscope.service.station.typed_cells import review_directory, typed_cells_path

    folders = [("mqtt.outbox.path", Path(config.mqtt.outbox.path).parent)]
    source = config.source
    if getattr(source, "kind", None) == "folder":
        folders.append(("source.path", Path(source.path)))
        if source.state_file is not None:
            folders.append(("source.state_file", Path(source.state_file).parent))
    if config.review.enabled:
        folders.append(("review.directory", Path(review_directory(config))))
        if config.review.typing:
            folders.append(("review.typed_cells_path", Path(typed_cells_path(config)).parent))
    return folders


def _under(path: Path, top: Path) -> bool:
    real, real_top = os.path.realpath(path), os.path.realpath(top)
    return real == real_top or real.startswith(real_top.rstrip("/") + "/")


def why_not_writable(folder: Path, sandbox: UnitSandbox) -> str | None:
    """Why the unit cannot write in `folder` (None: it can, or it is the unit's private /tmp, said apart)."""
    home = next((h for h in _HOMES if _under(folder, h)), None)
    if home is not None and sandbox.protect_home in ("yes", "true", "tmpfs"):
        return f"hidden (ProtectHome={sandbox.protect_home} hides {home})"
    rule = sandbox.deepest(folder)
    if rule is not None and rule[0] == "hidden":
        return f"hidden (InaccessiblePaths= names {rule[1]})"
    if rule is not None and rule[0] == "ro":
        return f"read-only (ReadOnlyPaths= or BindReadOnlyPaths= names {rule[1]})"
    allowed = rule is not None  # the deepest setting over it makes it writable
    if home is not None and sandbox.protect_home == "read-only" and not allowed:
        return "read-only (ProtectHome=read-only; in no ReadWritePaths=)"
    if sandbox.protect_system == "strict":
        if allowed or any(_under(folder, Path(p)) for p in ("/dev", "/proc", "/sys")):
            return None
        if sandbox.private_tmp and any(_under(folder, Path(p)) for p in ("/tmp", "/var/tmp")):
            return None
        return "read-only (ProtectSystem=strict; in no ReadWritePaths= nor a directory of the unit's own)"
    top = next((t for t in _READ_ONLY.get(sandbox.protect_system, ()) if _under(folder, Path(t))), None)
    if top is not None and not allowed:
        return f"read-only (ProtectSystem={sandbox.protect_system} makes {top} so; in no ReadWritePaths=)"
    return None


def unit_path_checks(config, unit: str, given: Path | None = None) -> list[Check]:
    """A line per folder the unit would not let the station write (FAIL for the outbox and the watched
    folder of an installed unit: the station exits 78 there), else one OK line naming the unit file."""
    unit_file, installed = find_unit_file(unit, given)
    if unit_file is None:
        return [("INFO", "unit paths", (f"no unit file {UNIT_DIR / unit} (nor the repository's): the folders the "
                                        "config writes are not compared with a unit's ReadWritePaths="))]
    sandbox = read_sandbox(unit_file)
    where = str(unit_file) if installed else f"{unit_file} (the repository's; {UNIT_DIR / unit} is not installed)"
    if sandbox.files[1:]:
        where += " with " + ", ".join(p.name for p in sandbox.files[1:])
    checks: list[Check] = []
    service = unit.removesuffix(".service")
    seen: set[str] = set()
    for what, folder in station_folders(config):
        if os.path.realpath(folder) in seen:  # the typed cells beside the outbox: said once, as the outbox's
            continue
        seen.add(os.path.realpath(folder))
        reason = why_not_writable(folder, sandbox)
        if reason is None:
            if sandbox.private_tmp and any(_under(folder, Path(p)) for p in ("/tmp", "/var/tmp")):
                checks.append(("WARN", "unit paths", (
                    f"{what}: {folder} is in the unit's private /tmp (PrivateTmp=yes, {where}): what the station "
                    "keeps there is removed when it stops, and files put there from outside never reach it; "
                    "choose a folder under /var/lib/smearscope")))
            continue
        status = "FAIL" if installed and what in BLOCKING else "WARN"
        effect = ("the station refuses to start (exit 78)" if what in BLOCKING
                  else "the station runs without it (said at ERROR)")
        fix = ("Move it out of there (e.g. under /var/lib/smearscope)"
               if reason.startswith("hidden") else
               f"Allow it in a drop-in: sudo systemctl edit {service}, add [Service] then ReadWritePaths={folder} "
               f"(it must exist when the station starts), then sudo systemctl restart {service}")
        checks.append((status, "unit paths",
                       f"{what}: {folder} is {reason} under {where}: there {effect}, though a shell can write it. {fix}"))
    if not checks:
        checks.append(("OK", "unit paths", f"the folders the config writes are writable under {where}"))
    return checks
