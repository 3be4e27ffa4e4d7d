"""The training documents against the training code: every `python -m training.X ...` line the
model card, training/README.md, the README and docs/RESULTS.md show names a module that exists,
and parses with that module's own argument parser (a line with a placeholder such as `<run>` or
an [optional] part: its options exist; a command quoted in prose may leave out required parts). Doc rot in the commands that made the committed models is
a defect: someone reproducing a figure runs these lines as written.

Modules that import torch at the top (the train extra) are checked where it is installed
(`.venv-train`); the others with the runtime dependencies."""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
import importlib.metadata
import io
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "docs/RESULTS.md", "models/README.md", "training/README.md")
MODULES = {p.stem for p in (ROOT / "training").glob("*.py")}
COMMAND = re.compile(r"(?:-m\s+|(?<![\w./-]))training\.([a-z][a-z0-9_]*)\b(?!\.)((?:[ \t]+[^\s;&|]+)*)")
BARE = re.compile(r"^([a-z][a-z0-9_]*)((?:[ \t]+--[^\s;&|]*(?:[ \t]+[^\s;&|]+)*))")  # `train_rbc --lr 2e-3 ...`
NOTATION = re.compile(r"[\[\]<>|{}]|\.\.\.|…|(?<![\w$])[A-Z][A-Z0-9_]*\b")  # LAB, FILE: placeholders
OPTION = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


class _Parser(Exception):
    """Raised by the patched parse_args to hand back the module's parser instead of running it."""

    def __init__(self, parser: argparse.ArgumentParser) -> None:
        super().__init__(parser.prog)
        self.parser = parser


def _documented_commands() -> list[tuple[str, str, str, bool]]:
    """(document, module, arguments, complete) for every training command line: the documents'
    code blocks (a line continued with a backslash joined; commands split at ; && and a trailing
    &) and inline code. `complete` lines are whole command lines, to be parsed as they stand."""
    found = []
    for name in DOCS:
        text = (ROOT / name).read_text(encoding="utf-8")
        blocks = re.findall(r"```[a-z]*\n(.*?)```", text, re.DOTALL)
        prose = re.sub(r"```[a-z]*\n.*?```", "", text, flags=re.DOTALL)
        lines = [(re.sub(r"(^|\s)#.*", "", line), True)
                 for block in blocks for line in re.sub(r"\\\n\s*", " ", block).splitlines()]
        lines += [(" ".join(span.split()), False) for span in re.findall(r"`([^`]+)`", prose)]
        for line, in_block in lines:
            matches = list(COMMAND.finditer(line))
            bare = None if in_block or matches else BARE.match(line)
            if bare is not None and bare.group(1) in MODULES:
                matches = [bare]
            for m in matches:
                args = m.group(2).strip()
                found.append((name, m.group(1), args, in_block and not NOTATION.search(args)))
    return found


COMMANDS = _documented_commands()


def _parser(module: str) -> argparse.ArgumentParser | None:
    """The module's parser, as its `main` builds it (main stops at parse_args); None for a
    module without a command line (training.labs, training.look: named in prose)."""
    try:
        mod = importlib.import_module(f"training.{module}")
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] in {"torch", "timm", "ultralytics"}:
            pytest.skip(f"training.{module} needs the train extra ({exc.name})")
        raise
    if not hasattr(mod, "main"):
        return None
    original = argparse.ArgumentParser.parse_args

    def hand_back(self: argparse.ArgumentParser, *args: object, **kwargs: object) -> None:
        raise _Parser(self)

    argparse.ArgumentParser.parse_args = hand_back  # type: ignore[method-assign]
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            mod.main()
    except _Parser as got:
        return got.parser
    finally:
        argparse.ArgumentParser.parse_args = original  # type: ignore[method-assign]
    raise AssertionError(f"training.{module}.main() never parsed its arguments")


def test_the_documents_show_training_commands():
    """A broken search would check nothing."""
    assert len(COMMANDS) >= 100
    assert sum(complete for *_, complete in COMMANDS) >= 60
    assert {"train_seg", "train_wbc", "train_rbc", "export_seg", "export_head", "evaluate", "lab_table",
            "calibrate_head", "calibrate_seg", "remeasure_heads", "openset_compare"} <= {m for _, m, _, _ in COMMANDS}


def test_every_documented_training_module_exists():
    missing = sorted({f"{doc}: training.{mod}" for doc, mod, _, _ in COMMANDS if mod not in MODULES})
    assert not missing, f"documented training modules that do not exist: {missing}"


