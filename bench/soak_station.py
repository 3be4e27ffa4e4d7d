"""Soak: a real station process over hundreds of fields, its resources sampled as it goes.

    nice -n 10 .venv/bin/python -m bench.soak_station [--fields 600] [--fps 1] [--every 25] [--broker-cycle 100]
        [--offline 15] [--run-cycle 40] [--out bench/results/soak_station-....txt]

`smearscope run --config station.toml` as docs/STATION.md starts it (a child process, its log on
stdout as journald would take it), the simulated source (640x480 fields, `fps = 1` or `--fps`), the committed
models, the review gallery on, a real mosquitto on a free loopback port. Every `--broker-cycle`
fields the broker is SIGKILLed and started again `--offline` fields later (the fields meanwhile go
to the outbox and are sent after it); every `--run-cycle` fields the run is ended and a new one
started by the station's commands (`stop_run`, `start_run` with a specimen id; `auto_start = false`,
so the few fields between the two are analysed outside a run). Every `--every`
stored fields it prints the station's VmRSS (/proc/PID/status), open descriptors (/proc/PID/fd),
threads, the outbox file and its WAL, the state folder (outbox, review gallery), and the log lines per field since the last sample. At the
end a verdict per resource: the least-squares slope over the last half of the samples (the warm-up
before it left out), per 100 fields, against a stated bound. Not a test: it takes minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from bench.bench_pipeline import machine

REPO = Path(__file__).resolve().parents[1]
STATION = "soak"
_STORED_FIELD = re.compile(r"stored field message report_id=")

#: Growth allowed per 100 fields over the last half, after warm-up: (unit, bound).
BOUNDS = {
    "rss_mib": ("MiB", 5.0),
    "fds": ("descriptors", 0.5),
    "threads": ("threads", 0.5),
    "outbox_mib": ("MiB (file + WAL)", 1.0),
    "state_mib": ("MiB (state folder)", 2.0),
    "log_lines_per_field": ("lines/field", 0.05),
}
#: Journal lines per field at INFO allowed on average over the last half (the stored field's line,
#: a run's start and end, the broker's comings and goings).
MAX_LINES_PER_FIELD = 2.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Broker:
    """mosquitto on a loopback port (anonymous, no persistence), killed and started again at will."""

    def __init__(self, workdir: Path, port: int) -> None:
        self.port = port
        self.conf = workdir / "mosquitto.conf"
        self.conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                             f"log_dest file {workdir / 'mosquitto.log'}\n")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(["mosquitto", "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("mosquitto did not listen")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(5)

    @property
    def up(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class Commander:
    """A paho client that sends the station's commands and waits for their answers."""

    def __init__(self, port: int) -> None:
        self.answers: dict[str, dict] = {}
        self.cond = threading.Condition()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="soak-commander")
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(1, 2)
        self.client.connect_async("127.0.0.1", port)
        self.client.loop_start()

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        client.subscribe(f"smearscope/{STATION}/cmd_response/#", qos=1)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self.cond:
            self.answers[msg.topic.rsplit("/", 1)[1]] = json.loads(msg.payload)
            self.cond.notify_all()

    def send(self, name: str, payload: dict, timeout: float = 60.0) -> dict | None:
        with self.cond:
            self.answers.pop(name, None)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:  # resent until answered: the client may be reconnecting
            self.client.publish(f"smearscope/{STATION}/cmd/{name}", json.dumps(payload), qos=1)
            with self.cond:
                if self.cond.wait_for(lambda: name in self.answers, timeout=5):
                    return self.answers[name]
        return None

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@dataclass(frozen=True)
class Sample:
    fields: int
    rss_mib: float
    fds: int
    threads: int
    outbox_mib: float
    wal_mib: float
    state_mib: float
    log_lines_per_field: float


def answered(answer: dict | None) -> str:
    """A command's answer in a word: its error code, `ok`, or `no answer`."""
    return "no answer" if answer is None else str(answer.get("error") or answer.get("code") or "ok")


