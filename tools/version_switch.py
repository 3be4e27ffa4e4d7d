"""Check a station's update from an earlier release, and going back, on the same state directory.

    PYTHONPATH=. .venv/bin/python -m tools.version_switch --from COMMIT [--to HEAD] [--both-ways] [--out DIR]

Each commit is checked out in a `git worktree` and given the package layout the editable install
makes (pyproject.toml's package-dir: `smearscope.service` -> service/, ...) as a folder of
symlinks put first on PYTHONPATH; both run with this checkout's .venv. A real mosquitto (the
tests' MosquittoBroker) and a station of the first version watch a folder of rendered fields
(`render_field` PNGs) under one config both versions accept. The scenario, over MQTT: a run
started (`start_run`, with a `specimen_id` where the version takes one) and stopped after 2
fields with 3 of its crops typed (`get_review`, `type_cells`); a second run started and left
open, one field sent, the broker stopped, 2 more fields stored in the outbox (the backlog), the
station SIGKILLed once the last file is done. Then the other version starts on the same state,
config and folder, the broker comes back, and the claims of docs/STATION.md ("Updating a
station, and going back") are checked: the backlog sent once (no `message_id` twice), the open
run taken back (with its specimen id) or closed with a reason, the closed run listed (`get_runs`)
and signed (`verify_run`) with its 3 typed cells, the typed cells kept (`get_review`), and every
file analysed once. Exit 0 when all hold, 1 naming those that do not.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
STATION = "switch-1"
BASE = f"smearscope/{STATION}"
PASSWORD = "station-secret"
UM_PER_PX = 0.2
#: Seeds of the rendered fields: 2 for the closed run, 1 for the open run with the broker up,
#: 2 for the backlog (broker down), 1 after the switch (does the open run go on?).
SEEDS = (11, 12, 13, 14, 15, 16)


def package_layout(worktree: Path, dest: Path) -> Path:
    """`dest`/smearscope as the editable install maps names, in symlinks into `worktree`: the
    entries of its smearscope/ folder and each `smearscope.<name>` of pyproject.toml's
    package-dir. Put `dest` first on PYTHONPATH (the editable finder comes after it)."""
    pyproject = tomllib.loads((worktree / "pyproject.toml").read_text())
    mapped = pyproject.get("tool", {}).get("setuptools", {}).get("package-dir", {})
    package = dest / "smearscope"
    package.mkdir(parents=True)
    for entry in sorted((worktree / "smearscope").iterdir()):
        if entry.name != "__pycache__":
            (package / entry.name).symlink_to(entry)
    for name, folder in sorted(mapped.items()):
        parts = name.split(".")
        if len(parts) == 2 and parts[0] == "smearscope":
            link = package / parts[1]
            if link.is_symlink():
                link.unlink()
            link.symlink_to(worktree / folder, target_is_directory=True)
    return dest


def _broker_module() -> Any:
    """tests/broker.py (tests/ is no package: loaded by its path)."""
    spec = importlib.util.spec_from_file_location("smearscope_test_broker", ROOT / "tests" / "broker.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@dataclass(frozen=True)
class Version:
    label: str  # what the user named (e.g. 66134f6, HEAD)
    commit: str
    worktree: Path
    layout: Path


def make_version(label: str, out: Path) -> Version:
    commit = subprocess.run(["git", "rev-parse", "--verify", f"{label}^{{commit}}"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout.strip()
    worktree = out / f"tree-{commit[:10]}"
    if not worktree.exists():
        subprocess.run(["git", "worktree", "add", "--detach", str(worktree), commit], cwd=ROOT, check=True,
                       capture_output=True)
    layout = out / f"layout-{commit[:10]}"
    if not layout.exists():
        package_layout(worktree, layout)
    # the station must import this commit's code, not this checkout's (the editable install's)
    probe = "import smearscope.service.station.daemon as d; print(d.__file__)"
    where = subprocess.run([sys.executable, "-c", probe], env={**os.environ, "PYTHONPATH": str(layout)},
                           cwd=out, check=True, capture_output=True, text=True).stdout.strip()
    if not Path(where).resolve().is_relative_to(worktree.resolve()):
        raise RuntimeError(f"{label}: smearscope imports from {where}, not from its worktree {worktree}")
    return Version(label, commit, worktree, layout)


def remove_version(version: Version) -> None:
    subprocess.run(["git", "worktree", "remove", "--force", str(version.worktree)], cwd=ROOT, check=False,
                   capture_output=True)
    shutil.rmtree(version.layout, ignore_errors=True)


def write_config(work: Path, port: int) -> Path:
    """A station TOML both versions accept: a watched folder, review with typing, runs that end
    only by command (an idle timeout of an hour)."""
    config = work / "station.toml"
    config.write_text(f"""station_id = "{STATION}"

