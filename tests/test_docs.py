"""The documents against the code: every option docs/CLI.md's synopsis names exists and every
option has help, every command line the documents show parses, the decoder's reject codes and the
station's commands are documented, every config key is named somewhere and the keys the example
config shows commented out are real ones; and the product documents describe the product, not the
work that made it."""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
import typing
from pathlib import Path

import pydantic
import pytest

from smearscope.cli import build_parser

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10, JetPack 6's
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "docs/CLI.md", "docs/STATION.md", "docs/MQTT.md", "docs/FHIR.md", "docs/RESULTS.md", "docs/ARCHIVE.md", "docs/HL7.md",
        "models/README.md", "training/README.md")
OPTION = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


def _text(name: str) -> str:
    return (ROOT / name).read_text(encoding="utf-8")


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _nested(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """The parser and its own subcommands' (`archive find`, `archive show`)."""
    subs = [p for a in parser._actions if isinstance(a, argparse._SubParsersAction) for p in a.choices.values()]
    return [parser, *subs]


def _options(parser: argparse.ArgumentParser) -> set[str]:
    return {s for p in _nested(parser) for a in p._actions for s in a.option_strings}


def _synopsis() -> list[tuple[str, str]]:
    """docs/CLI.md's first block, one (subcommand, its text) per `smearscope CMD` entry; an
    indented line continues the entry above it."""
    block = re.search(r"```sh\n(.*?)```", _text("docs/CLI.md"), re.DOTALL).group(1)  # type: ignore[union-attr]
    entries: list[list[str]] = []
    for line in block.splitlines():
        if line.startswith("smearscope "):
            entries.append([line])
        elif line.startswith(" ") and line.strip().startswith("[") and entries:
            entries[-1].append(line)
    out = []
    for lines in entries:
        text = " ".join(line.split("#", 1)[0] for line in lines)
        words = [w for w in text.split()[1:] if re.fullmatch(r"[a-z][a-z-]+", w)]
        out.append((words[0] if words else "", text))  # "": the options of no subcommand
    return out


def test_the_synopsis_names_every_subcommand_and_only_options_that_exist():
    commands = _subcommands()
    entries = _synopsis()
    assert {cmd for cmd, _ in entries if cmd} == set(commands), "CLI.md synopsis vs the parser"
    top = _options(build_parser())
    for cmd, text in entries:
        known = top | (_options(commands[cmd]) if cmd in commands else set())
        missing = sorted(set(OPTION.findall(text)) - known)
        assert not missing, f"docs/CLI.md: smearscope {cmd}: {missing} not options of the command"
    for cmd, parser in commands.items():  # and the other way: --help shows no option the synopsis hides
        shown = {o for c, text in entries if c == cmd for o in OPTION.findall(text)}
        # --log-level is every command's, before or after its name: the synopsis says so on its own line
        hidden = sorted(_options(parser) - shown - {"-h", "--help", "--log-level"})
        assert not hidden, f"docs/CLI.md's synopsis: smearscope {cmd} lacks {hidden}"
        assert "--log-level" in _options(parser), cmd
    assert "# after the command too: smearscope analyze F --log-level DEBUG" in (ROOT / "docs" / "CLI.md").read_text()


def _every_subcommand(parser: argparse.ArgumentParser, prefix: str = "") -> dict[str, argparse.ArgumentParser]:
    """Each subcommand ("archive find" too) and its parser."""
    found: dict[str, argparse.ArgumentParser] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found[f"{prefix}{name}"] = sub
                found.update(_every_subcommand(sub, f"{prefix}{name} "))
    return found


def test_every_subcommands_help_says_what_it_does_and_when_to_use_it(capsys: pytest.CaptureFixture[str]) -> None:
    """`smearscope doctor --help` (and schema, run, install-models, archive find ...) showed only the
    usage and options: each subcommand's --help now opens with a paragraph of its own."""
    commands = _every_subcommand(build_parser())
    assert {"doctor", "run", "archive find", "archive send-hl7"} <= set(commands)
    for name, parser in commands.items():
        assert parser.description and len(parser.description.split()) >= 15, f"smearscope {name}: no description"
        with pytest.raises(SystemExit):
            build_parser().parse_args([*name.split(), "--help"])
        said = " ".join(capsys.readouterr().out.split())
        assert " ".join(parser.description.split()[:12]) in said, (name, said[:300])


def _default(action: argparse.Action) -> str:
    """An option's default as a user meets it: the parser's, or where that is None (applied
    later, as --detections-floor's) the one its help states."""
    if action.default is not None:
        return str(action.default)
    found = re.search(r"\(default:? ([^\s,;)]+)", action.help or "")
    return found.group(1).rstrip(":") if found else "None"


def test_the_synopsis_shows_each_options_default():
    """`[--budget 0.05]` in the synopsis is the default a user gets when leaving the option out."""
    commands = _subcommands()
    shown = 0
    for cmd, text in _synopsis():
        for option, value in re.findall(r"\[(--[a-z][a-z0-9-]*) ([0-9.]+|[a-z-]+)\]", text):  # not FILE, x.toml
            action = next(a for a in commands[cmd]._actions if option in a.option_strings)
            default = _default(action)
            same = (float(value) == float(default) if re.fullmatch(r"[0-9.]+", value)
                    and re.fullmatch(r"[0-9.]+", default) else value == default)
            assert same, f"docs/CLI.md: smearscope {cmd} [{option} {value}], but its default is {default}"
            shown += 1
    assert shown >= 6  # the synopsis shows several; a broken search would check none


def _command_lines() -> list[tuple[str, list[str]]]:
    """Every concrete `smearscope ...` command line of the documents' code blocks and inline code
    (the synopsis' notation, with [optional] parts and alternatives, left out)."""
    found: list[tuple[str, list[str]]] = []
    for name in DOCS:
        text = _text(name)
        blocks = re.findall(r"```[a-z]*\n(.*?)```", text, re.DOTALL)
        if name == "docs/CLI.md":
            blocks = blocks[1:]
        lines = [(line, False) for block in blocks for line in re.sub(r"\\\n\s*", " ", block).splitlines()]
        lines += [(line, True) for line in re.findall(r"`([^`\n]*\bsmearscope [a-z][^`\n]*)`", text)]
        for line, inline in lines:
            m = re.search(r"(?:^|[\s/])smearscope\s+((?:--log-level \S+ )?[a-z][a-z-]+\b.*)$", line)
            if m is None:
                continue
            command = m.group(1).split(" #", 1)[0].strip()
            if any(c in command for c in "[]|<>{}") or command.split()[0 if command[0] != "-" else 2] \
                    not in _subcommands():
                continue
            words = shlex.split(command)  # "...": an option's value left out, or more of the same
            argv = [w if w != "..." else "x" for i, w in enumerate(words)
                    if w != "..." or (i and words[i - 1].startswith("--"))]
            if inline and len(argv) < 3:  # a command named in a sentence ("what `smearscope analyze` prints")
                continue
            found.append((name, argv))
    return found


def test_every_documented_command_line_parses():
    lines = _command_lines()
    assert len(lines) > 20  # the documents show many; a broken search would check none
    parser = build_parser()
    for name, argv in lines:
        try:
            parser.parse_args(argv)
        except SystemExit as exc:
            pytest.fail(f"{name}: `smearscope {' '.join(argv)}` is refused by the parser (exit {exc.code})")


def test_every_reject_code_of_the_decoder_is_documented():
    """The codes are a stable contract (docs/CLI.md "Errors", which STATION.md and MQTT.md point to)."""
    from smearscope.device.ingest.errors import RejectReason

    cli = _text("docs/CLI.md")
    missing = [r.value for r in RejectReason if f"`{r.value}`" not in cli]
    assert not missing, f"docs/CLI.md does not name {missing}"


def test_every_station_command_is_in_the_documents():
    from smearscope.service.station.commands import COMMAND_ARGUMENTS

    station, readme = _text("docs/STATION.md"), _text("README.md")
    for name, arguments in COMMAND_ARGUMENTS.items():
        row = re.search(rf"^\| `{name}` \| ([^|]*)\|", station, re.MULTILINE)
        assert row is not None, f"docs/STATION.md's command table lacks {name}"
        payload = json.loads(re.search(r"`(\{.*\})`", row.group(1)).group(1))  # type: ignore[union-attr]
        assert set(payload) == set(arguments), f"docs/STATION.md: {name}'s arguments"
        assert f"`{name}`" in readme, f"README's command list lacks {name}"


def test_every_error_a_station_command_answers_is_in_the_command_table():
    """docs/STATION.md's commands (the table and the lines after it, up to "Start and stop") name
    every code the station's own handlers answer with; the MQTT transport's refusals are
    docs/MQTT.md's. A code a technician's tool can receive and no document explains is no contract."""
    station = _text("docs/STATION.md")
    section = station[station.index("**Commands**"):station.index("**Start and stop.**")]
    codes: set[str] = set()
    for path in sorted((ROOT / "service" / "station").glob("*.py")):
        codes |= set(re.findall(r'"error": "([a-z_]+)"', path.read_text(encoding="utf-8")))
    assert {"run_open", "no_run_open", "review_off"} <= codes  # a broken search would check none
    missing = sorted(code for code in codes if f"`{code}`" not in section)
    assert not missing, f"docs/STATION.md's commands do not name {missing}"


#: Where each station command's answers are made: (module under service/station, function).
COMMAND_HANDLERS = {
    "start_run": [("commands", "_start_run")], "stop_run": [("commands", "_stop_run")],
    "analyze_file": [("commands", "_analyze_file"), ("workers", "_finish")],
    "get_review": [("clinic", "get_review"), ("review", "page")], "type_cells": [("type_cells_command", "type_cells")],
    "verify_run": [("clinic", "verify")], "reload": [("daemon", "reload")],
}


def _error_codes(module: str, function: str) -> set[str]:
    """The codes a function answers with: `"error": "code"` in a dict it builds, or `"error": code`
    where `code` is assigned string constants in it."""
    import ast

    tree = ast.parse((ROOT / "service" / "station" / f"{module}.py").read_text(encoding="utf-8"))
    return _answered_codes(next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == function))


