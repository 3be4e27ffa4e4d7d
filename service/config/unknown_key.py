"""What `validate-config` says of a key the station config has no setting for, and of a section
written wrong, in the file's own terms.

pydantic's own words, "Extra inputs are not permitted" or "Unable to extract tag using
discriminator 'kind'", name neither the section nor what was meant. A key of another source kind
(a camera's `device` under `kind = "folder"`, left over from the example's camera section) is said
to be that kind's; a misspelt key gets the nearest setting of its section; a [source] without its
kind gets the kinds there are.
"""

from __future__ import annotations

import difflib
import logging
import typing
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel

from smearscope.device.source_config import SOURCE_KINDS

logger = logging.getLogger(__name__)


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models a field's annotation holds (itself, an optional one, a union's)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def _kind_of(model: type[BaseModel]) -> str | None:
    """The `kind` tag a member of a discriminated union is chosen by, if it has one."""
    field = model.model_fields.get("kind")
    args = typing.get_args(field.annotation) if field is not None else ()
    return args[0] if len(args) == 1 and isinstance(args[0], str) else None


def unknown_key_message(root: type[BaseModel], loc: tuple[int | str, ...]) -> str:
    """The reason for the unknown key at `loc` (pydantic's error location, union tags included)."""
    key = str(loc[-1])
    model: type[BaseModel] | None = root
    members: list[type[BaseModel]] = []  # the union the last section chose from, if any
    siblings: list[type[BaseModel]] = []  # the union the key's section was chosen from
    path: list[str] = []  # the section as the file names it, without union tags
    for part in loc[:-1]:
        chosen = [m for m in members if _kind_of(m) == part]
        if chosen:  # a discriminated union's tag: the member it chose
            model, siblings, members = chosen[0], members, []
            continue
        if model is None:
            break
        if isinstance(part, int):
            continue
        path.append(str(part))
        field = model.model_fields.get(part)
        found = _models_in(field.annotation) if field is not None else []
        model, siblings, members = (found[0], [], []) if len(found) == 1 else (None, [], found)
    if model is None:
        return "unknown key: no such setting"
    kind = _kind_of(model) if siblings else None
    section = f"[{'.'.join(path)}]" if path else "the top level"
    where = f'{section} of kind = "{kind}"' if kind else section
    others = [k for m in siblings if (k := _kind_of(m)) and k != kind and key in m.model_fields]
    if others:
        named = " or ".join(f'"{k}"' for k in others)
        return f'unknown key for kind = "{kind}": a setting of kind = {named} only; remove it'
    if f"{key}_credential" in model.model_fields:  # `password = "..."`: a secret written into the file
        return _secret_message(where, key, path)
    # a section's setting first: `outbox_path` is nearest, letter by letter, to `outbox` itself
    hint = _in_a_subsection(model, path, key)
    close = difflib.get_close_matches(key, list(model.model_fields), n=1, cutoff=0.7) or _same_words(key, model)
    hint = hint or (f"; did you mean {close[0]}?" if close else "")
    if not hint:  # a section's setting under another section's line (appended at the file's end)
        homes = [f"[{s}]" for s in _sections_with(root, key) if s != ".".join(path)]
        hint = f"; a setting of {' or '.join(homes)}" if homes else ""
    return f"unknown key: {where} has no such setting{hint}"


def _secret_message(where: str, key: str, path: list[str]) -> str:
    """A secret in the config is read by whoever reads the file; systemd hands it over instead."""
    name = "-".join([*path, key])
    return (f"unknown key: {where} takes no {key}, a secret never goes in the config: write it to "
            f"/etc/smearscope/{name} (root, mode 0600), hand it over with the unit's "
            f"LoadCredential={name}:/etc/smearscope/{name} and set {key}_credential = \"{name}\" "
            "(docs/STATION.md section 4)")


def _same_words(key: str, model: type[BaseModel]) -> list[str]:
    """The setting whose name holds every word of `key`, in any order (`wbc_target` for
    `target_wbc_count`, `focus_min` for `min_focus`), which letter-by-letter nearness misses."""
    words = set(key.lower().split("_"))
    found = [name for name in model.model_fields if len(words) > 1 and words <= set(name.split("_"))]
    return sorted(found, key=len)[:1]


def _sections_with(model: type[BaseModel], key: str, prefix: str = "") -> list[str]:
    """The sections (dotted, as the file heads them) that have a setting named `key`."""
    found: list[str] = []
    for name, field in model.model_fields.items():
        members = _models_in(field.annotation)
        section = f"{prefix}.{name}" if prefix else name
        if any(key in m.model_fields for m in members):
            found.append(section)
        for sub in {id(m): m for m in members}.values():
            found += [s for s in _sections_with(sub, key, section) if s not in found]
    return found


def _in_a_subsection(model: type[BaseModel], path: list[str], key: str) -> str:
    """`mqtt_host` at the top level (or SMEARSCOPE__MQTT_HOST, one underscore where levels take
    two): the `host` of its `[mqtt]` section, where that section has one."""
    for i in range(key.find("_"), len(key)):
        head, tail = key[:i], key[i + 1:]
        if key[i:i + 1] != "_" or not head or not tail:
            continue
        field = model.model_fields.get(head)
        found = _models_in(field.annotation) if field is not None else []
        if any(tail in m.model_fields for m in found):
            return f"; did you mean {tail} in [{'.'.join([*path, head])}]?"
    return ""


def section_message(where: str, err: Mapping[str, Any]) -> str | None:
    """pydantic's words for a section written wrong, said as the file is written: a [source]
    without its kind, or of a kind there is none of; a section given as a value (`source = "x"`).
    None: pydantic's own message stands."""
    ctx = err.get("ctx") or {}
    if err["type"] == "union_tag_not_found":
        return f"no kind: [{where}] needs kind = {_kinds(ctx)}"
    if err["type"] == "union_tag_invalid":
        return f"kind = \"{ctx.get('tag')}\" is none of {_kinds(ctx)}"
    if err["type"] in ("model_attributes_type", "model_type"):
        return f"a section: write it as [{where}] with its keys on the lines below, not {where.rsplit('.', 1)[-1]} = ..."
    return None


def _kinds(ctx: Mapping[str, Any]) -> str:
    tags = [t.strip().strip("'") for t in str(ctx.get("expected_tags", "")).split(",") if t.strip()]
    tags = tags or list(SOURCE_KINDS)  # pydantic names none when the tag is missing; [source] is the one union
    return ", ".join(f'"{t}"' for t in tags[:-1]) + f' or "{tags[-1]}"' if len(tags) > 1 else f'"{tags[0]}"'