def proc_status(pid: int) -> tuple[float, int, int]:
    status = Path(f"/proc/{pid}/status").read_text()
    rss = int(re.search(r"VmRSS:\s+(\d+) kB", status)[1]) / 1024  # type: ignore[index]
    threads = int(re.search(r"Threads:\s+(\d+)", status)[1])  # type: ignore[index]
    return rss, len(os.listdir(f"/proc/{pid}/fd")), threads


def file_mib(path: Path) -> float:
    return path.stat().st_size / 2**20 if path.exists() else 0.0


def tree_mib(folder: Path) -> float:
    """Bytes of the files under `folder` (the outbox, its WAL and reserve, the review gallery)."""
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                total += (Path(root) / name).stat().st_size
            except FileNotFoundError:  # removed meanwhile (a gallery run let go)
                pass
    return total / 2**20


def slope_per_100(xs: list[int], ys: list[float]) -> float:
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    return 100 * sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx if sxx else 0.0


def write_config(work: Path, port: int, n_fields: int, fps: float) -> Path:
    config = work / "station.toml"
    config.write_text(f"""station_id = "{STATION}"
log_level = "INFO"
[source]
kind = "simulated"
fields = {n_fields * 3}
fps = {fps}
width = 640
height = 480
[analysis]
models_dir = "{REPO / 'models'}"
detector_views = ["identity"]
rbc_head_views = ["identity"]
wbc_head_views = ["identity"]
[specimen]
auto_start = false
[mqtt]
host = "127.0.0.1"
port = {port}
keepalive = 5
reconnect_min_delay_s = 1
reconnect_max_delay_s = 2
[mqtt.outbox]
path = "{work / 'state' / 'outbox.sqlite3'}"
""")
    return config


def soak(args: argparse.Namespace, out: TextIO) -> int:
    def say(line: str) -> None:
        print(line, flush=True)
        out.write(line + "\n")
        out.flush()

    work = Path(tempfile.mkdtemp(prefix="soak-"))
    (work / "state").mkdir()
    port = free_port()
    broker = Broker(work, port)
    broker.start()
    config = write_config(work, port, args.fields, args.fps)
    log_path = work / "station.log"
    outbox = work / "state" / "outbox.sqlite3"
    say(machine())
    say(f"start: {time.strftime('%Y-%m-%d %H:%M')} UTC; {args.fields} fields of 640x480 at {args.fps} fps, broker killed every "
        f"{args.broker_cycle} fields for {args.offline}, run stopped/started every {args.run_cycle} fields")
    env = {**os.environ, "STATE_DIRECTORY": str(work / "state")}
    with log_path.open("w") as log:
        station = subprocess.Popen([sys.executable, "-m", "smearscope", "run", "--config", str(config)],
                                   stdout=log, stderr=subprocess.STDOUT, env=env, cwd=work)
    commander = Commander(port)
    first = commander.send("start_run", {"specimen_id": "SOAK-0000"})
    say(f"first run: {answered(first)}")
    samples: list[Sample] = []
    events: list[str] = []
    next_sample, next_kill, next_run, restart_at = args.every, args.broker_cycle, args.run_cycle, None
    last_fields, last_lines, run_no = 0, 0, 0
    say(f"{'fields':>6} {'VmRSS MiB':>9} {'fds':>4} {'threads':>7} {'outbox MiB':>10} {'WAL MiB':>8} "
        f"{'state MiB':>9} {'lines/field':>11}  events")
    try:
        while True:
            if station.poll() is not None:
                say(f"station exited early with {station.returncode}")
                return 1
            lines = log_path.read_text(errors="replace").splitlines()
            fields = sum(1 for ln in lines if _STORED_FIELD.search(ln))
            if restart_at is not None and fields >= restart_at:
                broker.start()
                events.append(f"broker up@{fields}")
                restart_at = None
            if fields >= next_kill and broker.up:
                broker.kill()
                events.append(f"broker killed@{fields}")
                restart_at = fields + args.offline
                next_kill += args.broker_cycle
            if fields >= next_run and broker.up:
                run_no += 1
                stop = commander.send("stop_run", {})
                start = commander.send("start_run", {"specimen_id": f"SOAK-{run_no:04d}"})
                events.append(f"run {answered(stop)}/{answered(start)}@{fields}")
                next_run += args.run_cycle
            if fields >= next_sample:
                rss, fds, threads = proc_status(station.pid)
                per_field = (len(lines) - last_lines) / max(1, fields - last_fields)
                sample = Sample(fields, rss, fds, threads, file_mib(outbox) + file_mib(Path(f"{outbox}-wal")),
                                file_mib(Path(f"{outbox}-wal")), tree_mib(work / "state"), per_field)
                samples.append(sample)
                say(f"{fields:>6} {rss:>9.1f} {fds:>4} {threads:>7} {sample.outbox_mib:>10.2f} "
                    f"{sample.wal_mib:>8.2f} {sample.state_mib:>9.1f} {per_field:>11.2f}  {', '.join(events)}")
                events.clear()
                last_fields, last_lines = fields, len(lines)
                next_sample += args.every
            if fields >= args.fields:
                break
            time.sleep(0.5)
    finally:
        commander.close()
        if station.poll() is None:
            station.send_signal(signal.SIGTERM)
            try:
                station.wait(60)
            except subprocess.TimeoutExpired:
                station.kill()
        broker.kill()
    say(f"end: {time.strftime('%Y-%m-%d %H:%M')} UTC; station exit {station.returncode}; work dir {work}")
    return verdict(samples, args.warmup, say)