def _answered_codes(body: typing.Any) -> set[str]:
    """The codes `"error": ...` takes in the dicts built under an AST node (see _error_codes)."""
    import ast

    assigned: dict[str, set[str]] = {}
    for node in ast.walk(body):
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            value = node.value  # code = "a", or code = "a" if ... else "b"
            options = [value.body, value.orelse] if isinstance(value, ast.IfExp) else [value]
            assigned.setdefault(node.targets[0].id, set()).update(
                c.value for c in options if isinstance(c, ast.Constant) and isinstance(c.value, str))
    codes: set[str] = set()
    for node in ast.walk(body):
        if isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values):
                if isinstance(key, ast.Constant) and key.value == "error":
                    if isinstance(value, ast.Constant):
                        codes.add(value.value)
                    elif isinstance(value, ast.Name):
                        codes |= assigned.get(value.id, set())
    return codes


def test_each_station_commands_row_names_the_errors_it_answers():
    """A row of docs/STATION.md's command table names every code its command's handler answers
    with (the codes any command may get are said under the table)."""
    station = _text("docs/STATION.md")
    for name, handlers in COMMAND_HANDLERS.items():
        row = re.search(rf"^\| `{name}` \|.*$", station, re.MULTILINE)
        assert row is not None, name
        codes = set().union(*(_error_codes(module, function) for module, function in handlers))
        assert codes, f"{name}: no error code found in {handlers}"  # a broken search would check none
        missing = sorted(code for code in codes if f"`{code}`" not in row.group(0))
        assert not missing, f"docs/STATION.md: the {name} row does not name {missing}"


