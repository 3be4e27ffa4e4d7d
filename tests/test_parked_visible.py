"""A message the broker refuses as too large (mosquitto's message_size_limit, PUBACK 0x95) is parked
at the station: to the clinic, a report that did not arrive. It is said where people look: the
station's telemetry (`parked`), the dashboard's card and header, and `smearscope doctor`, each
against a real mosquitto and, for the page, headless Chromium."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from broker import MQTT_USERS, MosquittoBroker, Subscriber, free_port, wait_for_port, wait_until
from test_daemon import to_toml
from test_dashboard import CHROMEDRIVER, _chromium_options, _Proc, _wait, needs_chromium
from test_publisher import BASE, STATION, make_config, start_publisher

from smearscope.cli import main
from smearscope.cli.doctor_parked import parked_line
from smearscope.service.analysis.pipeline import DEFAULT_MODELS_DIR
from smearscope.service.mqtt.publisher import MqttPublisher


def _samples(sub: Subscriber, base: str = BASE) -> list[dict[str, Any]]:
    return [json.loads(m.payload) for m in list(sub.messages) if m.topic == f"{base}/telemetry"]


def _parked(sub: Subscriber) -> dict[str, Any] | None:
    samples = _samples(sub)
    return samples[-1].get("parked") if samples else None


@pytest.mark.broker
@needs_chromium
def test_a_report_the_broker_refuses_as_too_large_is_said_in_telemetry_on_the_dashboard_and_by_doctor(
    tmp_path: Path, credentials_dir: Path, started: list[MqttPublisher], capsys: pytest.CaptureFixture[str],
) -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    broker = MosquittoBroker(tmp_path / "broker", MQTT_USERS, websockets=True, extra=("message_size_limit 20000",))
    broker.start()
    sub = Subscriber(broker.port, "observer", MQTT_USERS["observer"], [f"{BASE}/telemetry"])
    password_file = tmp_path / "dashboard-password"
    password_file.write_text(MQTT_USERS["observer"] + "\n")
    http_port = free_port()
    log = tmp_path / "dashboard.log"
    dashboard = _Proc([sys.executable, "-m", "smearscope", "dashboard", "--port", str(http_port),
                       "--broker", f"ws://127.0.0.1:{broker.ws_port}", "--username", "observer",
                       "--password-file", str(password_file)], log)
    driver = None
    try:
        sub.wait_ready()
        config = make_config(tmp_path, broker.port, protocol="5", telemetry_interval_s=2.0)
        publisher = start_publisher(config, started, telemetry_source=lambda: {"pipeline": {"fields_analysed": 0}})
        assert publisher.wait_until_connected(5)
        assert wait_until(lambda: _parked(sub) is not None, 10), _samples(sub)
        assert _parked(sub) == {"messages": 0, "reports": 0, "too_large": 0, "oldest": None, "read_error": None}
        publisher.publish_report("report", "too-big", json.dumps({"cells": "x" * 50_000}).encode(), "1")
        publisher.publish_report("report", "small", b"{}", "1")
        assert wait_until(lambda: (_parked(sub) or {}).get("messages") == 1, 10), _samples(sub)[-3:]
        parked = _parked(sub)
        assert parked is not None and parked["too_large"] == 1 and parked["reports"] == 1, parked
        oldest = parked["oldest"]
        assert oldest["report_id"] == "too-big" and oldest["reason"] == "refused_as_too_large" and oldest["kind"] == "report"
        assert oldest["limit"] is None and oldest["bytes"] > 50_000 and oldest["age_s"] >= 0 and oldest["topic"] == f"{BASE}/report", oldest
        assert [m.report_id for m in publisher.outbox.pending()] == ["too-big"]  # the small one went

        # doctor, beside the running station (its outbox held): the count, from its telemetry
        doctor_config = _doctor_config(tmp_path, broker.port, config.outbox.path, 2.0)
        main(["doctor", "--config", str(doctor_config)])
        out = capsys.readouterr().out
        line = next((x for x in out.splitlines() if x.startswith("WARN  parked")), None)
        assert line is not None, out
        assert ("1 report held at the station" in line and "oldest: report too-big" in line
                and "refused by the broker as too large: raise message_size_limit" in line), line

        # the dashboard: a line on the card, the station named in the header
        wait_for_port(http_port, 20, dashboard.proc)
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=_chromium_options(tmp_path))
        driver.get(f"http://127.0.0.1:{http_port}/")

        def card_line() -> str:
            return str(driver.execute_script(
                "const n = document.querySelector(`[data-station='${arguments[0]}'] .parked`);"
                "return n && !n.hidden ? n.textContent : '';", STATION))

        def header() -> str:
            return str(driver.execute_script(
                "const n = document.getElementById('parked'); return n.hidden ? '' : n.textContent;"))

        _wait("the card's parked line", lambda: card_line() != "", 20, [log])
        text = card_line()
        assert text.startswith("1 report held at the station: refused by the broker as too large — raise "
                               "message_size_limit"), text
        assert "oldest: report too-big" in text, text
        assert header() == f"reports held at the station: {STATION}", header()

        # the broker's limit raised: the report goes, and the count, the line and the header go with it
        broker.extra = ()
        broker._write_config()
        broker.restart()
        assert wait_until(lambda: publisher.outbox.counts().messages == 0, 15), publisher.state
        assert wait_until(lambda: (_parked(sub) or {}).get("messages") == 0, 10), _samples(sub)[-3:]
        _wait("the card's parked line gone", lambda: card_line() == "" and header() == "", 20, [log])

        # a report over the station's own packet limit (mqtt.max_packet_size, 262144 by default): said as such
        publisher.publish_report("report", "over-limit", json.dumps({"cells": "x" * 300_000}).encode(), "1")
        assert wait_until(lambda: (_parked(sub) or {}).get("messages") == 1, 10), _samples(sub)[-3:]
        over = _parked(sub)
        assert over is not None and over["too_large"] == 1, over
        assert over["oldest"]["reason"] == "over_packet_limit" and over["oldest"]["limit"] == 262144, over
        _wait("the card's line for a message over the packet limit", lambda: "over the packet limit" in card_line(),
              20, [log])
        assert card_line().startswith("1 report held at the station: over the packet limit of 262144 bytes (the "
                                      "broker's max_packet_size, or the station's mqtt.max_packet_size if lower) — "
                                      "raise it above "), card_line()
        assert "mqtt.max_packet_size" in parked_line(over, "h")[2], parked_line(over, "h")
    finally:
        if driver is not None:
            driver.quit()
        dashboard.stop()
        sub.close()
        broker.stop()


def _doctor_config(tmp_path: Path, port: int, outbox: Path, telemetry_interval_s: float | None = None) -> Path:
    """The running station's config as doctor reads it: the same broker account and outbox
    (telemetry_interval_s left out when None: the default)."""
    telemetry = {} if telemetry_interval_s is None else {"telemetry_interval_s": telemetry_interval_s}
    path = tmp_path / "station.toml"
    path.write_text(to_toml({
        "station_id": STATION, "source": {"kind": "simulated"}, "analysis": {"models_dir": str(DEFAULT_MODELS_DIR)},
        "mqtt": {"host": "127.0.0.1", "port": port, "username": "station",
                 "password_credential": "mqtt-password", **telemetry,
                 "outbox": {"path": str(outbox)}}}) + "\n")
    return path


def test_doctor_beside_a_running_station_it_cannot_log_in_for_says_where_to_see_its_parked_count(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """From a shell (no $CREDENTIALS_DIRECTORY) doctor cannot read the station's telemetry: it says
    where the count is instead. The station runs: its outbox file is held (opened here)."""
    from smearscope.service.mqtt.outbox import Outbox

    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    outbox_path = tmp_path / "state" / "outbox.sqlite3"
    config = _doctor_config(tmp_path, free_port(), outbox_path)
    with Outbox(outbox_path):
        main(["doctor", "--config", str(config)])
    out = capsys.readouterr().out
    line = next((x for x in out.splitlines() if x.startswith("WARN  parked")), None)
    assert line is not None, out
    assert "not read: the broker password cannot be read here" in line, line
    assert "systemctl status smearscope" in line and f"mosquitto_sub -C 1 -t {BASE}/telemetry" in line, line
    # without a running station there is nothing to count: no line
    main(["doctor", "--config", str(config)])
    assert "parked" not in capsys.readouterr().out


def test_doctor_opens_the_outbox_once_for_its_outbox_and_parked_lines(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The outbox line (its counts, or held by a running station) and the parked line (said only
    beside a running station) come from one open of the outbox file, counted at sqlite3.connect:
    beside a running station each open waits out the station's lock. The lines are as they were."""
    import sqlite3
    import urllib.parse

    from smearscope.service.mqtt.outbox import Outbox

    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    outbox_path = tmp_path / "state" / "outbox.sqlite3"
    config = _doctor_config(tmp_path, free_port(), outbox_path)
    opens: list[str] = []
    connect = sqlite3.connect

    def counted(database: Any, *args: Any, **kwargs: Any) -> sqlite3.Connection:
        named = str(database)  # a path, or a file: URI (doctor's query-only open)
        if named.startswith("file:"):
            named = urllib.parse.unquote(urllib.parse.urlsplit(named).path)
        if Path(named).resolve() == outbox_path.resolve():
            opens.append(str(database))
        return connect(database, *args, **kwargs)

    def doctor_lines() -> list[str]:
        opens.clear()
        main(["doctor", "--config", str(config)])
        return [x for x in capsys.readouterr().out.splitlines() if x[6:22].strip() in ("outbox", "parked")]

    monkeypatch.setattr(sqlite3, "connect", counted)
    assert doctor_lines() == [f"OK    outbox             {outbox_path}: not created yet (the first start creates it)"]
    assert opens == []
    with Outbox(outbox_path) as box:  # a station that stopped with a report and a field message waiting
        box.put("report", f"{BASE}/report", b"{}", report_id="r1", schema_version="1")
        box.put("field", f"{BASE}/field", b"{}", report_id="f1", schema_version="1")
    assert doctor_lines() == [(f"OK    outbox             {outbox_path}: 2 messages waiting (1 final: specimen "
                              "reports, FHIR bundles)")]
    assert len(opens) == 2, opens  # and the calibration watch's read of its checks (none beside a running station)
    with Outbox(outbox_path):  # the station runs: it holds the file
        lines = doctor_lines()
    assert lines == [f"OK    outbox             {outbox_path}: held by a running station",
                     ("WARN  parked             not read: the broker password cannot be read here; see it in `systemctl "
                     "status smearscope` (its Status line: 'N messages parked'), the dashboard's card, or one telemetry "
                     f"sample's `parked`: mosquitto_sub -C 1 -t {BASE}/telemetry")], lines
    assert len(opens) == 1, opens