@pytest.mark.parametrize("module", sorted({m for _, m, _, _ in COMMANDS if m in MODULES}))
def test_every_documented_training_command_parses(module):
    parser = _parser(module)
    if parser is None:
        given = sorted({f"{doc}: {args}" for doc, m, args, _ in COMMANDS if m == module and args})
        assert not given, f"training.{module} has no command line, but the documents give it arguments: {given}"
        return
    known = {s for a in parser._actions for s in a.option_strings}
    for doc, _, args, complete in (c for c in COMMANDS if c[1] == module):
        unknown = sorted(set(OPTION.findall(args)) - known)
        assert not unknown, f"{doc}: python -m training.{module} {args}: {unknown} are not its options"
        if NOTATION.search(args):
            continue
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                parser.parse_args(shlex.split(args))
        except SystemExit:
            message = err.getvalue().strip().splitlines()[-1]
            if complete or "the following arguments are required" not in message:  # prose may name a part
                pytest.fail(f"{doc}: python -m training.{module} {args}: {message}")


def test_training_readme_names_every_training_module():
    """training/README.md's "What is here" table: a module that made a committed model (train_wbc,
    export_head, prep_labs...) is found there, not only in the commands."""
    table = (ROOT / "training/README.md").read_text(encoding="utf-8").split("## What is here", 1)[1]
    named = set(re.findall(r"`(\w+)\.(?:py|sh)`", table))
    missing = sorted(MODULES - {"__init__"} - named)
    assert not missing, f"training/README.md 'What is here' lacks {missing}"


VENV_RUN = re.compile(r"\.venv/bin/python -m training\.([a-z][a-z0-9_]*)")


def _imported_names(module: str, seen: set[str]) -> set[str]:
    """Top-level names `training.<module>` imports (at the top or inside a function), following
    its imports of other training modules."""
    seen.add(module)
    names: set[str] = set()
    for node in ast.walk(ast.parse((ROOT / "training" / f"{module}.py").read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            dotted = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            dotted = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for name in dotted:
            parts = name.split(".")
            names.add(parts[0])
            if parts[0] == "training" and len(parts) > 1 and parts[1] in MODULES and parts[1] not in seen:
                names |= _imported_names(parts[1], seen)
    return names


def _distribution(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].lower().replace("_", "-").replace(".", "-")


def test_modules_the_documents_run_with_the_runtime_venv_import_only_what_it_declares():
    """A line `.venv/bin/python -m training.X` promises that the environment `make venv` builds
    (the runtime dependencies and the `test` extra) runs X. Every library X imports, through the
    training modules it imports, must be named there: one that is only there because another
    package pulls it in (scipy, through spams-bin) is gone on the next release of that package."""
    documented = set()
    for name in DOCS:
        documented |= set(VENV_RUN.findall((ROOT / name).read_text(encoding="utf-8")))
    assert {"evaluate", "lab_table", "plausibility"} <= documented
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    declared = {_distribution(r) for r in project["dependencies"] + project["optional-dependencies"]["test"]}
    providers = importlib.metadata.packages_distributions()
    undeclared = {}
    for module in sorted(documented & MODULES):
        for name in sorted(_imported_names(module, set()) - set(sys.stdlib_module_names) - {"training", "smearscope"}):
            if not {_distribution(d) for d in providers.get(name, [])} & declared:
                undeclared.setdefault(f"training.{module}", []).append(name)
    assert not undeclared, f"imports that neither the runtime dependencies nor the test extra declare: {undeclared}"


@pytest.mark.parametrize("command", [["lab_table", "--split", "test", "--scale", "given", "--limit", "1"],
                                     ["evaluate", "--heads-only"], ["plausibility", "--looks", "1"]])
def test_a_measurement_without_the_datasets_says_where_it_looked_and_what_to_set(command, tmp_path):
    """A clone with no ../shared beside it is the first thing a new machine meets: the command
    exits at once naming the folder and SMEARSCOPE_DATA, not with a traceback from deep inside a
    dataset adapter."""
    absent = tmp_path / "datasets"
    proc = subprocess.run([sys.executable, "-m", f"training.{command[0]}", *command[1:]], cwd=ROOT,
                          env={**os.environ, "SMEARSCOPE_DATA": str(absent)}, capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"no datasets at {absent}" in proc.stderr and "SMEARSCOPE_DATA" in proc.stderr


def test_the_held_out_sections_say_where_their_runs_would_be_when_none_were_trained(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    """A fresh clone has no leave-one-lab-out runs: training.evaluate says so and names the command
    that trains them, instead of leaving the sections out without a word."""
    evaluate = importlib.import_module("training.evaluate")
    assert evaluate.detector_held_out_section(tmp_path / "lolo") == []
    assert evaluate.held_out_runs_section(tmp_path / "wbc") == {}
    out = capsys.readouterr().out
    assert f"none in {tmp_path / 'lolo'}" in out and "python -m training.lolo_seg" in out, out
    assert f"none in {tmp_path / 'wbc'}" in out and "python -m training.train_wbc --exclude-lab" in out, out
