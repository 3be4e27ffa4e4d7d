"""Loading the station configuration from TOML with environment overrides.

`load_config(path)` reads the TOML file, applies `SMEARSCOPE__SECTION__FIELD=value` environment
overrides (double underscore between levels, case-insensitive, e.g.
`SMEARSCOPE__QUALITY__MIN_FOCUS=80`, `SMEARSCOPE__SOURCE__KIND=simulated`; values are parsed by
the field's type, and a value starting with '[' or '{' is read as a TOML array or inline table)
and validates the result into a frozen `StationConfig`. Nothing here touches files other than the
config file itself: validators are pure, so `smearscope validate-config FILE` has no side effects.
Secrets never live here: the MQTT password is a systemd credential named by
`mqtt.password_credential`.
"""

from __future__ import annotations

import ast
import copy
import logging
import os
import re
import stat
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from smearscope.device.config_fields import SCALE_RANGE_UM, scale_advice
from smearscope.device.source_config import SOURCE_KINDS
from smearscope.service.config.station import StationConfig
from smearscope.service.config.unknown_key import section_message, unknown_key_message

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 needs the backport
    import tomli as tomllib

logger = logging.getLogger(__name__)

ENV_PREFIX = "SMEARSCOPE__"
#: Exit status of an invalid configuration (sysexits EX_CONFIG); the unit does not restart on it.
EXIT_CONFIG = 78


#: Largest config file read (the example is about 10 KiB).
MAX_CONFIG_BYTES = 1024 * 1024


class ConfigError(Exception):
    """The configuration could not be loaded; `errors` lists (field.path, reason) pairs."""

    def __init__(self, errors: list[tuple[str, str]]) -> None:
        self.errors = errors
        super().__init__("; ".join(f"{loc}: {msg}" for loc, msg in errors))


def _parse_env_value(raw: str) -> Any:
    text = raw.strip()
    if text[:1] in ("[", "{"):
        try:
            return tomllib.loads(f"value = {text}")["value"]
        except (tomllib.TOMLDecodeError, RecursionError):
            return raw  # let validation report it against the field
    return raw