@pytest.mark.broker
def test_doctor_says_what_it_waits_for_before_waiting_for_the_running_stations_telemetry_and_no_wait_skips_it(
    tmp_path: Path, broker: MosquittoBroker, credentials_dir: Path, started: list[MqttPublisher],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Beside a running station (real mosquitto, a publisher holding the outbox, telemetry every 60 s)
    doctor prints the line saying what it waits for, and for how long, while it waits: the parked
    line comes only once the station's next sample does. --no-wait gives an INFO line instead."""
    import subprocess

    config = make_config(tmp_path, broker.port, telemetry_interval_s=60.0)
    publisher = start_publisher(config, started, telemetry_source=lambda: {"pipeline": {"fields_analysed": 0}})
    assert publisher.wait_until_connected(5)
    doctor_config = _doctor_config(tmp_path, broker.port, config.outbox.path, 60.0)

    main(["doctor", "--config", str(doctor_config), "--no-wait"])
    out = capsys.readouterr().out
    assert "waiting up to" not in out, out
    line = next((x for x in out.splitlines() if x.startswith("INFO  parked")), None)
    assert line is not None, out
    assert "not waited for (--no-wait)" in line and "systemctl status smearscope" in line, line
    assert f"mosquitto_sub -C 1 -t {BASE}/telemetry" in line, line

    proc = subprocess.Popen([sys.executable, "-m", "smearscope", "doctor", "--config", str(doctor_config)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout is not None
        before: list[str] = []
        for line in proc.stdout:  # as doctor prints them (each flushed)
            before.append(line.rstrip("\n"))
            if "parked" in line:
                break
        waiting = before[-1]
        assert waiting == (f"      parked             waiting up to 65 s for station {STATION}'s next telemetry "
                           f"sample (its parked reports) on {BASE}/telemetry; smearscope doctor --no-wait skips it"), before
        assert any(x.startswith("OK    broker login") for x in before), before  # the checks before it, already out
        assert proc.poll() is None  # said while it waits: the station's next sample is 60 s away
        # the station's next sample (sent again until doctor, subscribed by now, has read one)
        while proc.poll() is None:
            publisher.publish_telemetry({"pipeline": {"fields_analysed": 0}})
            try:
                proc.wait(0.5)
            except subprocess.TimeoutExpired:
                pass
        rest = proc.stdout.read().splitlines()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert rest[0].startswith("OK    parked             none: the running station (host "), rest
    assert "waiting up to" not in "\n".join(rest), rest


@pytest.mark.broker
def test_the_daemons_status_line_and_status_command_count_what_the_broker_refused_as_too_large(
    tmp_path: Path, credentials_dir: Path,
    broker_with: Callable[..., MosquittoBroker],
) -> None:
    """systemd's STATUS= line (`systemctl status`) and the status command, of a station whose field
    messages are over mosquitto's message_size_limit."""
    from test_daemon import pool_factory, running, write_station

    from smearscope.service.config import load_config
    from smearscope.service.station.daemon import StationDaemon

    broker = broker_with(extra=("message_size_limit 1500",))  # reports over it, telemetry under
    source = {"kind": "simulated", "fields": 2, "fps": 8.0, "width": 320, "height": 240, "seed": 0}
    config = write_station(tmp_path, broker.port, source=source)
    daemon = StationDaemon(load_config(config, {}), analyzer_factory=pool_factory(), config_path=config,
                           environ={"CREDENTIALS_DIRECTORY": str(credentials_dir)})
    with running(daemon):
        assert wait_until(lambda: daemon.publisher is not None and daemon.publisher.state.parked >= 2, 30), (
            daemon.status_line())
        line = daemon.status_line()
        detail = daemon.status()["broker"]["parked_detail"]
    n = detail["messages"]
    assert n >= 2 and detail["too_large"] == n and detail["oldest"]["reason"] == "refused_as_too_large", detail
    assert f"{n} messages parked ({n} too large for the broker)" in line, line


def test_the_parked_summary_is_read_again_only_when_the_parked_set_changes_or_it_is_max_age_old(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """ParkedReader on a real outbox file, its reads counted by the connection's trace callback:
    asked each second (the STATUS= line) it reads once, then again only for another parked set or
    once its summary is `max_age_s` old by its clock (stepped here); the oldest's age follows `now`
    meanwhile. Asked without `max_age_s` (telemetry, the status command) it reads each time. A read
    that fails is kept as its summary says it (counts from memory, `read_error`)."""
    import logging
    import sqlite3

    from smearscope.service.mqtt.outbox import Outbox
    from smearscope.service.mqtt.parked import ParkedReader

    box = Outbox(tmp_path / "outbox.sqlite3")
    try:
        big = box.put("report", f"{BASE}/report", b"x" * 5000, report_id="big", schema_version="1")
        field = box.put("field", f"{BASE}/field", b"y" * 3000, report_id="f1", schema_version="1")
        reads: list[str] = []
        box.read(lambda conn: conn.set_trace_callback(
            lambda sql: reads.append(sql) if sql.startswith("SELECT seq, kind, topic, report_id, created_at") else None))
        clock = [100.0]
        reader = ParkedReader(box, clock=lambda: clock[0])
        created = box.read(lambda conn: conn.execute("SELECT created_at FROM outbox WHERE seq = ?", (big,)).fetchone()[0])
        parked, too_large = {big: 5100}, {big: ("refused", None)}
        summaries = []
        for second in range(10):  # the supervise loop's STATUS= line, each second, nothing parked meanwhile
            clock[0] = 100.0 + second
            summaries.append(reader(parked, too_large, created + second, max_age_s=30.0))
        assert len(reads) == 1, reads
        assert [s["messages"] for s in summaries] == [1] * 10 and summaries[-1]["too_large"] == 1
        assert [s["oldest"]["age_s"] for s in summaries] == [float(i) for i in range(10)]
        assert summaries[-1]["oldest"]["report_id"] == "big" and summaries[-1]["reports"] == 1
        clock[0] = 130.0  # 30 s after its read: read again
        assert reader(parked, too_large, created + 30, max_age_s=30.0)["messages"] == 1 and len(reads) == 2
        parked[field] = 3100  # another message parked: the next summary is read, and counts it
        both = reader(parked, too_large, created + 31, max_age_s=30.0)
        assert len(reads) == 3 and both["messages"] == 2 and both["too_large"] == 1 and both["reports"] == 1, both
        assert reader(parked, too_large, created + 31)["messages"] == 2 and len(reads) == 4  # telemetry: read

        caplog.set_level(logging.INFO, logger="smearscope.service.mqtt.parked")
        box.read(lambda conn: conn.set_authorizer(
            lambda action, table, *rest: sqlite3.SQLITE_DENY if table == "outbox" else sqlite3.SQLITE_OK))
        failed = reader(parked, too_large, created + 32)
        assert failed["messages"] == 2 and failed["reports"] is None and "prohibited" in failed["read_error"], failed
        box.read(lambda conn: conn.set_authorizer(None))
        assert reader(parked, too_large, created + 33, max_age_s=30.0) == failed  # kept: not read again yet
        clock[0] = 200.0
        again = reader(parked, too_large, created + 34, max_age_s=30.0)
        assert again["read_error"] is None and again["reports"] == 1, again
        said = [r.levelname for r in caplog.records if "parked messages" in r.getMessage()]
        assert said == ["WARNING", "INFO"], said
    finally:
        box.close()


def _parked_once_settled(daemon: Any, inbox: Path) -> tuple[MqttPublisher, int]:
    """A running station's publisher and its parked count, once its two fields in `inbox` are analysed,
    their reports parked (too large for the broker) and nothing more parks: the run's last state
    messages may park a moment after its reports."""
    assert wait_until(lambda: daemon.publisher is not None and daemon.publisher.state.parked >= 2
                      and daemon.status()["reports_stored"] >= 2 and not any(inbox.glob("*.png")), 30), daemon.status_line()
    assert daemon.outbox is not None and daemon.publisher is not None
    publisher = daemon.publisher
    seen = [publisher.state.parked]
    for _ in range(10):
        time.sleep(1.0)
        seen.append(publisher.state.parked)
        if seen[-1] == seen[-2]:
            break
    assert seen[-1] == seen[-2], seen
    return publisher, seen[-1]


@pytest.mark.broker
def test_the_daemons_status_line_reads_the_outbox_only_when_the_parked_set_changes(
    tmp_path: Path, credentials_dir: Path,
) -> None:
    """A running station with messages parked (over mosquitto's message_size_limit), telemetry every
    300 s: its STATUS= line, asked again and again while nothing parks, does not read the outbox
    (reads counted by the outbox connection's trace callback); a report parked then shows in the
    next line, the one systemd gets included."""

    from test_daemon import NotifyListener, pool_factory, running, write_station
    from test_restore import _folder_source, _png

    from smearscope.service.config import load_config
    from smearscope.service.station.daemon import StationDaemon

    broker = MosquittoBroker(tmp_path / "broker", MQTT_USERS, extra=("message_size_limit 1500",))  # reports over it, telemetry under
    broker.start()
    listener = NotifyListener(tmp_path / "notify.sock")
    try:
        inbox = tmp_path / "inbox"  # a watched folder: the station runs on once its two fields are analysed
        inbox.mkdir()
        for i in range(2):
            (inbox / f"f{i}.png").write_bytes(_png(4500 + i))
        config = write_station(tmp_path, broker.port, source=_folder_source(inbox), mqtt={"telemetry_interval_s": 300.0})
        daemon = StationDaemon(load_config(config, {}), analyzer_factory=pool_factory(), config_path=config,
                               environ={"CREDENTIALS_DIRECTORY": str(credentials_dir),
                                        "NOTIFY_SOCKET": str(listener.path)})
        with running(daemon):
            publisher, n = _parked_once_settled(daemon, inbox)
            assert daemon.outbox is not None
            reads: list[str] = []
            daemon.outbox.read(lambda conn: conn.set_trace_callback(
                lambda sql: reads.append(sql) if sql.startswith("SELECT seq, kind, topic, report_id, created_at") else None))
            lines = [daemon.status_line() for _ in range(20)]
            assert len(reads) <= 1, len(reads)  # the first may be the one due after the last telemetry sample
            assert all(f"{n} messages parked ({n} too large for the broker)" in x for x in lines), lines[-1]

            publisher.publish_report("report", "too-big", json.dumps({"cells": "x" * 5000}).encode(), "1")
            assert wait_until(lambda: publisher.state.parked == n + 1, 15), publisher.state
            assert f"{n + 1} messages parked ({n + 1} too large for the broker)" in daemon.status_line()
            sent = lambda: [m for _, m in listener.lines("STATUS=") if f"{n + 1} messages parked" in m]
            assert wait_until(lambda: bool(sent()), 10), listener.lines("STATUS=")[-3:]
            daemon.outbox.read(lambda conn: conn.set_trace_callback(None))
    finally:
        listener.close()
        broker.stop()


@pytest.mark.broker
def test_doctor_beside_a_station_whose_telemetry_comes_less_often_than_it_waits_says_so_not_only_the_acl(
    tmp_path: Path, broker: MosquittoBroker, credentials_dir: Path, started: list[MqttPublisher],
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A station sending telemetry every 300 s: doctor waits 65 s at most, and where no sample came it
    says the period is longer than its wait, where it named only the ACL (which lets it read here)."""
    from smearscope.cli import doctor_parked

    monkeypatch.setattr(doctor_parked, "WAIT_CAP_S", 1.0)  # doctor's cap, shortened: the station's period is 300 s
    config = make_config(tmp_path, broker.port, telemetry_interval_s=300.0)
    publisher = start_publisher(config, started, telemetry_source=lambda: {"pipeline": {"fields_analysed": 0}})
    assert publisher.wait_until_connected(5)
    doctor_config = _doctor_config(tmp_path, broker.port, config.outbox.path, 300.0)
    main(["doctor", "--config", str(doctor_config)])
    out = capsys.readouterr().out
    line = next((x for x in out.splitlines() if x.startswith("WARN  parked")), None)
    assert line is not None, out
    assert "within 1 s (the station sends one every 300 s (mqtt.telemetry_interval_s), longer than doctor waits; " \
           f"or its account may not read it: the ACL's 'topic read {BASE}/telemetry')" in line, line


@pytest.mark.broker
def test_an_outbox_that_cannot_be_read_leaves_telemetry_status_and_the_status_line_going_with_the_parked_detail_unknown(
    tmp_path: Path, credentials_dir: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """A running station with messages parked (over mosquitto's message_size_limit) whose outbox file
    stops answering reads (SQLite's own error: the connection's authorizer refuses the outbox table,
    as an I/O error or a corrupt page would fail the read): its telemetry samples go on, with the
    parked count from memory and `reports`/`oldest` null, `read_error` saying why; the status
    command and the STATUS= line (the daemon's supervise loop) say it too, the station keeps
    running, and the failure is said once at WARNING across many samples. Read again, the detail
    comes back (said at INFO)."""
    import logging
    import sqlite3

    from test_daemon import BASE as DAEMON_BASE
    from test_daemon import NotifyListener, pool_factory, running, write_station
    from test_restore import _folder_source, _png

    from smearscope.service.config import load_config
    from smearscope.service.station.daemon import StationDaemon

    broker = MosquittoBroker(tmp_path / "broker", MQTT_USERS, extra=("message_size_limit 1500",))  # reports over it, telemetry under
    broker.start()
    sub = Subscriber(broker.port, "observer", MQTT_USERS["observer"], [f"{DAEMON_BASE}/telemetry"])
    listener = NotifyListener(tmp_path / "notify.sock")
    caplog.set_level(logging.INFO, logger="smearscope.service.mqtt.parked")

    def refuse_outbox(action: int, table: str | None, *rest: object) -> int:
        return sqlite3.SQLITE_DENY if action == sqlite3.SQLITE_READ and table == "outbox" else sqlite3.SQLITE_OK

    def failing(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [s for s in samples if isinstance(s.get("parked"), dict) and s["parked"].get("read_error")]

    said = lambda: [r for r in caplog.records if "cannot be read for its parked messages" in r.getMessage()]
    try:
        sub.wait_ready()
        inbox = tmp_path / "inbox"  # a watched folder: the station runs on once its two fields are analysed
        inbox.mkdir()
        for i in range(2):
            (inbox / f"f{i}.png").write_bytes(_png(4400 + i))
        config = write_station(tmp_path, broker.port, source=_folder_source(inbox))
        daemon = StationDaemon(load_config(config, {}), analyzer_factory=pool_factory(), config_path=config,
                               environ={"CREDENTIALS_DIRECTORY": str(credentials_dir),
                                        "NOTIFY_SOCKET": str(listener.path)})
        with running(daemon) as runner:
            _, parked = _parked_once_settled(daemon, inbox)
            assert daemon.outbox is not None
            daemon.outbox.read(lambda conn: conn.set_authorizer(refuse_outbox))
            before = len(_samples(sub, DAEMON_BASE))
            assert wait_until(lambda: len(failing(_samples(sub, DAEMON_BASE)[before:])) >= 4, 20), _samples(sub, DAEMON_BASE)[-2:]
            sample = failing(_samples(sub, DAEMON_BASE)[before:])[-1]
            assert sample["parked"]["messages"] == parked and sample["parked"]["too_large"] == parked, sample
            assert sample["parked"]["reports"] is None and sample["parked"]["oldest"] is None, sample
            assert "prohibited" in sample["parked"]["read_error"], sample
            assert sample["pipeline"]["outbox_messages"] >= parked and "interval_s" in sample, sample  # the rest kept
            detail = daemon.status()["broker"]["parked_detail"]
            assert detail["messages"] == parked and detail["oldest"] is None and detail["read_error"], detail
            line = lambda: [m for _, m in listener.lines("STATUS=") if "the outbox cannot be read" in m]
            assert wait_until(lambda: bool(line()), 10), listener.lines("STATUS=")[-3:]
            assert f"{parked} messages parked ({parked} too large for the broker; the outbox cannot be read: " in line()[-1]
            assert runner.is_alive() and daemon.status()["state"] == "running"
            assert len(said()) == 1 and said()[0].levelname == "WARNING", said()

            daemon.outbox.read(lambda conn: conn.set_authorizer(None))
            before = len(_samples(sub, DAEMON_BASE))
            assert wait_until(lambda: any(s["parked"]["read_error"] is None and s["parked"]["reports"] == 0
                                          for s in _samples(sub, DAEMON_BASE)[before:]), 20), _samples(sub, DAEMON_BASE)[-2:]
            assert any("is read again for its parked messages" in r.getMessage() and r.levelname == "INFO"
                       for r in caplog.records)
            assert runner.is_alive()
    finally:
        listener.close()
        sub.close()
        broker.stop()