def _section_fields(model: type[pydantic.BaseModel], path: list[str]) -> set[str]:
    """The keys a TOML section may hold: `path` walked down the config models (a union's members
    pooled, as for the source kinds)."""
    models = [model]
    for part in path:
        nxt = []
        for m in models:
            field = m.model_fields[part]
            stack = [field.annotation]
            while stack:
                t = stack.pop()
                if isinstance(t, type) and issubclass(t, pydantic.BaseModel):
                    nxt.append(t)
                else:
                    stack.extend(typing.get_args(t))
        models = nxt
    assert models, path
    return {f for m in models for f in m.model_fields}


def test_the_example_configs_commented_keys_are_real():
    """config/station.example.toml shows options commented out (`# key = value`): each must be a
    key of its section, or a user who uncomments it gets a config the station refuses."""
    from smearscope.service.config.station import StationConfig

    text = _text("config/station.example.toml")
    tomllib.loads(text)  # the example itself is TOML
    section: list[str] = []
    checked = 0
    for line in text.splitlines():
        if m := re.match(r"^#?\s*\[([a-z_.]+)\]", line):
            section = m.group(1).split(".")
            continue
        if m := re.match(r"^#\s*([a-z_]+) = \S", line):
            assert m.group(1) in _section_fields(StationConfig, section), f"[{'.'.join(section)}] {m.group(1)}"
            checked += 1
    assert checked > 10


def test_product_documents_describe_the_product_not_the_work_items():
    """Bars are stated as what they are, and hardware as what ran on it: a tracker's numbering ("issue
    16") or which machines happened to be at hand means nothing to a reader."""
    for name in DOCS:
        cited = re.findall(r"\b[Ii]ssue \d+|\blent\b|\bno \w+ was available", _text(name))
        assert not cited, f"{name} cites {cited}"