def verdict(samples: list[Sample], warmup: int, say: Callable[[str], None]) -> int:
    steady = [s for s in samples if s.fields > warmup]
    half = steady[len(steady) // 2:] if len(steady) >= 4 else steady
    if len(half) < 2:
        say("too few samples for a verdict")
        return 1
    xs = [s.fields for s in half]
    failed = 0
    say(f"verdict over fields {xs[0]}..{xs[-1]} (after {warmup} fields of warm-up), slope per 100 fields:")
    for name, (unit, bound) in BOUNDS.items():
        ys = [float(getattr(s, name)) for s in half]
        slope = slope_per_100(xs, ys)
        ok = slope <= bound
        say(f"  {name:<19} {slope:+8.2f} {unit} per 100 fields (bound {bound}; last {ys[-1]:.2f}, "
            f"min {min(ys):.2f}, max {max(ys):.2f})  {'OK' if ok else 'GROWS'}")
        failed += not ok
        if name == "log_lines_per_field":
            mean = sum(ys) / len(ys)
            ok = mean <= MAX_LINES_PER_FIELD
            say(f"  {'journal':<19} {mean:8.2f} lines/field on average (bound {MAX_LINES_PER_FIELD})  "
                f"{'OK' if ok else 'FLOODS'}")
            failed += not ok
    return 1 if failed else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fields", type=int, default=600)
    parser.add_argument("--fps", type=float, default=1.0, help="the simulated source's frame rate")
    parser.add_argument("--every", type=int, default=25, help="sample every this many stored fields")
    parser.add_argument("--broker-cycle", type=int, default=100, help="kill the broker every this many fields")
    parser.add_argument("--offline", type=int, default=15, help="fields the broker stays down")
    parser.add_argument("--run-cycle", type=int, default=40, help="stop_run + start_run every this many fields")
    parser.add_argument("--warmup", type=int, default=100, help="fields left out of the verdict")
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = parser.parse_args()
    if args.out is None:
        with open(os.devnull, "w") as devnull:
            return soak(args, devnull)
    with args.out.open("w") as out:
        return soak(args, out)


if __name__ == "__main__":
    raise SystemExit(main())