[source]
kind = "folder"
path = "{work / 'inbox'}"
settle_s = 0.2
microns_per_pixel = {UM_PER_PX}

[specimen]
target_wbc_count = 1000
idle_timeout_s = 3600.0

[analysis]
models_dir = "{work / 'models'}"

[review]
enabled = true
white_cells = "all"
min_free_disk_mb = 0

[mqtt]
host = "127.0.0.1"
port = {port}
keepalive = 5
reconnect_min_delay_s = 1
reconnect_max_delay_s = 1
username = "station"
password_credential = "mqtt-password"

[mqtt.outbox]
path = "{work / 'state' / 'outbox.sqlite3'}"
""")
    return config


class Station:
    """`smearscope run` of one version, its log in `work`/station-<label>.log."""

    def __init__(self, version: Version, work: Path, config: Path) -> None:
        models = work / "models"  # what install-models puts where analysis.models_dir points
        if models.is_symlink():
            models.unlink()
        models.symlink_to(version.worktree / "models", target_is_directory=True)
        env = {**os.environ, "PYTHONPATH": str(version.layout), "CREDENTIALS_DIRECTORY": str(work / "credentials")}
        self.log_path = work / f"station-{version.label}-{version.commit[:7]}.log"
        self.version = version
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "smearscope", "run", "--config", str(config)],
                                         env=env, cwd=work, stdout=log, stderr=subprocess.STDOUT)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.kill()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


class Scenario:
    """One switch, `first` -> `second`, in its own folder."""

    def __init__(self, first: Version, second: Version, work: Path, broker_module: Any) -> None:
        self.first, self.second, self.work, self.bm = first, second, work, broker_module
        (work / "inbox").mkdir(parents=True)
        (work / "credentials").mkdir()
        (work / "credentials" / "mqtt-password").write_text(PASSWORD)
        self.broker = broker_module.MosquittoBroker(
            work / "broker", {"station": PASSWORD, "observer": "observer-secret"}, persistence=True)
        self.config = write_config(work, self.broker.port)
        self.observer: Any = None
        self.station: Station | None = None
        self.results: list[tuple[str, bool, str]] = []
        self.types: dict[str, list[str]] = {}  # get_review's wbc_types and rbc_types

    # ---------------------------------------------------------------- MQTT helpers

    def live(self, topic: str) -> list[Any]:
        """Messages on `BASE/topic` as published (not the broker's retained copies at subscribe)."""
        return [m for m in self.observer.on_topic(f"{BASE}/{topic}") if not m.retain]

    def bodies(self, topic: str) -> list[dict[str, Any]]:
        return [json.loads(m.payload) for m in self.live(topic)]

    def wait(self, what: str, predicate: Callable[[], bool], timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if self.station is not None and self.station.proc.poll() is not None:
                lines = self.station.log().splitlines()
                last = max((i for i, ln in enumerate(lines) if "Error:" in ln or " ERROR " in ln), default=len(lines))
                said = " ".join(ln.strip() for ln in lines[last:last + 3])[:300]
                raise RuntimeError(f"{self.station.version.label} exited ({self.station.proc.returncode}) while "
                                   f"waiting for {what}: {said}\nlog {self.station.log_path}:\n"
                                   + "\n".join(lines[-40:]))
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {what} after {timeout:.0f} s")
            time.sleep(0.1)

    def command(self, name: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        topic = f"cmd_response/{name}"
        before = len(self.live(topic))
        self.observer.client.publish(f"{BASE}/cmd/{name}", json.dumps(body or {}), qos=1)
        self.wait(f"answer to {name}", lambda: len(self.live(topic)) > before, 60)
        answer: dict[str, Any] = json.loads(self.live(topic)[-1].payload)
        logger.info("%s %s -> %s", name, body or {}, {k: answer.get(k) for k in ("ok", "error", "run_id", "message")})
        return answer

    def fields_of(self, run_id: str) -> list[dict[str, Any]]:
        return [e["body"] for e in self.bodies("field") if e["body"].get("run_id") == run_id]

    def drop(self, seed: int) -> str:
        from smearscope.device.synthetic import render_field

        name = f"field-{seed}.png"
        pixels = render_field(seed, width=480, height=360, microns_per_pixel=UM_PER_PX, n_wbc=4).frame.pixels
        tmp = self.work / f".{name}"
        cv2.imwrite(str(tmp), pixels)
        tmp.rename(self.work / "inbox" / name)
        return name

    def done(self, name: str) -> bool:
        return (self.work / "inbox" / "done" / name).exists()

    def start_station(self, version: Version) -> None:
        self.station = Station(version, self.work, self.config)

    def wait_online(self, since: int) -> None:
        self.wait("'online' status", lambda: any(
            m.payload == b"online" for m in self.observer.on_topic(f"{BASE}/status")[since:]), 180)

    def start_run(self, specimen_id: str) -> tuple[str, str | None]:
        """A run for `specimen_id`, or without one where the version refuses it; with the specimen
        id the answer names (a version that ignored the argument names none)."""
        answer = self.command("start_run", {"specimen_id": specimen_id})
        if not answer.get("ok") and "specimen_id" in answer.get("message", ""):
            answer = self.command("start_run")
        if not answer.get("ok"):
            raise RuntimeError(f"start_run refused: {answer}")
        return answer["run_id"], answer.get("specimen_id")

    def review_cells(self, run_id: str) -> list[dict[str, Any]]:
        cells, offset = [], 0
        while offset is not None:
            page = self.command("get_review", {"run_id": run_id, "offset": offset})
            if not page.get("ok"):
                return []
            cells += page["cells"]
            if offset == 0:
                self.types = {"wbc": page.get("wbc_types") or [], "rbc": page.get("rbc_types") or []}
            offset = page.get("next_offset")
        return cells

    # ---------------------------------------------------------------- the scenario

    def run(self) -> list[tuple[str, bool, str]]:
        broker = self.broker
        broker.start()
        self.observer = self.bm.Subscriber(broker.port, "observer", "observer-secret", [f"{BASE}/#"],
                                           client_id="version-switch-observer", persistent=True)
        self.observer.wait_ready()
        # --- the first version: a closed run with 3 typed cells, an open run, a backlog
        self.start_station(self.first)
        self.wait_online(0)
        closed, closed_specimen = self.start_run("VS-CLOSED")
        names = [self.drop(seed) for seed in SEEDS[:2]]
        self.wait("the closed run's 2 fields", lambda: len(self.fields_of(closed)) == 2)
        typeable = [c for c in self.review_cells(closed) if c.get("typeable")][:3]
        if len(typeable) < 3:
            raise RuntimeError(f"only {len(typeable)} typeable crops in the closed run")
        chosen = [{"field_id": c["field_id"], "cell": c["cell"],
                   "type": (c.get("types") or self.types["wbc" if c["kind"] == "wbc" else "rbc"])[0]}
                  for c in typeable]
        typed = self.command("type_cells", {"run_id": closed, "cells": chosen})
        if not typed.get("ok") or typed.get("stored") != 3:
            raise RuntimeError(f"type_cells: {typed}")
        stopped = self.command("stop_run")
        self.wait("the closed run's report", lambda: any(
            e["body"].get("report_id") == stopped["report_id"] for e in self.bodies("report")))
        left_open, open_specimen = self.start_run("VS-OPEN")
        names.append(self.drop(SEEDS[2]))
        self.wait("the open run's first field", lambda: len(self.fields_of(left_open)) == 1)
        broker.stop()
        names += [self.drop(seed) for seed in SEEDS[3:5]]
        self.wait("the backlog's files done", lambda: all(self.done(n) for n in names))
        time.sleep(1.0)  # the run state after the last field
        assert self.station is not None
        self.station.kill()
        backlog = self.outbox_ids()
        logger.info("%s SIGKILLed; backlog of %d messages", self.first.label, len(backlog))
        # --- the second version on the same state
        self.start_station(self.second)
        since = len(self.observer.on_topic(f"{BASE}/status"))
        broker.start()
        self.wait_online(since)
        self.wait("the backlog sent", lambda: backlog <= {
            m.user_properties.get("message_id") for m in self.observer.messages if not m.retain}, 120)
        names.append(self.drop(SEEDS[5]))
        self.wait("the last file's field", lambda: any(file_of(e["body"]) == names[-1] for e in self.bodies("field")))
        open_states = [b for b in self.bodies("run") if b.get("run_id") == left_open]
        after = next(e["body"].get("run_id") for e in self.bodies("field") if file_of(e["body"]) == names[-1])
        took_back = after == left_open
        end = self.command("stop_run") if took_back else {}
        if took_back:
            self.wait("the open run's report", lambda: any(
                e["body"].get("report_id") == end.get("report_id") for e in self.bodies("report")), 60)
        runs = self.command("get_runs").get("runs", [])
        verified = self.command("verify_run", {"run_id": closed, "verified_by": "VS"})
        kept = [c for c in self.review_cells(closed) if c.get("typed")]
        self.station.stop()
        received = Counter(m.user_properties.get("message_id") for m in self.observer.messages if not m.retain)
        self.check_backlog(backlog, received)
        self.check_open_run(left_open, open_specimen, after, open_states, end)
        self.check_closed_run(closed, closed_specimen, runs, verified, kept)
        self.check_files(names)
        return self.results

    def outbox_ids(self) -> set[str]:
        return outbox_message_ids(self.work / "state" / "outbox.sqlite3")

    # ---------------------------------------------------------------- the claims

    def claim(self, name: str, holds: bool, detail: str) -> None:
        self.results.append((name, holds, detail))

    def check_backlog(self, backlog: set[str], received: Counter[str | None]) -> None:
        twice = sorted(mid for mid, n in received.items() if mid is not None and n > 1)
        missing = sorted(backlog - set(received))
        self.claim("backlog sent once", bool(backlog) and not twice and not missing,
                   f"{len(backlog)} messages in the outbox at the kill, {len(backlog) - len(missing)} received; "
                   f"{sum(received.values())} messages in all, message_id twice: {len(twice)}")

    def check_open_run(self, run_id: str, specimen: str | None, after: str | None,
                       states: list[dict[str, Any]], end: dict[str, Any]) -> None:
        """`after`: the run the field dropped after the switch joined."""
        closed = [s for s in states if s.get("state") == "closed"]
        if after == run_id:
            report = next(e["body"] for e in self.bodies("report") if e["body"].get("report_id") == end.get("report_id"))
            fields = report.get("fields_analyzed")
            kept = report.get("specimen_id")
            self.claim("open run taken back", fields == 4,  # 1 field sent, 2 in the backlog, 1 after the switch
                       f"the field after the switch joined it; stop_run: {fields} fields, schema "
                       f"{report.get('schema_version')}")
            self.claim("open run keeps its specimen id", kept == specimen,
                       f"started with {specimen!r}, its report names {kept!r}" if specimen is not None else
                       f"{self.first.label} takes no specimen_id; its report names {kept!r}")
        elif closed:
            self.claim("open run closed with a reason", bool(closed[-1].get("end_reason")) and after is not None,
                       f"end reason {closed[-1].get('end_reason')!r}; the field after the switch began run {after}")
        else:
            self.claim("open run taken back or closed", False, "neither: the field after the switch began a "
                       "new run and no closed state of the open run was sent")

    def check_closed_run(self, run_id: str, specimen: str | None, runs: list[dict[str, Any]],
                         verified: dict[str, Any], kept: list[dict[str, Any]]) -> None:
        listed = [r for r in runs if r.get("run_id") == run_id]
        listed_specimen = listed[0].get("progress", {}).get("specimen_id") if listed else None
        why = ""
        if not listed and self.station is not None:  # what the second version said of it at its start
            said = [ln for ln in self.station.log().splitlines() if run_id in ln and " ERROR " in ln]
            why = f" ({said[0].split(': ', 1)[-1][:150]} ...)" if said else ""
        self.claim("closed run listed", bool(listed) and listed_specimen == specimen,
                   f"get_runs lists {len(runs)} runs; the closed run {'among them' if listed else 'not among them'}"
                   + (f", specimen {listed_specimen!r}" if listed else why))
        self.claim("closed run signed with its 3 typed cells",
                   bool(verified.get("ok")) and verified.get("typed_cells") == 3,
                   f"verify_run: {verified.get('error') or 'ok'}, typed_cells {verified.get('typed_cells')}")
        self.claim("typed cells kept", len(kept) == 3, f"get_review of the closed run: {len(kept)} cells typed")

    def check_files(self, names: list[str]) -> None:
        per_file = Counter(file_of(e["body"]) for e in self.bodies("field"))
        inbox = self.work / "inbox"
        done = sorted(p.name for p in (inbox / "done").iterdir())
        rejected = sorted(p.name for p in (inbox / "rejected").iterdir()) if (inbox / "rejected").exists() else []
        once = all(per_file[n] == 1 for n in names) and sum(per_file.values()) == len(names)
        self.claim("every file analysed once", once and done == sorted(names) and not rejected,
                   f"{len(names)} files, field reports per file {sorted(set(per_file.values()))}, "
                   f"{len(done)} in done/, {len(rejected)} rejected")

    def close(self) -> None:
        if self.station is not None:
            self.station.kill()
        if self.observer is not None:
            self.observer.close()
        self.broker.stop()


def outbox_message_ids(outbox: Path) -> set[str]:
    """The message ids in a killed station's outbox, read from a copy of the file and its WAL: a
    connection to the file itself would take the WAL in and delete it on closing (the last
    connection), so the next version would start on a clean file, not on what the SIGKILL left."""
    with tempfile.TemporaryDirectory(prefix="outbox-copy-") as folder:
        for suffix in ("", "-wal"):
            if (source := outbox.with_name(outbox.name + suffix)).exists():
                shutil.copyfile(source, Path(folder) / (outbox.name + suffix))
        conn = sqlite3.connect(Path(folder) / outbox.name)
        try:
            return {row[0] for row in conn.execute("SELECT message_id FROM outbox")}
        finally:
            conn.close()


def file_of(field_report: dict[str, Any]) -> str:
    """The file name in a field report's frame id (`scope:field-11.png@3403d8c0244e`)."""
    return str(field_report["source"]["frame_id"]).split(":", 1)[1].rsplit("@", 1)[0]


def switch(first: Version, second: Version, work: Path, broker_module: Any) -> list[tuple[str, bool, str]]:
    scenario = Scenario(first, second, work, broker_module)
    try:
        return scenario.run()
    except (RuntimeError, TimeoutError) as exc:
        logger.error("%s -> %s: the scenario did not run through: %s", first.label, second.label, exc)
        return [("scenario ran through", False, str(exc).splitlines()[0])]
    finally:
        scenario.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--from", dest="source", required=True, help="the earlier commit (e.g. 66134f6)")
    parser.add_argument("--to", dest="target", default="HEAD", help="the later commit (default HEAD: what is committed, not the working tree)")
    parser.add_argument("--both-ways", action="store_true", help="also go back: the later version first")
    parser.add_argument("--out", type=Path, default=None, help="keep the state, configs and logs here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    out = args.out.resolve() if args.out else Path(tempfile.mkdtemp(prefix="version-switch-"))
    out.mkdir(parents=True, exist_ok=True)
    broker_module = _broker_module()
    versions: list[Version] = []
    failed: list[str] = []
    try:
        versions = [make_version(args.source, out), make_version(args.target, out)]
        ways = [(versions[0], versions[1])] + ([(versions[1], versions[0])] if args.both_ways else [])
        for first, second in ways:
            name = f"{first.label} -> {second.label}"
            work = out / f"{first.commit[:7]}-to-{second.commit[:7]}"
            if work.exists():
                shutil.rmtree(work)
            results = switch(first, second, work, broker_module)
            kept = f"state, logs: {work}" if args.out else "--out keeps state and logs"
            print(f"\n{name} ({first.commit[:7]} -> {second.commit[:7]}; {kept})")
            failed += said_claims(name, results)
    finally:
        clean_up(versions, out, keep=args.out is not None)
    return verdict(failed)


def said_claims(name: str, results) -> list[str]:
    """Print each claim of switch `name` as it held or not; the ones that did not hold."""
    failed = []
    for claim, holds, detail in results:
        print(f"  {'ok  ' if holds else 'FAIL'} {claim}: {detail}")
        if not holds:
            failed.append(f"{name}: {claim}")
    return failed


def clean_up(versions, out: Path, keep: bool) -> None:
    """Remove the versions' worktrees (and `out`, unless kept)."""
    for version in versions:
        remove_version(version)
    subprocess.run(["git", "worktree", "prune"], cwd=ROOT, check=False)
    if not keep:
        shutil.rmtree(out, ignore_errors=True)


def verdict(failed: list[str]) -> int:
    """The exit status: 1 when a claim did not hold (said again at the end), else 0."""
    if failed:
        print("\nnot holding:\n" + "\n".join(f"  {f}" for f in failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