def test_every_option_says_what_it_does_in_help():
    """`smearscope CMD --help` is the first document a user reads: no option is left bare there."""
    bare = [f"{name} {' '.join(a.option_strings) or a.dest}" for name, parser in _subcommands().items()
            for p in _nested(parser) for a in p._actions if not a.help and not isinstance(a, argparse._HelpAction)]
    assert not bare, f"options without help: {bare}"


def test_every_config_key_is_named_in_a_document():
    """A station's owner learns the keys from the example config and the documents (the models'
    descriptions back them): a key named nowhere is one nobody knows to set."""
    from smearscope.service.config.station import StationConfig

    text = "".join(_text(n) for n in ("config/station.example.toml", "docs/STATION.md", "docs/MQTT.md",
                                      "docs/CLI.md", "docs/FHIR.md", "README.md"))
    unnamed: list[str] = []

    def walk(model: type[pydantic.BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            if not re.search(rf"(?<!\w){re.escape(name)}(?!\w)", text):
                unnamed.append(prefix + name)
            stack = [field.annotation]
            while stack:
                t = stack.pop()
                if isinstance(t, type) and issubclass(t, pydantic.BaseModel):
                    walk(t, f"{prefix}{name}.")
                else:
                    stack.extend(typing.get_args(t))

    walk(StationConfig, "")
    assert not unnamed, f"config keys no document names: {unnamed}"


def _station_tables() -> dict[str, str]:
    """Every table the station creates in its own files (the outbox file, the review gallery, the
    typed cells), each with its CREATE statement's text: the modules under service/station and
    service/mqtt (the archive's index is docs/ARCHIVE.md's)."""
    tables: dict[str, str] = {}
    for folder in ("station", "mqtt"):
        for path in sorted((ROOT / "service" / folder).glob("*.py")):
            text = path.read_text(encoding="utf-8")
            for m in re.finditer(r"CREATE TABLE IF NOT EXISTS ([a-z_]+) \(([^;]*?)\)(?:\"|;|\n\s*\))", text):
                tables[m.group(1)] = m.group(2)
    return tables


def test_every_table_the_station_writes_is_in_its_data_list_and_its_removal():
    """docs/STATION.md section 7 lists what the station keeps on disk and how to remove a specimen:
    a table the station writes that the list leaves out is patient data a lab does not know it
    keeps, and one with a run's id that the removal's SQL leaves out keeps the specimen after it."""
    station = _text("docs/STATION.md")
    section = station[station.index("## 7. Patient data"):station.index("## 8. ")]
    listed = section[section.index("**On the station's disk**"):section.index("**Removing one specimen.**")]
    removal = section[section.index("**Removing one specimen.**"):]
    tables = _station_tables()
    assert {"outbox", "specimen_fields", "crops", "typed_white_cells"} <= set(tables)  # a broken search finds none
    unlisted = sorted(t for t in tables if f"`{t}`" not in listed)
    assert not unlisted, f"docs/STATION.md's table of what the station keeps lacks {unlisted}"
    kept = sorted(t for t, columns in tables.items() if re.search(r"\brun_id\b", columns)
                  and not re.search(rf"(DELETE FROM {t} WHERE|UPDATE {t} SET) [^;]*\brun_id\b", removal))
    assert not kept, f"docs/STATION.md's removal of a specimen leaves its rows in {kept}"


def test_every_code_a_command_answers_is_in_the_mqtt_document():
    """docs/MQTT.md is the contract of the command topics: every code an answer's `error` carries,
    the transport's and each command's (service/station, service/mqtt), is named there, with
    what it means or where it is said (docs/STATION.md's commands)."""
    import ast

    codes: set[str] = set()
    for folder in ("station", "mqtt"):
        for path in sorted((ROOT / "service" / folder).glob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            for node in ast.walk(tree):
                if isinstance(node, ast.FunctionDef):
                    codes |= _answered_codes(node)
    assert {"not_json", "busy", "run_open", "verification_not_kept"} <= codes  # a broken search finds few
    mqtt = _text("docs/MQTT.md")
    missing = sorted(code for code in codes if f"`{code}`" not in mqtt)
    assert not missing, f"docs/MQTT.md does not name the answer codes {missing}"


def test_every_key_archive_find_json_prints_is_in_the_archive_document():
    """`smearscope archive find --json` is read by a lab's scripts: every key of a report's object,
    of its copies' and of its HL7 deliveries' is named in docs/ARCHIVE.md."""
    from smearscope.service.archive.copies import ArchivedCopy
    from smearscope.service.archive.query import ArchivedReport, RecordedDelivery

    delivery = RecordedDelivery("mllp:lis:2575", 1764494047.0, "archive", "D430498A2E105839CDAF", "T")
    copy = ArchivedCopy(1, Path("r+0123456789abcdef.json"), "0123456789abcdef", 812, 1764494047.0)
    report = ArchivedReport("r", "lab-7", "run", "H-1", 1764494047.0, "specimen", "1.2", True, None, None,
                            Path("r.json"), None, (copy,), None, (delivery,))
    keys = set(report.as_json()) | set(copy.as_json()) | set(delivery.as_json())
    assert {"hl7_deliveries", "control_id", "digest"} <= keys
    archive = _text("docs/ARCHIVE.md")
    missing = sorted(k for k in keys if f"`{k}`" not in archive and f'"{k}"' not in archive)
    assert not missing, f"docs/ARCHIVE.md does not name the archive find --json keys {missing}"


def test_the_run_state_example_has_the_keys_the_station_sends():
    """docs/MQTT.md's retained `run` message example is what a dashboard or LIS is written against:
    its keys, and its `progress` keys, are the ones the station's run state carries."""
    from types import SimpleNamespace

    from smearscope.service.station.clinic import ClinicFeed
    from smearscope.service.station.run_records import RunProgress

    progress = RunProgress("r", "command", 1764660790.1, 3, 57, 100, "H-1", 12).as_dict()
    state = ClinicFeed.run_state(SimpleNamespace(gallery=None, station_id="lab-7"),  # type: ignore[arg-type]
                                 "r", None, "open", progress, None)
    blocks = [json.loads(b) for b in re.findall(r"```json\n(.*?)```", _text("docs/MQTT.md"), re.DOTALL)
              if '"progress"' in b and '"rbc_grades"' in b]
    assert len(blocks) == 1, "docs/MQTT.md: one example of the run state"
    assert set(blocks[0]) == set(state), "docs/MQTT.md's run state example vs the station's keys"
    assert set(blocks[0]["progress"]) == set(progress), "docs/MQTT.md's run state progress vs RunProgress"


def test_the_file_layout_versions_the_documents_state_are_the_codes():
    """What an update or a going back does turns on the layout versions: docs/ARCHIVE.md states the
    archive index's (`PRAGMA user_version`), docs/STATION.md the outbox file's."""
    from smearscope.service.archive.store import INDEX_VERSION
    from smearscope.service.mqtt.outbox_schema import SCHEMA_VERSION

    archive, station = _text("docs/ARCHIVE.md"), _text("docs/STATION.md")
    assert f"(this smearscope: version {INDEX_VERSION})" in archive, "docs/ARCHIVE.md: the index's version"
    assert f"newer than this smearscope's (version {INDEX_VERSION})" in archive, "docs/ARCHIVE.md: the refusal"
    assert f"above this version's {SCHEMA_VERSION})" in station, "docs/STATION.md: the outbox file's schema"


def test_the_rename_steps_and_the_account_list_name_every_line_of_the_example_acls_station_block():
    """docs/STATION.md "Renaming or retiring a station" has the owner add the new id's lines to the
    station's ACL block: it named three of them (write, cmd, telemetry) after the block had grown
    to eight (status, run, field, report, cells read too), so a renamed station lost what those
    reads are for. Each line of config/mosquitto.acl.example's station block, the new id in place."""
    acl = _text("config/mosquitto.acl.example")
    block = acl.partition("user station-lab-7\n")[2].partition("\n\n")[0].splitlines()
    assert len(block) >= 8 and all(line.startswith("topic ") for line in block), block
    steps = _text("docs/STATION.md").partition("### Renaming or retiring a station")[2].partition("\n### ")[0]
    missing = [line for line in block if f"`{line.replace('lab-7', 'NEW-ID')}`" not in steps]
    assert not missing, f"the rename steps do not name {missing}"
    # docs/MQTT.md's account list says what each read is for: it left out the status topic
    accounts = _text("docs/MQTT.md").partition("`config/mosquitto.acl.example` is one")[2].partition("technicians'")[0]
    leaves = [line.rpartition("smearscope/lab-7/")[2] for line in block if line.startswith("topic read ")]
    unsaid = [leaf for leaf in leaves if f"`{leaf}`" not in accounts and f"`smearscope/lab-7/{leaf}`" not in accounts]
    assert not unsaid, f"docs/MQTT.md's station account does not name {unsaid}"