def apply_env_overrides(
    data: Mapping[str, Any], environ: Mapping[str, str]
) -> tuple[dict[str, Any], dict[tuple[str, ...], str]]:
    """A copy of `data` with SMEARSCOPE__A__B=value applied; also which variable set each path."""
    merged: dict[str, Any] = copy.deepcopy(dict(data))
    applied: dict[tuple[str, ...], str] = {}
    errors: list[tuple[str, str]] = []
    for name in sorted(environ):
        if not name.upper().startswith(ENV_PREFIX):
            # SMEARSCOPE_MQTT__HOST: meant as an override, and silently not read would leave the
            # setting at the file's value (SMEARSCOPE_DATA, with no level, is the datasets')
            rest = name[len(ENV_PREFIX) - 1:]
            if name.upper().startswith(ENV_PREFIX[:-1]) and "__" in rest:
                errors.append((name, (f"not read: an override starts {ENV_PREFIX}, two underscores "
                               f"(did you mean {ENV_PREFIX}{rest.lstrip('_')}?)")))
            continue
        path = tuple(part.lower() for part in name[len(ENV_PREFIX):].split("__"))
        if not all(path):
            errors.append((name, "empty level in variable name (use SMEARSCOPE__SECTION__FIELD)"))
            continue
        node = merged
        for depth, part in enumerate(path[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                errors.append((name, f"{'.'.join(path[: depth + 1])} is a value, not a section"))
                break
            node = child
        else:
            node[path[-1]] = _parse_env_value(environ[name])
            applied[path] = name
    if errors:
        raise ConfigError(errors)
    return merged, applied


def _format_loc(loc: tuple[int | str, ...]) -> str:
    parts = list(loc)
    # Discriminated unions put the chosen tag in the path; users wrote `source.x`, not
    # `source.folder.x`.
    if len(parts) >= 2 and parts[0] == "source" and parts[1] in SOURCE_KINDS:
        del parts[1]
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (("." if text else "") + str(part))
    return text or "(root)"


def _scale_message(err: Mapping[str, Any]) -> str | None:
    """A microns_per_pixel outside the range every scale setting takes, said with its unit and the
    reading meant (`microns_per_pixel = 72`: nanometres?); None for any other error."""
    ctx = err.get("ctx") or {}
    bound = {"less_than_equal": ctx.get("le"), "greater_than_equal": ctx.get("ge")}.get(err["type"])
    if err["loc"][-1:] != ("microns_per_pixel",) or bound not in SCALE_RANGE_UM:
        return None
    try:  # a number in the file; the text of an environment override
        value = float(err.get("input"))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return f"{value:g} is outside {SCALE_RANGE_UM[0]}..{SCALE_RANGE_UM[1]}{scale_advice(value)}"


def _validation_errors(
    exc: ValidationError, applied: Mapping[tuple[str, ...], str]
) -> list[tuple[str, str]]:
    out = []
    for err in exc.errors(include_url=False):
        loc = _format_loc(tuple(err["loc"]))
        msg = (unknown_key_message(StationConfig, tuple(err["loc"])) if err["type"] == "extra_forbidden"
               else section_message(loc, err) or _scale_message(err) or str(err["msg"]).removeprefix("Value error, "))
        for path, variable in applied.items():
            key = ".".join(path)  # the value itself, a key inside it, or an item of its array
            if loc == key or loc.startswith((key + ".", key + "[")):
                msg += f" (set by {variable})"
                break
        else:  # a key of the file refused because a variable changed its section's kind
            kind_var = applied.get((*loc.split(".")[:-1], "kind"))
            if err["type"] == "extra_forbidden" and kind_var:
                msg += f" (kind set by {kind_var})"
            elif err["type"] == "union_tag_invalid" and (kind_var := applied.get((*loc.split("."), "kind"))):
                msg += f" (set by {kind_var})"  # the kind there is none of: not the file's
        out.append((loc, msg))
    return out


def parse_config(
    data: Mapping[str, Any], environ: Mapping[str, str] | None = None
) -> StationConfig:
    """Validate an already-parsed TOML document plus environment overrides."""
    merged, applied = apply_env_overrides(data, os.environ if environ is None else environ)
    try:
        config = StationConfig.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(_validation_errors(exc, applied)) from None
    coerced = _taken_as_numbers(merged, config, set(applied))
    if coerced:
        raise ConfigError(coerced)
    return config


def _taken_as_numbers(data: Any, model: Any, from_env: set[tuple[str, ...]],
                               path: tuple[str, ...] = ()) -> list[tuple[str, str]]:
    """pydantic's lax mode reads `port = true` as 1 and `port = "1883"` as 1883: in the file a
    boolean or a string is never a number (an environment override is text, read by the field's
    type: `from_env` holds the paths they set)."""
    out: list[tuple[str, str]] = []
    if not isinstance(data, Mapping) or not isinstance(model, BaseModel):
        return out
    for key, value in data.items():
        here = (*path, str(key).lower())
        where = ".".join(here)
        parsed = getattr(model, str(key), None)
        if isinstance(parsed, (int, float)) and not isinstance(parsed, bool):
            if isinstance(value, bool):
                out.append((where, f"expected a number, got the boolean {str(value).lower()}"))
            elif isinstance(value, str) and here not in from_env:
                out.append((where, f"expected a number, got the string {value!r} (write it without quotes)"))
        out += _taken_as_numbers(value, parsed, from_env, here)
    return out


# a station's first config: where to start from, rather than only that nothing is there
NO_CONFIG_YET = ("write the station's config there, starting from config/station.example.toml (every section, "
                 "commented; systemd/install-jetson.sh installs it as /etc/smearscope/station.toml; "
                 "docs/STATION.md section 3)")


_TWICE = re.compile(r"^Cannot declare \((.*)\) twice")


def _twice_advice(message: str, raw: bytes) -> str:
    """What to do about a section given twice: most often the example's other [source] kind
    uncommented below its camera section, which it was meant to replace."""
    match = _TWICE.match(message)
    if match is None:
        return ""
    try:
        keys = ast.literal_eval(f"({match.group(1)})")
    except (ValueError, SyntaxError):
        return ""
    name = ".".join(str(key) for key in keys)
    text = raw.removeprefix(b"\xef\xbb\xbf").decode("utf-8", "replace")
    first = next((f" at line {number}" for number, line in enumerate(text.splitlines(), 1)
                  if re.sub(r"\s+", "", line.partition("#")[0]) == f"[{name}]"), "")
    if name == "source":
        return (f": [source] is declared already{first}; a station has one source: the example's folder, replay "
                "and simulated [source] sections replace its camera one, so delete (or comment out) the other "
                "[source] section and its keys")
    return f": [{name}] is declared already{first}; give each section once, its keys under one heading"


def load_config(path: str | Path, environ: Mapping[str, str] | None = None) -> StationConfig:
    """Read, override and validate the station config; raises ConfigError with every problem."""
    path = Path(path)
    try:
        # not blocking: opening a FIFO for reading would wait for a writer
        with os.fdopen(os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)), "rb") as fh:
            if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):  # a FIFO, /dev/zero: never read to the end
                raise ConfigError([(str(path), "not a regular file")])
            raw = fh.read(MAX_CONFIG_BYTES + 1)
        if len(raw) > MAX_CONFIG_BYTES:
            raise ConfigError([(str(path), f"larger than {MAX_CONFIG_BYTES // 1024} KiB: not a station config")])
        # a byte-order mark (Windows Notepad writes one) is not TOML, but it is not a mistake either
        data = tomllib.loads(raw.removeprefix(b"\xef\xbb\xbf").decode("utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError([(str(path), f"cannot read: {exc.strerror or exc}; {NO_CONFIG_YET}")]) from None
    except OSError as exc:
        raise ConfigError([(str(path), f"cannot read: {exc.strerror or exc}")]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([(str(path), f"TOML syntax error: {exc}{_twice_advice(str(exc), raw)}")]) from None
    except RecursionError:  # tomllib recurses into nested arrays and tables
        raise ConfigError([(str(path), "TOML nested too deeply")]) from None
    except UnicodeDecodeError as exc:
        reason = f"not UTF-8 text (byte {exc.start}): a TOML file must be UTF-8"
        raise ConfigError([(str(path), reason)]) from None
    return parse_config(data, environ)


def print_config_errors(exc: ConfigError, source: str | Path) -> None:
    """On stderr: each problem as `field.path: reason`, then how many, naming the config."""
    for loc, msg in exc.errors:
        print(f"{loc}: {msg}", file=sys.stderr)
    print(f"{source}: {len(exc.errors)} error(s)", file=sys.stderr)
