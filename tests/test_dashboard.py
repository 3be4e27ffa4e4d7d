"""The clinic dashboard in a real browser: mosquitto with a WebSockets listener, the station
daemon (`smearscope run`, committed models, simulated microscope), `smearscope dashboard`, and
Debian's headless Chromium driven by selenium through chromium-driver. The test reads what a
person sees: the station online, the differential's numbers equal to the specimen report's, a
flag, the latest field's overlay; then the broker is killed and restarted and the page recovers.
Screenshots are saved in the test's tmp dir (dashboard-final.png, dashboard-recovered.png).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from broker import MQTT_USERS, MosquittoBroker, Subscriber, free_port, wait_for_port, wait_until
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from test_daemon import to_toml

from smearscope.service.analysis.morphology import REPORTED_PRESENT, SIZE_BASED
from smearscope.service.analysis.report import ClassShare, Flag, Report, Verification
from smearscope.service.dashboard.server import STATIC, DashboardServer, DashboardSettings
from smearscope.service.fhir.report_view import left_as_called

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
needs_chromium = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="chromium and chromium-driver not "
                                    "installed (make test installs them with apt)")
STATION = "ward-7"
BASE = f"smearscope/{STATION}"
MQTT_JS_SHA256 = "f3cbeae580d3010048938ee370f2db0c15d16e6f7fc147cb32ae5510e571b387"
#: Chromium as root in a container: no sandbox, no GPU, nothing fetched from the network.
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1500,1100")


def test_vendored_mqtt_js_is_the_npm_release_with_its_licence() -> None:
    vendor = STATIC / "vendor"
    assert hashlib.sha256((vendor / "mqtt.min.js").read_bytes()).hexdigest() == MQTT_JS_SHA256
    assert "MIT License" in (vendor / "mqtt.LICENSE.md").read_text()
    assert MQTT_JS_SHA256 in (vendor / "README.md").read_text()


def test_the_pages_lists_of_findings_are_the_analyzers() -> None:
    """The page reads size-based findings as not assessable under a calibration in doubt, and
    sickle cells as present or none (never 1+ to 3+, also from a report that graded them): its
    lists must be service.analysis.morphology's."""
    script = (STATIC / "dashboard.js").read_text()
    for name, want in (("SIZE_BASED", SIZE_BASED), ("REPORTED_PRESENT", REPORTED_PRESENT)):
        found = re.search(rf"^const {name} = \[([^\]]*)\];", script, re.MULTILINE)
        assert found, name
        assert set(re.findall(r'"([^"]+)"', found.group(1))) == set(want), name


def test_the_run_forms_bound_on_a_specimen_id_is_the_stations() -> None:
    """The page refuses a specimen id the station would refuse (too long) before sending it: its
    bound must be service.analysis.report's."""
    from smearscope.service.analysis.report import MAX_SPECIMEN_ID

    script = (STATIC / "runcontrol.js").read_text()
    found = re.search(r"^const MAX_SPECIMEN_ID = (\d+);", script, re.MULTILINE)
    assert found and int(found.group(1)) == MAX_SPECIMEN_ID


def test_server_serves_the_page_and_its_config_and_nothing_else() -> None:
    server = DashboardServer(DashboardSettings("wss://broker.lab:8081/mqtt", "lab", "dash", "pw"), port=0)
    server.start()
    base = f"http://127.0.0.1:{server.port}"
    try:
        with urllib.request.urlopen(f"{base}/") as page:
            assert b"dashboard.js" in page.read() and "script-src 'self'" in page.headers["Content-Security-Policy"]
        with urllib.request.urlopen(f"{base}/config.json") as cfg:
            assert json.load(cfg) == {"broker": "wss://broker.lab:8081/mqtt", "topicPrefix": "lab",
                                      "username": "dash", "password": "pw", "runControl": False}
        with urllib.request.urlopen(f"{base}/vendor/mqtt.min.js") as js:
            assert js.headers["Content-Type"].startswith("text/javascript") or "javascript" in js.headers["Content-Type"]
        for bad in ("/../server.py", "/%2e%2e/server.py", "/nothing.html"):
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(base + bad)
            assert err.value.code == 404
    finally:
        server.stop()
    for url in ("http://broker:9001", "tcp://broker:1883", "ws://"):
        with pytest.raises(ValueError):
            DashboardSettings(url)


def test_head_is_answered_as_get_without_the_body() -> None:
    """A monitor or proxy checking the page with HEAD gets GET's status and headers (its
    Content-Length the GET body's) and no body: for the page, /config.json, a script and a 404."""
    import http.client

    server = DashboardServer(DashboardSettings("wss://broker.lab:8081/mqtt", "lab", "dash", "pw"), port=0)
    server.start()
    try:
        for path in ("/", "/config.json", "/dashboard.js", "/nothing.html"):
            answers = []
            for method in ("GET", "HEAD"):
                conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
                try:
                    conn.request(method, path)
                    response = conn.getresponse()
                    headers = {k: v for k, v in response.getheaders() if k != "Date"}
                    answers.append((response.status, headers, response.read()))
                finally:
                    conn.close()
            (get_status, get_headers, body), (head_status, head_headers, head_body) = answers
            assert head_status == get_status == (404 if path == "/nothing.html" else 200), path
            assert head_headers == get_headers and int(head_headers["Content-Length"]) == len(body) > 0, path
            assert head_body == b"", path
        # the socket itself: nothing after HEAD's headers (a client that reads on would see a body)
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(b"HEAD /config.json HTTP/1.0\r\nHost: localhost\r\n\r\n")
            raw = b""
            while chunk := sock.recv(65536):
                raw += chunk
        assert raw.startswith(b"HTTP/1.0 200") and raw.endswith(b"\r\n\r\n"), raw
    finally:
        server.stop()


def _raw_answer(port: int, request: bytes) -> bytes:
    """What the server sends for these bytes, read until it closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        raw = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                raw += chunk
    return raw


def test_a_hostile_request_is_answered_with_the_pages_policy_not_dropped(capfd: pytest.CaptureFixture[str]) -> None:
    """A path holding %00, or a name too long for the file system, raised in the handler: the
    connection was dropped unanswered and a traceback written to stderr for each such request.
    They are 404 now; encoded traversals stay 404; http.server's own error pages (a method other
    than GET or HEAD, a header line too long) carry the page's Content-Security-Policy too."""
    server = DashboardServer(DashboardSettings("ws://broker.lab:9001"), port=0)
    server.start()
    try:
        for path in ("/%00", "/index.html%00.txt", "/" + "a" * 5000, "/..%2f..%2fserver.py",
                     "/%2e%2e%2f%2e%2e%2fetc%2fpasswd", "/%252e%252e/server.py", "/vendor/../../server.py"):
            raw = _raw_answer(server.port, f"GET {path} HTTP/1.0\r\n\r\n".encode())
            assert raw.startswith(b"HTTP/1.0 404 ") and raw.endswith(b"not found\n"), (path[:30], raw[:80])
        for request, status in ((b"POST / HTTP/1.0\r\nContent-Length: 5\r\n\r\nhello", b"501"),
                                (b"GET / HTTP/1.0\r\nX: " + b"a" * 70_000 + b"\r\n\r\n", b"431")):
            head = _raw_answer(server.port, request).split(b"\r\n\r\n")[0]
            assert head.startswith(b"HTTP/1.0 " + status), head
            assert b"\r\nContent-Security-Policy: default-src 'self'" in head, head
            assert b"\r\nX-Content-Type-Options: nosniff" in head, head
    finally:
        server.stop()
    assert "Traceback" not in capfd.readouterr().err


def test_no_answer_is_cached_or_names_the_dashboard_to_other_sites() -> None:
    """The page shows patients' results and config.json the broker password: every answer, the
    404s and http.server's own error pages included, says `Cache-Control: no-store` (once) and
    `Referrer-Policy: no-referrer`. The error pages (501 here) were cacheable and no answer set a
    referrer policy."""
    server = DashboardServer(DashboardSettings("ws://broker.lab:9001", "lab", "dash", "pw"), port=0)
    server.start()
    try:
        requests = [f"GET {path} HTTP/1.0\r\n\r\n".encode()
                    for path in ("/", "/index.html", "/config.json", "/dashboard.js", "/vendor/mqtt.min.js", "/nothing")]
        requests.append(b"POST / HTTP/1.0\r\nContent-Length: 5\r\n\r\nhello")
        for request in requests:
            head = _raw_answer(server.port, request).split(b"\r\n\r\n")[0].split(b"\r\n")
            assert head[0].split()[1] in (b"200", b"404", b"501"), head
            assert head.count(b"Cache-Control: no-store") == 1, (request[:30], head)
            assert b"Referrer-Policy: no-referrer" in head, (request[:30], head)
    finally:
        server.stop()


def test_the_password_is_not_served_under_another_sites_name() -> None:
    """DNS rebinding: a page of another site whose name the attacker points at the dashboard's
    address reads /config.json as same-origin, broker password included (and may then sign runs
    over the broker's WebSockets with it). The server answered whatever Host a request named; a
    name that is not an IP address, localhost, the machine's own name or one given with --host is
    now refused 421, the password not sent."""
    import socket as sockets

    settings = DashboardSettings("ws://broker.lab:9001", "lab", "dash", "pw-secret", ("dashboard.lab",))
    server = DashboardServer(settings, port=0)
    server.start()
    try:
        def answer(host: str, path: str = "/config.json") -> bytes:
            return _raw_answer(server.port, f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())

        for host in ("evil.example", f"evil.example:{server.port}", "rebind.127.0.0.1.nip.io", "dashboard.lab.evil",
                     "localhost.evil.example", ""):
            raw = answer(host)
            assert raw.startswith(b"HTTP/1.0 421 ") and b"pw-secret" not in raw, (host, raw[:120])
            assert answer(host, "/").startswith(b"HTTP/1.0 421 "), host
        for host in (f"127.0.0.1:{server.port}", "127.0.0.1", f"[::1]:{server.port}", f"localhost:{server.port}",
                     "LOCALHOST", f"dashboard.lab:{server.port}", "dashboard.lab.", "10.1.2.3:8080",
                     sockets.gethostname()):
            raw = answer(host)
            assert raw.startswith(b"HTTP/1.0 200 ") and b"pw-secret" in raw, (host, raw[:120])
        # a client sending no Host (HTTP/1.0, a monitor) is answered as before
        assert _raw_answer(server.port, b"GET /config.json HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.0 200 ")
    finally:
        server.stop()


def test_a_client_sending_its_headers_slowly_is_cut_off_and_others_are_served() -> None:
    """Slowloris: a connection that keeps sending a header line now and then, never ending its
    headers, held its thread for as long as it liked (and one that sent nothing more, for ever).
    Each connection is now ended at its deadline (30 s; 1 s here) whatever it sends, and an idle
    one after 10 s without progress (5 s here); other clients are answered meanwhile."""
    server = DashboardServer(DashboardSettings("ws://broker.lab:9001"), port=0, deadline_s=1.0, idle_s=5.0)
    server.start()
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as slow:
            slow.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n")
            assert _raw_answer(server.port, b"GET / HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.0 200 ")
            slow.setblocking(False)
            closed, lines = False, 0
            while not closed and lines < 75:  # 15 s of a header line each 0.2 s
                time.sleep(0.2)
                try:
                    slow.sendall(b"X-Slow: %d\r\n" % lines)
                    lines += 1
                    closed = slow.recv(65536) == b""
                except BlockingIOError:
                    pass  # nothing to read: still open
                except OSError:
                    closed = True  # reset or broken pipe: the server closed it
            assert closed, f"still open after {lines} header lines"
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as idle:
            idle.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n")
            assert idle.recv(65536) == b""  # ended by the server (the deadline); the 10 s timeout raises
    finally:
        server.stop()


def test_connections_past_the_bound_are_answered_503_at_once_and_a_freed_slot_serves_again() -> None:
    """A flood of connections opened a thread each, without bound. With 3 allowed here (64 by
    default) and 3 slow clients holding theirs, the next is answered 503 at once (not held); once
    one slow client closes, a normal client is served the page."""
    server = DashboardServer(DashboardSettings("ws://broker.lab:9001"), port=0, deadline_s=60.0, idle_s=60.0,
                             max_connections=3)
    server.start()
    slow = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(3)]
    try:
        for sock in slow:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n")  # headers never ended
        busy = _raw_answer(server.port, b"GET / HTTP/1.0\r\n\r\n")
        assert busy.startswith(b"HTTP/1.0 503 "), busy[:200]
        assert b"Retry-After: 5" in busy and b"Content-Security-Policy: " in busy
        assert b"Cache-Control: no-store" in busy and b"Referrer-Policy: no-referrer" in busy
        assert busy.endswith(b"dashboard busy: too many connections\r\n")
        assert b"config" not in busy
        slow.pop().close()
        answer = b""
        for _ in range(50):  # the freed slot is released when its thread sees the close
            answer = _raw_answer(server.port, b"GET / HTTP/1.0\r\n\r\n")
            if not answer.startswith(b"HTTP/1.0 503 "):
                break
            time.sleep(0.1)
        assert answer.startswith(b"HTTP/1.0 200 "), answer[:200]
        for _ in range(50):  # the slot taken again, once the served client's thread has let it go
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            sock.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n")
            sock.settimeout(0.3)
            try:
                sock.recv(1)  # answered (503: that thread still held its slot): try again
            except TimeoutError:
                slow.append(sock)  # held: no answer to headers that never end
                break
            sock.close()
            time.sleep(0.1)
        assert len(slow) == 3
        assert _raw_answer(server.port, b"GET / HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.0 503 ")
    finally:
        for sock in slow:
            sock.close()
        server.stop()


# --------------------------------------------------------------------------- the real browser


#: The simulated camera the browser tests' station analyses.
SIMULATED = {"kind": "simulated", "fps": 2.0, "width": 480, "height": 360, "seed": 3, "fields": 100_000}


def _station_config(tmp_path: Path, broker: MosquittoBroker, *, station_id: str = STATION,
                    source: dict[str, Any] = SIMULATED, target_wbc: int = 200, username: str = "station",
                    telemetry_interval_s: float = 2.0) -> Path:
    """tmp_path/station.toml: `smearscope run` as `station_id` on `source`, runs started by command
    only (auto_start off) to `target_wbc` white cells, every white cell sent to review, publishing
    to `broker` as `username` (its password from $CREDENTIALS_DIRECTORY), the outbox under tmp_path/state."""
    doc: dict[str, Any] = {
        "station_id": station_id,
        "source": source,
        "analysis": {"models_dir": str(ROOT / "models")},
        "specimen": {"target_wbc_count": target_wbc, "idle_timeout_s": 600.0, "auto_start": False},
        "review": {"white_cells": "all"},
        "mqtt": {"host": "127.0.0.1", "port": broker.port, "keepalive": 5, "username": username,
                 "password_credential": "mqtt-password", "reconnect_min_delay_s": 1,
                 "reconnect_max_delay_s": 1, "telemetry_interval_s": telemetry_interval_s, "stop_drain_timeout_s": 5,
                 "outbox": {"path": str(tmp_path / "state" / "outbox.sqlite3")}},
    }
    path = tmp_path / "station.toml"
    path.write_text(to_toml(doc) + "\n")
    return path


def _seen(driver: Any, selector: str, attribute: str | None = None) -> str | None:
    """The first element `selector` finds: its text, or its `attribute`; None while there is none, or
    while the page replaces it as it is read."""
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.common.by import By

    try:
        found = driver.find_elements(By.CSS_SELECTOR, selector)
        if not found:
            return None
        return found[0].get_attribute(attribute) if attribute else found[0].text  # type: ignore[no-any-return]
    except WebDriverException:
        return None


class _Proc:
    """A child process whose output goes to a log file; stopped by its PID."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.log = log
        with log.open("w") as out:
            self.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                                         env={**os.environ, **(env or {})})

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def _chromium_options(tmp_path: Path) -> Any:
    """Headless Chromium's options for a test: its own profile, the page's console kept."""
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the page's console
    return options


def _wait(what: str, predicate: Callable[[], bool], timeout: float, logs: list[Path]) -> None:
    if not wait_until(predicate, timeout):
        tails = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in logs if p.exists())
        raise AssertionError(f"timed out waiting for {what}\n{tails}")


@pytest.mark.broker
@needs_chromium
@pytest.mark.skipif(not (ROOT / "models" / "seg.json").exists(), reason="models/seg.json not present")
def test_dashboard_in_chromium_shows_the_station_and_survives_a_broker_restart(
    tmp_path: Path, ws_broker: MosquittoBroker, credentials_dir: Path,
) -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    logs = [tmp_path / "daemon.log", tmp_path / "dashboard.log", tmp_path / "daemon-restarted.log",
            tmp_path / "daemon-third.log"]
    station_args = [sys.executable, "-m", "smearscope", "run", "--config", str(_station_config(tmp_path, ws_broker))]
    daemon = _Proc(station_args, logs[0], {"CREDENTIALS_DIRECTORY": str(credentials_dir)})
    password_file = tmp_path / "dashboard-password"
    password_file.write_text(MQTT_USERS["observer"] + "\n")
    http_port = free_port()
    dashboard = _Proc([sys.executable, "-m", "smearscope", "dashboard", "--port", str(http_port),
                       "--broker", f"ws://127.0.0.1:{ws_broker.ws_port}", "--username", "observer",
                       "--password-file", str(password_file)], logs[1])
    observer = Subscriber(ws_broker.port, "observer", MQTT_USERS["observer"], [f"{BASE}/#"])
    options = _chromium_options(tmp_path)
    driver = None
    try:
        observer.wait_ready()
        wait_for_port(http_port, 20, dashboard.proc)
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
        driver.get(f"http://127.0.0.1:{http_port}/")
        card = f"section.station[data-station='{STATION}']"

        def table(selector: str) -> dict[str, list[str]]:
            """A table's rows by label, their cells' text, read at once: the card renders its tables
            anew with each run state or report (the closed state follows the report it carries), so
            a row found before may be gone, or replaced, by the time it is read."""
            rows = driver.execute_script(
                "return [...document.querySelectorAll(arguments[0])].map((r) => "
                "[r.dataset.label, [...r.cells].map((td) => td.innerText.trim())])", selector)
            return {label: cells for label, cells in rows}

        seen = functools.partial(_seen, driver)

        def command(name: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
            # sent as another dashboard would: MQTT 5 correlation data of its own
            topic = f"{BASE}/cmd_response/{name}"
            before = len(observer.on_topic(topic))
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            props.CorrelationData = b"another-dashboard-1"
            observer.client.publish(f"{BASE}/cmd/{name}", json.dumps(body or {}), qos=1, properties=props)
            _wait(f"answer to {name}", lambda: len(observer.on_topic(topic)) > before, 30, logs)
            return json.loads(observer.on_topic(topic)[-1].payload)

        # The station comes online (retained status through the broker's WebSockets listener).
        _wait("the station online on the page", lambda: seen(f"{card} .status") == "online", 90, logs)
        assert seen("#broker", "data-state") == "connected"
        # nothing the page runs is refused by its own Content-Security-Policy (MQTT.js's keepalive
        # timers in a blob worker were: the broker then closed the page's connection every 30 s)
        refused = [e["message"] for e in driver.get_log("browser") if "Content Security Policy" in e["message"]]
        assert refused == [], refused

        # A run: the page follows it live, then shows its final specimen report.
        run_id = command("start_run", {"target_wbc": 200})["run_id"]
        def fields_shown() -> int:
            found = re.search(r"(\d+) fields?", seen(f"{card} .run-line") or "")
            return int(found.group(1)) if found else 0

        def classified_shown() -> int:
            found = re.match(r"(\d+) / \d+ WBC classified", seen(f"{card} .progress-text") or "")
            return int(found.group(1)) if found else 0

        # Two fields and a white cell at least (some rendered fields show none), so the
        # differential has rows to compare.
        _wait("the run's fields on the page", lambda: seen(card, "data-run-id") == run_id
              and fields_shown() >= 2 and classified_shown() >= 1, 120, logs)
        assert seen(card, "data-shown") == "interim"
        assert "WBC classified" in (seen(f"{card} .progress-text") or "")

        def review_cells() -> int:  # the run's crops kept for review, as its live state says
            states = [json.loads(m.payload) for m in observer.on_topic(f"{BASE}/run")]
            return max([(s.get("review") or {}).get("cells", 0) for s in states if s["run_id"] == run_id] or [0])
        _wait("more crops than one gallery page", lambda: review_cells() >= 24, 120, logs)  # "More" has a page to open
        stopped = command("stop_run")
        assert stopped["ok"] and stopped["run_id"] == run_id
        _wait("the specimen report", lambda: any(json.loads(m.payload)["report_id"] == stopped["report_id"]
                                                 for m in observer.on_topic(f"{BASE}/report")), 30, logs)
        report = Report.model_validate(json.loads(observer.on_topic(f"{BASE}/report")[-1].payload)["body"])
        _wait("the final report on the page", lambda: seen(card, "data-shown") == "final"
              and seen(card, "data-run-id") == run_id, 30, logs)

        # shares and intervals read to one decimal (the report keeps two), an interval's bounds rounded outward
        tenth = lambda v: float(f"{v:.1f}")
        from smearscope.service.fhir.report_view import interval_shown
        expected = {s.label: (s.label, str(s.count), tenth(s.percent), interval_shown(s.ci95_low, s.ci95_high))
                    for s in report.wbc_differential}
        assert expected

        def differential() -> dict[str, tuple[str, str, float, tuple[float, ...]]] | None:
            try:
                return {label: (name, count, float(percent), tuple(float(v) for v in ci.split("–")))
                        for label, (name, count, percent, ci, *_) in table(
                            f"{card} table.differential tbody tr").items()}
            except ValueError:  # a row without an interval ("–"): not the report's
                return None
        _wait("the report's differential on the page", lambda: differential() == expected, 30, logs)
        assert differential() == expected
        morphology = {label: cells[1:4] for label, cells in table(f"{card} table.morphology tbody tr").items()}
        counts = report.counts
        # a share that cannot be assessed (a size class at an estimated scale) shows no placeholder 0
        # a share of fewer red cells than the run counted names them (a size-based one: the whole red cells)
        def share(text: str) -> tuple[float, str]:
            number, _, of = text.partition(" of ")
            return float(number), of
        assert {k: v[1] if v[2] == "not assessable" else share(v[1]) for k, v in morphology.items()} == {
            s.label: "–" if morphology[s.label][2] == "not assessable" else (tenth(s.percent), f"{s.of_cells} RBC" if
                                                                            s.of_cells not in (None, counts.rbc) else "")
            for s in report.rbc_morphology}
        assert all(v[0] == "–" for v in morphology.values() if v[2] == "not assessable")
        morphology = {k: v[1:] for k, v in morphology.items()}
        # the counts beside the differential, as the report has them
        counts = report.counts
        assert (seen(f"{card} .counts") or "").startswith(
            f"RBC {counts.rbc} · WBC {counts.wbc} · platelets {counts.platelet}"), seen(f"{card} .counts")
        # ICSH's "none" (a share below 1+) is not shown as "none" beside a count
        grades = {s.label: s.grade for s in report.rbc_morphology}
        assert "none" in grades.values(), grades

        def shown(label: str, g: str | None) -> str:  # sickle cells: present or none, no 1+ to be below
            return "below 1+" if g == "none" and label not in REPORTED_PRESENT else g or ""
        # a grade whose interval spans other grades shows them
        want = {s.label: shown(s.label, s.grade) + (f" ({shown(s.label, s.grade_ci_low)} to "
                                                    f"{shown(s.label, s.grade_ci_high)})"
                                                    if s.grade and s.grade_ci_low != s.grade_ci_high else "")
                + (f" on {s.graded_count} of {s.count} calls at its flag's confidence"
                   if s.grade and s.graded_count is not None else "")
                for s in report.rbc_morphology}
        # (whether this run's report has such a grade depends on the fields it got: the stations
        # below show one whatever it had)
        assert {k: v[1] for k, v in morphology.items()} == want
        assert seen(f"{card} .diff-source") == "final, preliminary (not verified)"
        flag = driver.execute_script(
            "const f = document.querySelector(arguments[0]); return f && "
            "{shown: f.getClientRects().length > 0, cls: f.className, text: f.innerText};",
            f"{card} li.flag[data-code='specimen_incomplete']")
        assert flag and flag["shown"] and "warning" in flag["cls"], flag
        assert "run ended (stopped)" in flag["text"]
        _wait("the latest field's overlay", lambda: seen(f"{card} img.overlay", "naturalWidth") not in (None, "0"),
              30, logs)
        states = [json.loads(m.payload) for m in observer.on_topic(f"{BASE}/run")]
        closed = next(s for s in states if s["run_id"] == run_id and s["state"] == "closed")
        # every white cell is in the gallery (review white_cells = "all"), each with a type to pick
        assert closed["review"]["cells"] >= 1
        _wait("the review gallery", lambda: len(driver.find_elements(
            By.CSS_SELECTOR, f"{card} .gallery figure select.type[data-kind='wbc']")) > 0, 30, logs)
        from selenium.webdriver.support.ui import Select

        # the page re-renders its gallery as live states and answers arrive (an element found before
        # may go stale): the picker's attributes are read in one script, and it is found again to type
        first = driver.execute_script(
            "const s = document.querySelector(arguments[0]); "
            "return s && {state: s.dataset.state, field: s.dataset.field, cell: Number(s.dataset.cell)};",
            f"{card} .gallery figure select.type[data-kind='wbc']")
        assert first is not None and first["state"] == "untyped", first
        typed_cell = (first["field"], first["cell"])
        assert (seen(f"{card} .typed-count") or "").endswith(": none")  # the station's counts, from the start
        from selenium.common.exceptions import (
            NoSuchElementException,
            StaleElementReferenceException,
        )

        def type_monocyte() -> bool:  # found again until one found is still the page's when picked
            try:
                Select(driver.find_element(
                    By.CSS_SELECTOR, f"{card} .gallery select.type[data-field='{typed_cell[0]}']"
                                     f"[data-cell='{typed_cell[1]}']")).select_by_value("monocyte")
                return True
            except (StaleElementReferenceException, NoSuchElementException):
                return False
        _wait("the cell typed in its picker", type_monocyte, 30, logs)
        _wait("the typed cell stored", lambda: seen(f"{card} .gallery select.type[data-state='saved']") is not None,
              30, logs)
        assert "monocyte 1" in (seen(f"{card} .typed-count") or "")
        from smearscope.service.station.typed_cells import TypedCellStore

        store = TypedCellStore(tmp_path / "state" / "typed_cells.sqlite3", read_only=True)
        try:
            wbc_sha = json.loads((ROOT / "models" / "wbc_head.json").read_text())["sha256"]
            assert store.counts(wbc_sha) == {"monocyte": 1}
        finally:
            store.close()
        # a red cell to review is typed with the RBC head's classes, a white cell with the WBC head's
        page = command("get_review", {"run_id": run_id})
        by_key = {(c["field_id"], c["cell"]): c for c in page["cells"]}
        time.sleep(1)
        pickers = driver.execute_script(
            "return [...arguments[0].querySelectorAll('.gallery figure select.type')].map((s) => "
            "({field: s.dataset.field, cell: Number(s.dataset.cell), kind: s.dataset.kind, "
            "options: [...s.options].slice(1).map((o) => o.value)}))",
            driver.find_element(By.CSS_SELECTOR, card))
        shown = {"rbc": 0, "wbc": 0}
        for p in pickers:
            crop = by_key.get((p["field"], p["cell"]))
            if crop is not None:
                assert p["options"] == (crop.get("types") or page[f"{p['kind']}_types"]), p
                shown[p["kind"]] += 1
        assert shown["rbc"] >= 1 and shown["wbc"] >= 1, shown
        # an unidentified cell's score is its best guess's: never shown as if sure of "unidentified"
        captions = driver.execute_script("return [...document.querySelectorAll(arguments[0])].map((f) => f.textContent)",
                                         f"{card} .gallery figcaption")
        assert captions and not any(re.search(r"unidentified \d+%", t) for t in captions), captions
        if any(c["label"] == "unidentified" for c in page["cells"]):
            assert any(re.search(r"unidentified \((unlike every trained type|no type sure enough: best \d+%)\)", t)
                       for t in captions), captions
        # Another dashboard's answers are not this page's: its page of the gallery from the second
        # crop on does not land in this one (a page that ignored correlation data would append it).
        def in_gallery() -> int:
            return len(driver.find_elements(By.CSS_SELECTOR, f"{card} .gallery figure"))
        # the page's own refresh after the run closed: its gallery holds the first page as it is now
        _wait("the page's gallery up to date", lambda: in_gallery() == len(page["cells"]), 30, logs)
        before = in_gallery()
        assert before >= 2 and command("get_review", {"run_id": run_id, "offset": 1})["cells"]
        observer.client.publish(f"{BASE.rsplit('/', 1)[0]}/zz-sync/status", "online", qos=1)
        _wait("the sync marker on the page", lambda: seen("section.station[data-station='zz-sync'] .status") == "online",
              30, logs)
        assert in_gallery() == before
        # "More" opens the next page, and a refresh (the run's state again, as each new field of an
        # open run sends it) keeps the pages opened: it went back to the first page every field
        assert page["next_offset"] is not None, page["total"]
        driver.find_element(By.CSS_SELECTOR, f"{card} .more").click()
        _wait("the second page of the gallery", lambda: in_gallery() > before, 30, logs)
        opened = in_gallery()
        again = {**closed, "review": {**closed["review"], "cells": closed["review"]["cells"] + 1}}

        def page_offsets() -> list[int]:  # the offsets of the page's own answers (its correlation data)
            return [json.loads(m.payload).get("offset") for m in observer.on_topic(f"{BASE}/cmd_response/get_review")
                    if (m.correlation_data or b"").startswith(b"dashboard-")]
        answered = len(page_offsets())
        observer.client.publish(f"{BASE}/run", json.dumps(again), qos=1, retain=True)
        # the page asks again 0.8 s after a state changes the gallery's count: its first page, then the next
        _wait("the page's pages answered again",
              lambda: 0 in (new := page_offsets()[answered:]) and any(new[new.index(0):]), 30, logs)
        _wait("the gallery refreshed with its pages", lambda: in_gallery() == opened, 30, logs)
        assert in_gallery() == opened
        # a page's answer delivered twice (QoS 1; an answer is sent again after a reconnect) is not
        # added twice: the page's own answer of its second page, published once more
        second = next(m for m in reversed(observer.on_topic(f"{BASE}/cmd_response/get_review"))
                      if (m.correlation_data or b"").startswith(b"dashboard-") and json.loads(m.payload).get("offset"))
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.CorrelationData = second.correlation_data
        observer.client.publish(f"{BASE}/cmd_response/get_review", second.payload, qos=1, properties=props)
        observer.client.publish(f"{BASE.rsplit('/', 1)[0]}/zz-sync2/status", "online", qos=1)
        _wait("the second sync marker",
              lambda: seen("section.station[data-station='zz-sync2'] .status") == "online", 30, logs)
        assert in_gallery() == opened
        # A station calibrated 2x off: its report's flag (a median size no blood has, or red cells
        # pointing to another scale, or the station's checks over its runs pointing away) makes the page read no size-based grade (the shares carry the
        # analyzer's own), shape classes keep theirs.
        # Sickle cells read present or none, never 1+ to 3+: a report from when they were graded
        # (3+ on 2 of 86 red cells, its interval 1+ to 3+) reads present, with no interval; unsure
        # calls alone read none, not "below 1+".
        sickle_rows = {"zz-odd": (ClassShare(label="sickle", count=2, percent=2.33, grade="3+", grade_ci_low="1+",
                                             grade_ci_high="3+"), "present"),
                       "zz-odd2": (ClassShare(label="sickle", count=3, percent=3.0, grade="none", graded_count=0),
                                   "none on 0 of 3 calls at its flag's confidence"),
                       "zz-odd3": (ClassShare(label="sickle", count=3, percent=3.0, grade="none", graded_count=0),
                                   "none on 0 of 3 calls at its flag's confidence")}
        for code, odd_station in (("rbc_size_implausible", "zz-odd"), ("calibration_suspect", "zz-odd2"),
                                  ("calibration_drift_suspected", "zz-odd3")):
            # and a schistocyte grade resting on the 2 sure calls of 12 says so beside its 4 %
            unsure = ClassShare(label="schistocyte", count=12, percent=4.0, grade="1+", grade_ci_low="1+",
                                grade_ci_high="1+", graded_count=2)
            sickle, sickle_shown = sickle_rows[odd_station]
            # and a grade whose 95 % interval spans others (7 of 100 red cells) shows them
            spanning = ClassShare(label="teardrop", count=7, percent=7.0, grade="1+", grade_ci_low="none",
                                  grade_ci_high="2+")
            odd = report.model_copy(update={
                "flags": [*report.flags, Flag(code=code, severity="warning", message="15 um")],
                "rbc_morphology": [*(s for s in report.rbc_morphology
                                     if s.label not in ("schistocyte", "sickle", "teardrop")),
                                   unsure, sickle, spanning,
                                   ClassShare(label="macrocyte", count=40, percent=40.0, grade="3+", grade_ci_low="3+",
                                              grade_ci_high="3+")]})
            state = {"station_id": odd_station, "run_id": "odd-1", "state": "closed", "end_reason": "stopped",
                     "updated_at": time.time(), "progress": {"run_id": "odd-1", "fields": 1, "classified_wbc": 0,
                                                             "target_wbc": 100},
                     "report": odd.model_dump(mode="json", exclude={"cells", "cell_detail"}),
                     "rbc_grades": {}, "review": None}
            observer.client.publish(f"{BASE.rsplit('/', 1)[0]}/{odd_station}/run", json.dumps(state), qos=1)
            odd_card = f"section.station[data-station='{odd_station}']"

            def odd_grades(odd_card=odd_card) -> dict[str, str]:
                return {label: cells[3] for label, cells in table(f"{odd_card} table.morphology tbody tr").items()}
            _wait(f"the {code} station's morphology", lambda: "macrocyte" in odd_grades(), 30, logs)
            shown_odd = odd_grades()
            assert shown_odd["macrocyte"] == "not assessable"
            assert shown_odd["schistocyte"] == "1+ on 2 of 12 calls at its flag's confidence"
            assert shown_odd["sickle"] == sickle_shown
            assert shown_odd["teardrop"] == "1+ (below 1+ to 2+)"
            assert table(f"{odd_card} table.morphology tbody tr")["macrocyte"][1:3] == ["–", "–"]  # not 40, 40.0
            assert all(v != "not assessable" for k, v in shown_odd.items()
                       if k not in ("macrocyte", "microcyte", "spherocyte"))

        # The technician signs the run: its report comes again with the typed cell counted, and
        # the page shows the verified report.
        assert command("verify_run", {"run_id": "nope", "verified_by": "AB"})["error"] == "unknown_run"
        assert command("verify_run", {"run_id": run_id})["error"] == "bad_arguments"
        assert command("verify_run", {"run_id": run_id, "verified_by": "\u0000<b>"})["error"] == "bad_arguments"
        driver.find_element(By.CSS_SELECTOR, f"{card} .verify-by").send_keys("AB")
        driver.find_element(By.CSS_SELECTOR, f"{card} .verify-run").click()
        _wait("the verified report on the page", lambda: seen(card, "data-verified-by") == "AB", 30, logs)
        verified_text = seen(f"{card} .verify-state") or ""
        assert "verified: 1 typed" in verified_text
        left = json.loads(observer.on_topic(f"{BASE}/cmd_response/verify_run")[-1].payload)
        assert left["ok"] and (f"{left['left_to_review']} cells left as the analyzer called them" in verified_text) == (
            left["left_to_review"] > 0)
        assert seen(f"{card} .diff-source") == "verified" and seen(f"{card} .verify-run") == "Sign again"

        def last_report() -> Report:
            return Report.model_validate(json.loads(observer.on_topic(f"{BASE}/report")[-1].payload)["body"])
        # the page follows the run's live state, which may arrive before the report from the outbox
        _wait("the verified report on its topic", lambda: last_report().verification is not None, 30, logs)
        verified = last_report()
        v = verified.verification
        assert v is not None and v.verified_by == "AB" and v.supersedes == report.report_id and v.typed_cells == 1
        assert v.left_to_review == left["left_to_review"]  # the signed report says what was signed unseen
        assert (f"; {left_as_called(v.left_to_review)}" in (
            seen(f"{card} .run-line") or "")) == (v.left_to_review > 0)
        assert verified.run_id == run_id and verified.report_id != report.report_id
        # the typed cell is reclassified unless the analyzer had called it a monocyte too
        assert [(r.field_id, r.cell, r.label) for r in v.reclassified] in ([], [(*typed_cell, "monocyte")])
        assert all(r.machine_label != "monocyte" for r in v.reclassified)
        count = {s.label: s.count for s in verified.wbc_differential}.get("monocyte", 0)
        was = {s.label: s.count for s in report.wbc_differential}.get("monocyte", 0)
        assert count == was + len(v.reclassified)
        _wait("its FHIR bundle", lambda: any(json.loads(m.payload)["identifier"]["value"] == verified.report_id
                                             for m in observer.on_topic(f"{BASE}/fhir")), 30, logs)
        bundle = next(json.loads(m.payload) for m in observer.on_topic(f"{BASE}/fhir")
                      if json.loads(m.payload)["identifier"]["value"] == verified.report_id)
        assert bundle["entry"][0]["resource"]["status"] == "final"
        driver.save_screenshot(str(tmp_path / "dashboard-final.png"))

        # The preliminary report delivered again (at least once): the verified one it was replaced
        # by stays on the page; a marker on another topic, sent after it, shows the page read it.
        first = next(m for m in observer.on_topic(f"{BASE}/report") if json.loads(m.payload)["report_id"] == report.report_id)
        observer.client.publish(f"{BASE}/report", first.payload, qos=1)
        marker = f"{BASE.rsplit('/', 1)[0]}/zz-marker"  # another station's status: its card shows it was read
        observer.client.publish(f"{marker}/status", "online", qos=1)
        _wait("the marker on the page", lambda: seen("section.station[data-station='zz-marker'] .status") == "online",
              30, logs)
        assert seen(card, "data-verified-by") == "AB" and seen(card, "data-run-id") == run_id
        # A reload: the closed run from its retained live state, final and verified, can be signed again.
        driver.refresh()
        _wait("the closed run after a reload", lambda: seen(card, "data-run-id") == run_id
              and seen(card, "data-shown") == "final" and seen(card, "data-verified-by") == "AB", 60, logs)
        assert driver.find_element(By.CSS_SELECTOR, f"{card} .verify").get_attribute("hidden") is None
        # ... and the preliminary report delivered again to this fresh page, which never saw the
        # verified report's own message, does not replace it (the run's retained state says signed)
        observer.client.publish(f"{BASE}/report", first.payload, qos=1)
        observer.client.publish(f"{marker}2/status", "online", qos=1)
        _wait("the second marker", lambda: seen("section.station[data-station='zz-marker2'] .status") == "online",
              30, logs)
        assert seen(card, "data-verified-by") == "AB" and seen(f"{card} .diff-source") == "verified"
        # a station sending one word of 3000 letters wraps it in its own card: the page stays as wide
        # as the window (every card had been widened to 73 000 px)
        long_state = {**closed, "station_id": "zz-long", "run_id": "long-1", "review": None}
        long_state["report"] = {**long_state["report"], "flags": [
            {"code": "x" * 200, "severity": "warning", "message": "y" * 3000}]}
        observer.client.publish(f"{BASE.rsplit('/', 1)[0]}/{'z' * 300}/run", json.dumps(long_state), qos=1)
        _wait("the long-worded station's flag", lambda: seen(
            f"section.station[data-station='{'z' * 300}'] li.flag") is not None, 30, logs)
        width, window = driver.execute_script(
            "return [document.documentElement.scrollWidth, document.documentElement.clientWidth]")
        assert width <= window, (width, window)
        # ... while the tables' figures stay whole: no count or share split over two lines
        driver.set_window_size(1024, 900)
        split = driver.execute_script(
            "return [...document.querySelectorAll('table td.count, table td.percent, table td.label')]"
            ".filter((td) => { const r = document.createRange(); r.selectNodeContents(td);"
            " return new Set([...r.getClientRects()].map((b) => Math.round(b.top))).size > 1; })"
            ".map((td) => td.textContent)")
        assert split == [], split

        # The broker dies: the page says so; it comes back: the page reconnects by itself and
        # live data flows again (a new run, started after the restart).
        station_client, commands = f"smearscope-{STATION}", f"{BASE}/cmd/#"
        subscriptions = ws_broker.subscribed(station_client, commands)
        ws_broker.kill()
        _wait("the page to notice the broker is gone",
              lambda: seen("#broker", "data-state") == "reconnecting", 30, logs)
        assert seen(f"{card} .status") == "unknown (broker unreachable)"  # not the last status it had
        time.sleep(2)
        ws_broker.start()
        _wait("the page reconnected", lambda: seen("#broker", "data-state") == "connected", 60, logs)
        _wait("the station online again", lambda: seen(f"{card} .status") == "online", 60, logs)
        observer.connected.wait(10)
        observer.wait_for(lambda ms: True, 0)
        _wait("the observer back", lambda: observer.connected.is_set(), 30, logs)
        _wait("the station's command subscription renewed in on_connect",
              lambda: ws_broker.subscribed(station_client, commands) > subscriptions, 30, logs)
        second = command("start_run", {"target_wbc": 200})["run_id"]
        # open with no field at start_run ("none"), then its figures with its first field
        _wait("the new run on the page", lambda: seen(card, "data-run-id") == second
              and seen(card, "data-shown") == "interim", 90, logs)
        assert seen(card, "data-halted") == "false"
        driver.save_screenshot(str(tmp_path / "dashboard-recovered.png"))

        # The first run, signed, is no longer the station's current one: the page lists it among
        # the earlier runs (cmd/get_runs), shows it when picked (its report, its gallery), signs
        # it again there, and "current run" brings the open run back.
        runs = f"{card} select.runs"
        def listed() -> str | None:
            return driver.execute_script(
                "const s = document.querySelector(arguments[0]); const o = s && [...s.options]"
                ".find((o) => o.value === arguments[1]); return o ? o.textContent : null;", runs, run_id)
        def pick(value: str) -> None:  # as a user picks an option (the list's options are re-rendered)
            driver.execute_script("const s = document.querySelector(arguments[0]); s.value = arguments[1]; "
                                  "s.dispatchEvent(new Event('change'));", runs, value)
        _wait("the earlier run listed", lambda: listed() is not None, 30, logs)
        entry = listed()
        assert "verified (\u2068AB\u2069)" in entry and seen(f"{card} .runs-pick", "hidden") is None
        pick(run_id)
        _wait("the earlier run shown", lambda: seen(card, "data-run-id") == run_id
              and seen(card, "data-shown") == "final", 30, logs)
        assert seen(card, "data-verified-by") == "AB" and (seen(f"{card} .run-line") or "").startswith("earlier run")
        _wait("its gallery", lambda: len(driver.find_elements(By.CSS_SELECTOR, f"{card} .gallery figure")) > 0,
              30, logs)
        signer = driver.find_element(By.CSS_SELECTOR, f"{card} .verify-by")
        signer.clear()
        signer.send_keys("CD")
        driver.find_element(By.CSS_SELECTOR, f"{card} .verify-run").click()
        _wait("the earlier run signed again", lambda: seen(card, "data-verified-by") == "CD"
              and "verified (\u2068CD\u2069)" in (listed() or ""), 30, logs)
        assert seen(card, "data-run-id") == run_id
        assert listed() == entry.replace("(\u2068AB\u2069)", "(\u2068CD\u2069)")  # the run's start, not the signing time
        _wait("its report on the topic", lambda: any(
            b["run_id"] == run_id and (b.get("verification") or {}).get("verified_by") == "CD"
            for b in (json.loads(m.payload)["body"] for m in observer.on_topic(f"{BASE}/report"))), 30, logs)
        pick("")
        _wait("the current run again", lambda: seen(card, "data-run-id") == second
              and seen(card, "data-shown") == "interim", 30, logs)
        # signed on another dashboard while this page shows the current run: its list says so
        assert command("verify_run", {"run_id": run_id, "verified_by": "EF"})["ok"]
        _wait("the other signature in the list", lambda: "verified (\u2068EF\u2069)" in (listed() or ""), 30, logs)

        # The station is killed mid-run: the broker's last will says it is offline and the page
        # shows the open run halted; restarted within the run's idle timeout, the station takes the
        # run back (the technician goes on with the same slide) and the page shows it in progress.
        daemon.proc.kill()
        daemon.proc.wait(10)
        _wait("the station offline on the page", lambda: seen(f"{card} .status") == "offline", 30, logs)
        assert seen(card, "data-halted") == "true" and "went offline" in (seen(f"{card} .run-line") or "")
        daemon = _Proc(station_args, logs[2], {"CREDENTIALS_DIRECTORY": str(credentials_dir)})
        fields_before = fields_shown()
        _wait("the run going on after the restart", lambda: seen(f"{card} .status") == "online"
              and seen(card, "data-run-id") == second and seen(card, "data-shown") == "interim"
              and fields_shown() > fields_before > 0, 90, logs)
        assert seen(card, "data-halted") == "false" and "in progress" in (seen(f"{card} .run-line") or "")
        # the restarted station kept its crops (the gallery's file): the page shows them again, asked
        # anew (what it showed before the kill wiped here)
        driver.execute_script("arguments[0].querySelector('.gallery').replaceChildren();"
                              "arguments[0].querySelector('.review-count').textContent = '';",
                              driver.find_element(By.CSS_SELECTOR, card))
        _wait("the gallery back after the restart", lambda: len(driver.find_elements(
            By.CSS_SELECTOR, f"{card} .gallery figure")) > 0 and (seen(f"{card} .review-count") or "").startswith("("),
              60, logs)
        assert "keeps no crops" not in seen(f"{card} .review-count")

        # The broker goes away and the station dies meanwhile (no Last Will reaches anyone): when
        # the broker is back without it, the page does not show the station's last status as current.
        ws_broker.kill()
        _wait("the broker gone", lambda: seen("#broker", "data-state") == "reconnecting", 30, logs)
        daemon.proc.kill()
        daemon.proc.wait(10)
        ws_broker.start()
        _wait("the page reconnected", lambda: seen("#broker", "data-state") == "connected", 60, logs)
        time.sleep(2)  # the retained statuses, had there been any, came with the subscription
        assert seen(f"{card} .status") == "unknown", seen(f"{card} .status")
        daemon = _Proc(station_args, logs[3], {"CREDENTIALS_DIRECTORY": str(credentials_dir)})
        _wait("the station back", lambda: seen(f"{card} .status") == "online", 90, logs)
    finally:
        if driver is not None:
            driver.quit()
        observer.close()
        dashboard.stop()
        daemon.stop()
    assert daemon.proc.returncode == 0, daemon.log.read_text()[-3000:]


@pytest.mark.broker
@needs_chromium
def test_a_password_typed_wrong_is_asked_again_not_retried(tmp_path: Path, ws_broker: MosquittoBroker) -> None:
    """A dashboard without a password file asks for one; the broker refuses a wrong one: the page
    says so and asks again (it did retry the same password every second), and the right one connects."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    log = tmp_path / "dashboard.log"
    http_port = free_port()
    dashboard = _Proc([sys.executable, "-m", "smearscope", "dashboard", "--port", str(http_port),
                       "--broker", f"ws://127.0.0.1:{ws_broker.ws_port}", "--username", "observer"], log)
    options = _chromium_options(tmp_path)
    driver = None
    try:
        wait_for_port(http_port, 20, dashboard.proc)
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
        driver.get(f"http://127.0.0.1:{http_port}/")
        form = lambda: driver.find_element(By.ID, "login")
        state = lambda: driver.find_element(By.ID, "broker").get_attribute("data-state")
        _wait("the login form", lambda: form().is_displayed(), 20, [log])
        form().find_element(By.NAME, "password").send_keys("not-the-password")
        form().find_element(By.CSS_SELECTOR, "button").click()
        _wait("the refusal, and the form again", lambda: state() == "refused" and form().is_displayed(), 20, [log])
        time.sleep(2.5)  # no retry of the wrong password meanwhile
        assert state() == "refused" and form().find_element(By.NAME, "password").get_attribute("value") == ""
        form().find_element(By.NAME, "password").send_keys(MQTT_USERS["observer"])
        form().find_element(By.CSS_SELECTOR, "button").click()
        _wait("connected with the right password", lambda: state() == "connected" and not form().is_displayed(),
              20, [log])
    finally:
        if driver is not None:
            driver.quit()
        dashboard.stop()


@pytest.mark.broker
@needs_chromium
def test_every_script_the_page_loads_runs_in_chromium(tmp_path: Path, ws_broker: MosquittoBroker) -> None:
    """Each of index.html's scripts is fetched and runs: one that does not parse takes its functions
    away and only its callers say so (runview.js missing a parenthesis left every card at "no
    specimen run yet", each run state refused with "renderRun is not defined")."""
    scripts = re.findall(r'<script src="([^"]+)"', (STATIC / "index.html").read_text())
    assert "runview.js" in scripts and "dashboard.js" in scripts
    with _page_and_a_station(tmp_path, ws_broker) as (driver, _send, log, url):
        driver.get(url)
        _wait("the page connected", lambda: driver.execute_script(
            "return document.getElementById('broker').dataset.state") == "connected", 30, [log])
        loaded = driver.execute_script("return performance.getEntriesByType('resource')"
                                       ".filter((e) => e.initiatorType === 'script').map((e) => e.name)")
        assert sorted(u.rsplit("/", 1)[-1] for u in loaded) == sorted(src.rsplit("/", 1)[-1] for src in scripts)
        errors = [e["message"] for e in driver.get_log("browser")
                  if e["level"] == "SEVERE" and "favicon.ico" not in e["message"]]
        assert errors == [], errors
        # runview.js's entry points, which dashboard.js calls for every run state
        assert driver.execute_script("return [typeof renderRun, typeof renderRunWithoutFields]") == [
            "function", "function"]


@contextlib.contextmanager
def _page_and_a_station(tmp_path: Path, broker: MosquittoBroker, dashboard_args: tuple[str, ...] = (),
                        ) -> Iterator[tuple[Any, Callable[..., None], Path, str]]:
    """The dashboard in Chromium (`smearscope dashboard` with `dashboard_args` too), and a
    station's account to publish what a station (or another tool) would: messages made by the
    test, no daemon. Yields the driver, send(topic, payload, retain=True, correlation=None) (a
    command's answer: retain=False and the command's MQTT 5 correlation data), the dashboard's log
    and the page's address."""
    import paho.mqtt.client as mqtt
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    log = tmp_path / "dashboard.log"
    password_file = tmp_path / "dashboard-password"
    password_file.write_text(MQTT_USERS["observer"] + "\n")
    http_port = free_port()
    dashboard = _Proc([sys.executable, "-m", "smearscope", "dashboard", "--port", str(http_port),
                       "--broker", f"ws://127.0.0.1:{broker.ws_port}", "--username", "observer",
                       "--password-file", str(password_file), *dashboard_args], log)
    station = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    station.username_pw_set("station", MQTT_USERS["station"])
    station.connect("127.0.0.1", broker.port)
    station.loop_start()

    def send(topic: str, payload: str, retain: bool = True, correlation: bytes | None = None) -> None:
        props = None
        if correlation is not None:
            props = Properties(PacketTypes.PUBLISH)
            props.CorrelationData = correlation
        station.publish(topic, payload, qos=1, retain=retain, properties=props).wait_for_publish(5)

    driver = None
    try:
        wait_for_port(http_port, 20, dashboard.proc)
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=_chromium_options(tmp_path))
        yield driver, send, log, f"http://127.0.0.1:{http_port}/"
    finally:
        if driver is not None:
            driver.quit()
        station.loop_stop()
        station.disconnect()
        dashboard.stop()


def _closed_run_state(report: Report) -> dict[str, Any]:
    """The live run message a station publishes for a closed run with this specimen report (as
    service.station.clinic builds it; no review gallery)."""
    from smearscope.service.fhir.report_view import rbc_grades

    return {"station_id": report.station_id, "run_id": report.run_id, "state": "closed", "end_reason": "stopped",
            "updated_at": time.time(), "review": None, "rbc_grades": rbc_grades(report),
            "progress": {"run_id": report.run_id, "started_by": "auto",
                         "started_at": report.created_at - report.timing_ms.get("run_ms", 0.0) / 1000,
                         "fields": report.fields_analyzed,
                         "classified_wbc": report.counts.wbc, "target_wbc": 100},
            "report": report.model_dump(mode="json", exclude={"cells", "cell_detail"})}


@contextlib.contextmanager
def _print_media(driver: Any) -> Iterator[None]:
    """Print media emulated inside the block (the page as a printout lays it out), the screen's after it
    whatever the block raised."""
    driver.execute_cdp_cmd("Emulation.setEmulatedMedia", {"media": "print"})
    try:
        yield
    finally:
        driver.execute_cdp_cmd("Emulation.setEmulatedMedia", {"media": ""})


def _open_with_runs(driver: Any, send: Callable[..., None], log: Path, url: str, *runs: Report | dict[str, Any],
                    online: bool = False) -> None:
    """Publishes each run (a specimen report, as its station's closed run, or a live run message as it
    stands) retained under its station (said online first, with `online`), opens the page and waits
    until it shows a card for every one."""
    from selenium.webdriver.common.by import By

    for run in runs:
        state = _closed_run_state(run) if isinstance(run, Report) else run
        if online:
            send(f"smearscope/{state['station_id']}/status", "online")
        send(f"smearscope/{state['station_id']}/run", json.dumps(state))
    driver.get(url)
    _wait(f"the {len(runs)} runs", lambda: len(driver.find_elements(
        By.CSS_SELECTOR, "section.station[data-run-id^='run-']")) == len(runs), 20, [log])


def _status(driver: Any, station: str) -> str | None:
    return driver.execute_script(  # type: ignore[no-any-return]
        "const n = document.querySelector(`[data-station='${arguments[0]}'] .status`);"
        "return n ? n.dataset.status : null;", station)


@pytest.mark.broker
@needs_chromium
def test_a_message_the_page_cannot_show_does_not_stall_every_station(tmp_path: Path, ws_broker: MosquittoBroker) -> None:
    """One station's retained run state the page cannot read ("{}", "null": another tool's, or
    another version's) and a specimen report without its tables cost only themselves: another
    station going offline and online again shows at once. The exception they threw stopped MQTT.js
    reading the connection until its keepalive ran out (about 20 s), and the retained state stalled
    it again at every reconnect: that station read "online" for good after it went offline."""
    from selenium.webdriver.common.by import By

    with _page_and_a_station(tmp_path, ws_broker) as (driver, send, log, url):
        send("smearscope/good/status", "online")
        send("smearscope/bad-a/run", "{}")
        send("smearscope/bad-b/run", "null")
        driver.get(url)
        _wait("the good station online", lambda: _status(driver, "good") == "online", 20, [log])
        send("smearscope/bad-a/report", json.dumps({"body": {"kind": "specimen", "report_id": "r"}}), retain=False)
        for want in ("offline", "online", "offline"):
            send("smearscope/good/status", want)
            _wait(f"the good station {want}", lambda: _status(driver, "good") == want, 8, [log])  # noqa: B023
        assert driver.find_element(By.CSS_SELECTOR, "[data-station='bad-a'] .run-line").text in ("", "no specimen run yet")


@pytest.mark.broker
@needs_chromium
def test_sickle_cells_of_red_cells_too_blurred_to_judge_are_not_assessable_not_present(
    tmp_path: Path, ws_broker: MosquittoBroker,
) -> None:
    """A run none of whose fields' red cells were sharp enough (flag rbc_morphology_out_of_focus):
    every morphology row is not assessable, as in its FHIR bundle (dataAbsentReason
    rbc-out-of-focus). The sickle row read "present", with its count and share, beside every
    other row's "not assessable": the page turned any sickle grade but "none" into "present"."""
    from selenium.webdriver.common.by import By

    from smearscope.service.analysis.report import Counts, SizeStats

    def row(label: str, count: int) -> ClassShare:
        return ClassShare(label=label, count=count, percent=round(100 * count / 200, 2), assessable=False)

    report = Report(report_id="r-blurred", kind="specimen", created_at=time.time(), station_id="blurred",
                    run_id="run-blurred", fields_analyzed=4, counts=Counts(rbc=200, wbc=2, platelet=10),
                    wbc_differential=[ClassShare(label="lymphocyte", count=2, percent=100.0)],
                    rbc_morphology=[row("normal", 180), row("target", 12), row("sickle", 8)],
                    rbc_size=SizeStats(n=200, mean_diameter_um=7.4, sd_um=0.6, cv_percent=8.1, median_diameter_um=7.3),
                    ratios={}, cells=[], timing_ms={"run_ms": 60_000.0}, flags=[Flag(
                        code="rbc_morphology_out_of_focus", severity="warning", cells=[],
                        message="red cells too blurred to judge their shape: morphology not graded")])
    state = _closed_run_state(report)
    assert state["rbc_grades"]["sickle"] == "not assessable"
    with _page_and_a_station(tmp_path, ws_broker) as (driver, send, log, url):
        send("smearscope/blurred/status", "online")
        send("smearscope/blurred/run", json.dumps(state))
        driver.get(url)
        rows = lambda: {tr.get_attribute("data-label"): [td.text for td in tr.find_elements(By.TAG_NAME, "td")]
                        for tr in driver.find_elements(By.CSS_SELECTOR, "[data-station='blurred'] .morphology tbody tr")}
        _wait("the run's morphology", lambda: len(rows()) == 3, 20, [log])
        for label, cells in rows().items():
            assert cells[1:] == ["–", "–", "not assessable"], ("run state", label, cells)
        # the report itself, as it arrives on `report` (here with a fifth field, to see it taken)
        body = {**state["report"], "fields_analyzed": 5, "cells": []}
        send("smearscope/blurred/report", json.dumps({"kind": "report", "report_id": "r-blurred", "body": body}),
             retain=False)
        line = lambda: driver.find_element(By.CSS_SELECTOR, "[data-station='blurred'] .run-line").text
        _wait("the specimen report shown", lambda: "5 fields" in line(), 20, [log])
        for label, cells in rows().items():
            assert cells[1:] == ["–", "–", "not assessable"], ("specimen report", label, cells)


@pytest.mark.broker
@needs_chromium
def test_a_share_of_fewer_red_cells_than_the_run_counted_names_them(tmp_path: Path, ws_broker: MosquittoBroker) -> None:
    """A run mixing calibrated fields and fields at an estimated scale: its spherocytes are a share
    of the calibrated fields' red cells (`of_cells`, the FHIR denominator component). The page
    showed "17 8.5" beside "RBC 400" (17 of 400 is 4.25 %) with nothing saying of which cells;
    it now reads "8.5 of 200 RBC", and a share of every red cell stays a bare number."""
    from selenium.webdriver.common.by import By

    from smearscope.service.analysis.report import Counts, SizeStats

    report = Report(report_id="r-mixed", kind="specimen", created_at=time.time(), station_id="mixed",
                    run_id="run-mixed", fields_analyzed=6, counts=Counts(rbc=400, wbc=2, platelet=10),
                    wbc_differential=[ClassShare(label="lymphocyte", count=2, percent=100.0)],
                    rbc_morphology=[ClassShare(label="normal", count=363, percent=90.75),
                                    ClassShare(label="target", count=20, percent=5.0, grade="1+"),
                                    ClassShare(label="spherocyte", count=17, percent=8.5, grade="1+", of_cells=200)],
                    rbc_size=SizeStats(n=200, mean_diameter_um=7.4, sd_um=0.6, cv_percent=8.1, median_diameter_um=7.3),
                    ratios={}, cells=[], timing_ms={"run_ms": 60_000.0}, flags=[Flag(
                        code="sizes_from_calibrated_fields_only", severity="info", cells=[],
                        message="size-based classes are of the calibrated fields' red cells")])
    state = _closed_run_state(report)
    with _page_and_a_station(tmp_path, ws_broker) as (driver, send, log, url):
        send("smearscope/mixed/run", json.dumps(state))
        driver.get(url)
        rows = lambda: {tr.get_attribute("data-label"): tr.find_element(By.CSS_SELECTOR, "td.percent").text
                        for tr in driver.find_elements(By.CSS_SELECTOR, "[data-station='mixed'] .morphology tbody tr")}
        _wait("the run's morphology", lambda: len(rows()) == 3, 20, [log])
        assert rows() == {"normal": "90.8", "target": "5.0", "spherocyte": "8.5 of 200 RBC"}


def test_the_dashboards_password_file_is_read_as_the_stations(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--password-file saved as "UTF-8 with BOM" (a Windows editor) sent the mark as part of the
    password, which the broker refused; the station's credential reader drops it (and only the
    line ending, as the station does)."""
    import argparse

    from smearscope.cli import main
    from smearscope.cli.dashboard import _password

    path = tmp_path / "pw"
    path.write_bytes(b"\xef\xbb\xbfs3cret\r\n")
    assert _password(argparse.Namespace(password_file=path)) == "s3cret"
    path.write_bytes(b"caf\xe9\n")
    assert main(["dashboard", "--broker", "ws://127.0.0.1:1", "--username", "u", "--password-file", str(path)]) == 2
    assert "not UTF-8" in capsys.readouterr().err


@pytest.mark.parametrize("broker", ["ws://tech:hunter2pw@127.0.0.1:9001", "wss://:hunter2pw@broker.lab:9443/mqtt",
                                    "ws://hunter2pw@127.0.0.1:9001", "mqtt://tech:hunter2pw@127.0.0.1:1883"])
def test_a_broker_url_with_an_account_in_it_is_refused_without_showing_it(broker: str) -> None:
    """`--broker ws://user:pass@host` started the dashboard and printed (stdout) and logged the URL,
    password and all. It is refused at start now (exit 2), pointing to --username/--password-file,
    and the password is in nothing the process wrote; a wrong scheme's error no longer echoes it."""
    proc = subprocess.Popen([sys.executable, "-m", "smearscope", "dashboard", "--port", str(free_port()),
                             "--broker", broker], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"the dashboard started with the account in its URL: {out}{err}")
    assert proc.returncode == 2, out + err
    assert "hunter2pw" not in out + err
    assert "--password-file" in err and "--username" in err


def _local(seconds: float, zone: str) -> str:
    """A time as the page shows it to a reader in `zone` (Chromium's en-US short zone name)."""
    from datetime import datetime
    from zoneinfo import ZoneInfo

    t = datetime.fromtimestamp(seconds, ZoneInfo(zone))
    offset = t.utcoffset()
    assert offset is not None
    minutes = int(offset.total_seconds() // 60)
    name = "GMT" if minutes == 0 else f"GMT{'+' if minutes > 0 else '-'}{abs(minutes) // 60}" + (
        f":{abs(minutes) % 60:02d}" if minutes % 60 else "")
    return t.strftime("%Y-%m-%d %H:%M:%S ") + name


def _specimen(station: str, run_id: str, flags: list[Flag], created_at: float) -> Report:
    """A specimen report of 40 fields: 112 white cells, 4000 red cells with sickle cells among them."""
    from smearscope.service.analysis.report import Counts, SizeStats

    return Report(report_id="r-" + run_id, kind="specimen", created_at=created_at, station_id=station,
                  run_id=run_id, fields_analyzed=40, counts=Counts(rbc=4000, wbc=112, platelet=300),
                  wbc_differential=[ClassShare(label="neutrophil", count=60, percent=53.57, ci95_low=44.0, ci95_high=62.0),
                                    ClassShare(label="lymphocyte", count=52, percent=46.43, ci95_low=37.0, ci95_high=56.0)],
                  rbc_morphology=[ClassShare(label="normal", count=3850, percent=96.25),
                                  ClassShare(label="sickle", count=150, percent=3.75, grade="present", graded_count=120)],
                  rbc_size=SizeStats(n=200, mean_diameter_um=7.4, sd_um=0.6, cv_percent=8.1, median_diameter_um=7.3),
                  ratios={}, cells=[], timing_ms={"run_ms": 600_000.0}, flags=flags)


@pytest.mark.broker
@needs_chromium
def test_each_run_shows_when_it_started_and_what_started_it_in_the_readers_time_zone(
    tmp_path: Path, ws_broker: MosquittoBroker, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The run line says when the run started and whether start_run or its first field opened it
    (progress.started_at/started_by), for the open run, the closed one and an earlier one picked
    from get_runs; it showed neither. Every time on the page is the reader's local date and time
    with its zone (a browser in Asia/Kolkata reads "GMT+5:30"): the signing time read as a bare
    "12/6/2026, 9:50:13 PM". An open run's line says when its state was last updated (a run that
    stopped moving read "in progress" for ever)."""
    from selenium.webdriver.common.by import By

    zone = "Asia/Kolkata"
    monkeypatch.setenv("TZ", zone)  # Chromium's, started by the harness below
    first_start, second_start = 1_780_000_000.0, 1_780_003_600.0
    report = _specimen("ward-3", "run-first", [], first_start + 600)
    closed = _closed_run_state(report)
    closed["progress"].update(started_by="command", started_at=first_start)
    opened = {**closed, "state": "open", "end_reason": None}
    answers = Subscriber(ws_broker.port, "observer", MQTT_USERS["observer"], ["smearscope/+/cmd/get_runs"])
    with _page_and_a_station(tmp_path, ws_broker) as (driver, send, log, url):
        answers.wait_ready()
        line = lambda: driver.execute_script(
            "const n = document.querySelector(\"[data-station='ward-3'] .run-line\"); return n ? n.textContent : '';")
        send("smearscope/ward-3/status", "online")
        send("smearscope/ward-3/run", json.dumps(opened))
        driver.get(url)
        _wait("the open run", lambda: "in progress" in line(), 20, [log])
        assert f" · started {_local(first_start, zone)} by start_run · 40 fields · " in line(), line()
        # an open run's figures are as of its last state: when that was (a run that stopped moving)
        assert line().endswith(f"in progress (open) · last update {_local(opened['updated_at'], zone)}"), line()
        send("smearscope/ward-3/run", json.dumps(closed))
        signed_at = first_start + 900
        verified = report.model_copy(update={"report_id": "r-first-v", "verification": Verification(
            verified_by="AB", verified_at=signed_at, supersedes=report.report_id, typed_cells=0, reclassified=[])})
        send("smearscope/ward-3/report", json.dumps({"kind": "report", "report_id": "r-first-v",
                                                      "body": verified.model_dump(mode="json")}), retain=False)
        _wait("the verified report", lambda: "verified specimen report" in line(), 20, [log])
        assert f"started {_local(first_start, zone)} by start_run" in line(), line()
        assert "last update" not in line()  # a final report is not as of a time
        assert f"(verified by AB, {_local(signed_at, zone)})" in line(), line()
        # the next run opens with its first field; the first is an earlier run, from get_runs
        second = {**opened, "run_id": "run-second", "report": {**opened["report"], "run_id": "run-second"},
                  "progress": {**opened["progress"], "run_id": "run-second", "started_by": "auto",
                               "started_at": second_start}}
        before = len(answers.messages)
        send("smearscope/ward-3/run", json.dumps(second))
        _wait("the second run", lambda: "run run-seco" in line(), 20, [log])
        assert f"started {_local(second_start, zone)} with its first field" in line(), line()
        _wait("the page asking for the earlier runs", lambda: len(answers.messages) > before, 20, [log])
        entry = {**closed, "report": verified.model_dump(mode="json", exclude={"cells", "cell_detail"})}
        send("smearscope/ward-3/cmd_response/get_runs", json.dumps({"ok": True, "runs": [entry]}), retain=False)
        option = lambda: driver.execute_script(
            "const o = document.querySelector(\"[data-station='ward-3'] select.runs option[value='run-first']\");"
            "return o ? o.textContent : null;")
        _wait("the earlier run listed", lambda: option() is not None, 20, [log])
        assert f"run run-firs · {_local(first_start, zone)} · " in option(), option()
        driver.execute_script("const s = document.querySelector(\"[data-station='ward-3'] select.runs\");"
                              "s.value = 'run-first'; s.dispatchEvent(new Event('change'));")
        _wait("the earlier run shown", lambda: line().startswith("earlier run run-firs"), 20, [log])
        assert f"started {_local(first_start, zone)} by start_run" in line(), line()
        telemetry_at = second_start + 30
        send("smearscope/ward-3/telemetry", json.dumps({"source": "proc", "read_at": telemetry_at}), retain=False)
        read_at = "[data-station='ward-3'] dd[data-key='read_at']"
        _wait("the telemetry", lambda: driver.find_elements(By.CSS_SELECTOR, read_at), 20, [log])
        assert driver.find_element(By.CSS_SELECTOR, read_at).text == _local(telemetry_at, zone)
    answers.close()


@pytest.mark.broker
@needs_chromium
def test_a_critical_flag_is_said_above_the_card_and_in_the_pages_header(
    tmp_path: Path, ws_broker: MosquittoBroker,
) -> None:
    """Three stations publishing at once, the last one's run with sickle cells (critical): the
    page's header names that station (its card is below the window's fold) and its card says the
    flag above its tables. The flag was one line among the others in the card's middle column,
    below the morphology table: on a busy day, out of sight. An earlier run picked from the list
    keeps the current run's critical flag said (it went with the current run's tables). A run
    without it clears both."""
    from selenium.webdriver.common.by import By

    sickle = Flag(code="sickle_cells_present", severity="critical", cells=[1],
                  message="120 cells typed sickle at confidence 0.8 or more")
    atypical = Flag(code="atypical_wbc_present", severity="warning", cells=[1, 2, 3],
                    message="5 white cells could not be typed")
    with _page_and_a_station(tmp_path, ws_broker) as (driver, send, log, url):
        driver.set_window_size(1200, 700)
        driver.get(url)
        for station, flags in (("ward-a", [atypical]), ("ward-b", []), ("ward-c", [sickle, atypical])):
            send(f"smearscope/{station}/status", "online")
            report = _specimen(station, f"run-{station}", flags, time.time())
            send(f"smearscope/{station}/run", json.dumps(_closed_run_state(report)))
        header = lambda: driver.find_element(By.ID, "critical")
        _wait("the critical finding in the header", lambda: header().is_displayed(), 20, [log])
        assert header().text == "critical finding: ward-c"
        assert driver.title == "CRITICAL: \u2068ward-c\u2069 · smearscope: stations"  # a page in a background tab
        card = driver.find_element(By.CSS_SELECTOR, "[data-station='ward-c']")
        alert = card.find_element(By.CSS_SELECTOR, ".critical-alert")
        assert alert.is_displayed() and alert.text == "CRITICAL: " + sickle.message
        tables = card.find_element(By.CSS_SELECTOR, ".columns")
        assert alert.location["y"] < tables.location["y"]  # above the differential and the flags list
        in_view = "const r = arguments[0].getBoundingClientRect(); return r.top >= 0 && r.bottom <= window.innerHeight;"
        assert not driver.execute_script(in_view, alert)  # scrolled away: the header is what says it
        header().find_element(By.TAG_NAME, "button").click()
        _wait("the card brought into view", lambda: driver.execute_script(in_view, alert), 10, [log])
        for other in ("ward-a", "ward-b"):  # a warning is no alert
            assert not driver.find_element(By.CSS_SELECTOR, f"[data-station='{other}'] .critical-alert").is_displayed()
        # an earlier run picked from the list (none of its own): the current run's flag is still said
        earlier = _closed_run_state(_specimen("ward-c", "run-c0", [atypical], time.time() - 3600))
        send("smearscope/ward-c/cmd_response/get_runs", json.dumps({"ok": True, "runs": [earlier]}), retain=False)
        pick = ("const s = document.querySelector(\"[data-station='ward-c'] select.runs\");"
                "if (![...s.options].some((o) => o.value === arguments[0])) return false;"
                "s.value = arguments[0]; s.dispatchEvent(new Event('change')); return true;")
        _wait("the earlier run shown", lambda: driver.execute_script(pick, "run-c0") and card.get_attribute(
            "data-run-id") == "run-c0", 20, [log])
        assert alert.is_displayed() and alert.text == "CRITICAL (current run): " + sickle.message, alert.text
        assert header().text == "critical finding: ward-c"
        driver.execute_script(pick, "")
        _wait("the current run again", lambda: card.get_attribute("data-run-id") == "run-ward-c", 20, [log])
        assert alert.text == "CRITICAL: " + sickle.message
        # the station's next run, no sickle cells: the alert goes
        send("smearscope/ward-c/run", json.dumps(_closed_run_state(_specimen("ward-c", "run-c2", [atypical], time.time()))))
        _wait("the alert gone", lambda: not header().is_displayed() and not alert.is_displayed(), 20, [log])
        assert driver.title == "smearscope: stations"


def _open_with_station_online(driver: Any, send: Any, log: Path, url: str, station: str) -> None:
    """The page opened, then `station` said online (retained status), and its card showing it."""
    driver.get(url)
    send(f"smearscope/{station}/status", "online")
    _wait("the station", lambda: _status(driver, station) == "online", 20, [log])


@pytest.mark.broker
@needs_chromium
def test_a_stations_telemetry_reads_as_its_last_sample_once_it_is_offline(
    tmp_path: Path, ws_broker: MosquittoBroker, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Telemetry is not retained: when the station goes offline (its Last Will) or the broker is
    out of reach, the card's samples are its last, greyed, with their time and why ("last sample at
    ...; the station is offline"). They read as current, beside an "offline" badge. A new sample
    from the station back online reads as current again."""
    from selenium.webdriver.common.by import By

    zone = "Europe/Berlin"
    monkeypatch.setenv("TZ", zone)
    with _page_and_a_station(tmp_path, ws_broker) as (driver, send, log, url):
        _open_with_station_online(driver, send, log, url, "ward-t")
        sampled = time.time()
        send("smearscope/ward-t/telemetry", json.dumps({"source": "proc", "cpu_percent": 12.5, "read_at": sampled}),
             retain=False)
        card = "[data-station='ward-t']"
        stale = lambda: driver.find_element(By.CSS_SELECTOR, f"{card} dl.telemetry").get_attribute("data-stale")
        age = lambda: driver.find_element(By.CSS_SELECTOR, f"{card} .telemetry-age").text
        _wait("the sample", lambda: driver.find_elements(By.CSS_SELECTOR, f"{card} dd[data-key='cpu_percent']"), 20, [log])
        assert stale() == "false" and age() == ""
        send("smearscope/ward-t/status", "offline")
        _wait("the station offline", lambda: _status(driver, "ward-t") == "offline", 20, [log])
        assert stale() == "true"
        assert age() == f"(last sample at {_local(sampled, zone)}; the station is offline)", age()
        send("smearscope/ward-t/status", "online")
        _wait("the station online", lambda: _status(driver, "ward-t") == "online", 20, [log])
        # back online, the sample shown is still from before: stale until the station sends one
        assert stale() == "true" and age() == f"(last sample at {_local(sampled, zone)}; from before the station was away)"
        sampled = time.time()
        send("smearscope/ward-t/telemetry", json.dumps({"source": "proc", "read_at": sampled}), retain=False)
        _wait("a new sample", lambda: stale() == "false", 20, [log])
        assert age() == ""
        ws_broker.kill()  # out of reach: no status is known, the samples are the last ones
        _wait("the broker gone", lambda: stale() == "true", 30, [log])
        assert age() == f"(last sample at {_local(sampled, zone)}; broker unreachable)", age()
        ws_broker.start()
        # the test's station client reconnects by itself, and says online again as a station does
        for _ in range(60):
            with contextlib.suppress(Exception):  # not reconnected yet
                send("smearscope/ward-t/status", "online")
            if _status(driver, "ward-t") == "online":
                break
            time.sleep(0.5)
        _wait("the station online again", lambda: _status(driver, "ward-t") == "online", 10, [log])
        # the sample shown is from before the outage: stale until the station sends one
        assert stale() == "true" and age() == f"(last sample at {_local(sampled, zone)}; from before the station was away)"
        send("smearscope/ward-t/telemetry", json.dumps({"source": "proc", "read_at": time.time()}), retain=False)
        _wait("a new sample", lambda: stale() == "false", 20, [log])
        assert age() == ""


@pytest.mark.broker
@needs_chromium
def test_a_station_whose_telemetry_stops_is_said_not_heard_from_while_the_broker_holds_it_online(
    tmp_path: Path, ws_broker: MosquittoBroker,
) -> None:
    """A station that hangs keeps its "online" until the broker's keepalive gives up on it (about
    45 s), and the page showed its last sample as current all that while. Its samples say their
    period (interval_s): two periods without one, the card says "not heard from: no telemetry for
    N s, expected every M s", and the next sample clears it. The station here is the test's own
    client, which stays connected (the broker never takes it offline) and stops sending."""
    from selenium.webdriver.common.by import By

    with _page_and_a_station(tmp_path, ws_broker) as (driver, send, log, url):
        _open_with_station_online(driver, send, log, url, "ward-s")
        silence = lambda: driver.find_element(By.CSS_SELECTOR, "[data-station='ward-s'] .silence")
        send("smearscope/ward-s/telemetry", json.dumps({"source": "proc", "read_at": time.time(), "interval_s": 1}),
             retain=False)
        _wait("the sample", lambda: driver.find_elements(By.CSS_SELECTOR, "[data-station='ward-s'] dd[data-key='source']"),
              20, [log])
        _wait("the station said not heard from", lambda: silence().get_attribute("data-overdue") == "true", 30, [log])
        text = silence().text
        assert silence().is_displayed() and _status(driver, "ward-s") == "online"
        assert re.fullmatch(r"not heard from: no telemetry for (\d+) s, expected every 1 s", text), text
        assert int(re.findall(r"\d+", text)[0]) >= 2
        send("smearscope/ward-s/telemetry", json.dumps({"source": "proc", "read_at": time.time(), "interval_s": 1}),
             retain=False)
        _wait("the mark cleared", lambda: silence().get_attribute("data-overdue") == "false", 20, [log])
        assert not silence().is_displayed() and silence().text == ""


@pytest.mark.broker
@needs_chromium
def test_a_telemetry_time_from_a_station_whose_clock_reads_1970_is_shown_as_that_date(
    tmp_path: Path, ws_broker: MosquittoBroker, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A station whose clock was never set samples at a 1970 time: `read_at` 86500.0 was shown as
    the raw number (only values above 1e9 read as times). It reads as the date and time it is,
    1970-01-02, which shows the station's clock is wrong; other numbers stay numbers."""
    from selenium.webdriver.common.by import By

    zone = "Europe/Berlin"
    monkeypatch.setenv("TZ", zone)
    with _page_and_a_station(tmp_path, ws_broker) as (driver, send, log, url):
        _open_with_station_online(driver, send, log, url, "ward-c")
        send("smearscope/ward-c/telemetry", json.dumps({"source": "proc", "read_at": 86500.0, "cpu_percent": 12.5}),
             retain=False)
        read_at = "[data-station='ward-c'] dd[data-key='read_at']"
        _wait("the sample", lambda: driver.find_elements(By.CSS_SELECTOR, read_at), 20, [log])
        assert driver.find_element(By.CSS_SELECTOR, read_at).text == _local(86500.0, zone) == "1970-01-02 01:01:40 GMT+1"
        assert driver.find_element(By.CSS_SELECTOR, "[data-station='ward-c'] dd[data-key='cpu_percent']").text == "12.5"


@pytest.mark.broker
@needs_chromium
def test_counts_read_as_cells_counted_and_shares_say_of_which_cells(tmp_path: Path, ws_broker: MosquittoBroker) -> None:
    """The run's counts are the cells counted on the smear, not concentrations: "WBC 112 ·
    platelets 300" alone read as 112 and 300 x 10^9/L (300 a normal platelet count). The line now
    says what they are, and the tables' share columns say of which cells (% of WBC, % of RBC)."""
    from selenium.webdriver.common.by import By

    report = _specimen("ward-u", "run-u", [], time.time())
    with _page_and_a_station(tmp_path, ws_broker) as (driver, send, log, url):
        send("smearscope/ward-u/run", json.dumps(_closed_run_state(report)))
        driver.get(url)
        card = "[data-station='ward-u']"
        counts = lambda: driver.execute_script(
            "const n = document.querySelector(arguments[0]); return n ? n.innerText : '';", f"{card} .counts-line")
        _wait("the run's counts", lambda: "RBC 4000" in counts(), 20, [log])
        assert counts() == "Cells counted on the smear (not per litre): RBC 4000 · WBC 112 · platelets 300", counts()
        heads = {table: [th.text for th in driver.find_elements(By.CSS_SELECTOR, f"{card} table.{table} th")]
                 for table in ("differential", "morphology")}
        assert heads == {"differential": ["Cell", "n", "% of WBC", "95% CI (%)", ""],
                         "morphology": ["Finding", "n", "% of RBC", "ICSH grade"]}, heads


@pytest.mark.broker
@needs_chromium
def test_a_report_from_before_nrbc_were_counted_apart_says_its_erythroblasts_are_nrbc(
    tmp_path: Path, ws_broker: MosquittoBroker,
) -> None:
    """A report of schema 1.0 (an earlier run a station stored before its upgrade) counted
    erythroblasts among the white cells, a row of its differential, and has no counts.nrbc: the
    page listed "erythroblast 12, 10.71 % of WBC" as one more white cell and gave no NRBC per 100
    WBC, where the FHIR export reads them as nucleated red cells (12 per 100 of the other 100 white
    cells). The row now says what it is and the counts line gives NRBC per 100 WBC as the export does."""
    from smearscope.service.fhir import report_view

    report = _specimen("ward-n", "run-n", [], time.time()).model_copy(update={
        "schema_version": "1.0",
        "wbc_differential": [ClassShare(label="neutrophil", count=55, percent=49.11, ci95_low=40.0, ci95_high=58.0),
                             ClassShare(label="lymphocyte", count=45, percent=40.18, ci95_low=31.0, ci95_high=49.0),
                             ClassShare(label="erythroblast", count=12, percent=10.71, ci95_low=6.0, ci95_high=18.0)]})
    assert report_view.nrbc_per_100_wbc(report) == (12.0, 12, 100)  # the export's reading
    with _page_and_a_station(tmp_path, ws_broker) as (driver, send, log, url):
        send("smearscope/ward-n/run", json.dumps(_closed_run_state(report)))
        driver.get(url)
        card = "[data-station='ward-n']"
        counts = lambda: driver.execute_script(
            "const n = document.querySelector(arguments[0]); return n ? n.innerText : '';", f"{card} .counts-line")
        _wait("the run's counts", lambda: "RBC 4000" in counts(), 20, [log])
        assert counts() == ("Cells counted on the smear (not per litre): RBC 4000 · WBC 112 · platelets 300 · "
                            "NRBC 12 (12.0 per 100 WBC; this older report counts them among the 112 WBC)"), counts()
        rows = driver.execute_script(
            "return [...document.querySelectorAll(arguments[0])].map((r) => [...r.cells].slice(0, 3).map((td) => "
            "td.innerText.trim()))", f"{card} table.differential tbody tr")
        assert rows == [["neutrophil", "55", "49.1"], ["lymphocyte", "45", "40.2"],
                        ["erythroblast (NRBC, not a white cell)", "12", "10.7"]], rows


@pytest.mark.broker
@needs_chromium
def test_verify_on_an_offline_station_says_so_at_once_and_sends_nothing(
    tmp_path: Path, ws_broker: MosquittoBroker,
) -> None:
    """A station offline keeps no MQTT session (clean start): a verify_run sent to it is lost. The
    page sent it anyway and said "no answer from the station" 15 s later; it now says at once that
    the station is offline and cannot sign, and sends nothing; so do a type picked under a crop
    and "More" (which hid itself until a page that never came). Online, the command goes out."""
    from selenium.webdriver.common.by import By

    report = _specimen("ward-v", "run-v", [], time.time())
    commands = Subscriber(ws_broker.port, "observer", MQTT_USERS["observer"], ["smearscope/ward-v/cmd/#"])
    try:
        with _page_and_a_station(tmp_path, ws_broker) as (driver, send, log, url):
            commands.wait_ready()
            send("smearscope/ward-v/status", "offline")
            send("smearscope/ward-v/run", json.dumps(_closed_run_state(report)))
            driver.get(url)
            card = "[data-station='ward-v']"
            _wait("the offline station's run", lambda: _status(driver, "ward-v") == "offline" and driver.execute_script(
                "const n = document.querySelector(arguments[0]); return n !== null && !n.hidden;", f"{card} .verify"),
                  20, [log])
            driver.find_element(By.CSS_SELECTOR, f"{card} .verify-by").send_keys("AB")
            driver.find_element(By.CSS_SELECTOR, f"{card} .verify-run").click()
            state = lambda: driver.find_element(By.CSS_SELECTOR, f"{card} .verify-state")
            assert state().get_attribute("data-state") == "error"
            assert state().text == "the station is offline: it cannot sign the run now", state().text
            # ... nor a type picked under a crop of the run's gallery (the station answered its page before)
            import base64

            import cv2
            import numpy as np
            from selenium.webdriver.support.ui import Select

            crop = base64.b64encode(cv2.imencode(".jpg", np.full((8, 8, 3), 200, np.uint8))[1].tobytes()).decode()
            send("smearscope/ward-v/cmd_response/get_review", json.dumps({
                "ok": True, "run_id": "run-v", "offset": 0, "total": 1, "not_kept": 0, "next_offset": None,
                "wbc_types": ["lymphocyte", "monocyte"], "rbc_types": ["normal"], "overlay": None,
                "cells": [{"field_id": "f1", "cell": 3, "kind": "wbc", "label": "unidentified", "label_score": 0.4,
                           "atypical": False, "typeable": True, "jpeg": crop}]}), retain=False)
            picker = f"{card} .gallery select.type"
            _wait("the gallery", lambda: driver.find_elements(By.CSS_SELECTOR, picker), 20, [log])
            Select(driver.find_element(By.CSS_SELECTOR, picker)).select_by_value("monocyte")
            assert driver.find_element(By.CSS_SELECTOR, picker).get_attribute("data-state") == "error"
            assert driver.find_element(By.CSS_SELECTOR, picker).get_attribute("title") == (
                "the station is offline: the type was not saved")
            # said in words under the crop, not only by the list's pink (a tooltip a tablet never shows)
            figure = lambda: driver.find_element(By.CSS_SELECTOR, f"{card} .gallery figure")
            assert figure().text.splitlines()[-1] == "not saved: the station is offline", figure().text
            # ... nor "More" (the gallery's next page): the button stays, saying why nothing came
            send("smearscope/ward-v/cmd_response/get_review", json.dumps({
                "ok": True, "run_id": "run-v", "offset": 0, "total": 30, "not_kept": 0, "next_offset": 1,
                "wbc_types": ["lymphocyte", "monocyte"], "rbc_types": ["normal"], "overlay": None,
                "cells": [{"field_id": "f1", "cell": 3, "kind": "wbc", "label": "unidentified", "label_score": 0.4,
                           "atypical": False, "typeable": True, "jpeg": crop}]}), retain=False)
            more = lambda: driver.find_element(By.CSS_SELECTOR, f"{card} .more")
            _wait("More", lambda: more().is_displayed(), 20, [log])
            more().click()
            assert more().is_displayed()
            assert driver.find_element(By.CSS_SELECTOR, f"{card} .review-note").text == (
                "the station is offline: its other crops come when it is back")
            time.sleep(1)  # a command would have reached the broker by now
            assert [m.topic for m in commands.messages
                    if m.topic.endswith(("/verify_run", "/type_cells", "/get_review"))] == []
            send("smearscope/ward-v/status", "online")
            _wait("the station online", lambda: _status(driver, "ward-v") == "online", 20, [log])
            # back online: the gallery is asked again (it was not while the station was away)
            _wait("the gallery asked", lambda: any(m.topic.endswith("/cmd/get_review") for m in commands.messages),
                  20, [log])
            assert driver.find_element(By.CSS_SELECTOR, f"{card} .review-note").text == ""
            driver.find_element(By.CSS_SELECTOR, f"{card} .verify-run").click()
            _wait("the command sent", lambda: any(m.topic.endswith("/cmd/verify_run") for m in commands.messages),
                  20, [log])
            assert state().text == "verifying…"
            # a type picked online: saving, then the station's answer for the cell, in words
            Select(driver.find_element(By.CSS_SELECTOR, picker)).select_by_value("lymphocyte")
            assert figure().text.splitlines()[-1] == "saving…", figure().text
            _wait("the command sent", lambda: any(m.topic.endswith("/cmd/type_cells") for m in commands.messages),
                  20, [log])
            send("smearscope/ward-v/cmd_response/type_cells", json.dumps({
                "ok": False, "run_id": "run-v", "cells": [],
                "errors": [{"field_id": "f1", "cell": 3, "error": "not_typeable", "message": "the run is closed"}]}),
                 retain=False)
            _wait("the refusal said", lambda: figure().text.splitlines()[-1] == "not saved: the run is closed", 20, [log])
            assert driver.find_element(By.CSS_SELECTOR, picker).get_attribute("data-state") == "error"
            Select(driver.find_element(By.CSS_SELECTOR, picker)).select_by_value("monocyte")
            send("smearscope/ward-v/cmd_response/type_cells", json.dumps({
                "ok": True, "run_id": "run-v", "cells": [{"field_id": "f1", "cell": 3, "type": "monocyte"}]}),
                 retain=False)
            _wait("the type saved", lambda: figure().text.splitlines()[-1] == "saved", 20, [log])
    finally:
        commands.close()


@pytest.mark.broker
@needs_chromium
def test_a_new_field_refreshes_the_opened_gallery_pages_without_shrinking_it(
    tmp_path: Path, ws_broker: MosquittoBroker,
) -> None:
    """A run with hundreds of crops to review: the technician has opened three pages ("More"
    twice) when a field adds crops. The page asked the three pages again, as it should, but emptied
    the gallery at the first answer: it shrank to 24 crops and grew back page by page at every
    field, the page's scroll jumping with it. The pages are now gathered apart and swapped in at
    once; the gallery never holds fewer than the 72 crops shown."""
    import base64

    import cv2
    import numpy as np
    import paho.mqtt.client as mqtt
    from selenium.webdriver.common.by import By

    crop = base64.b64encode(cv2.imencode(".jpg", np.full((80, 80, 3), 200, np.uint8))[1].tobytes()).decode()
    total = {"n": 300, "generation": 1}
    asked: list[int] = []

    def answer(client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        """The station's get_review: pages of 24 crops of the run, their field ids by generation."""
        offset = json.loads(msg.payload).get("offset", 0)
        asked.append(offset)
        n, generation = total["n"], total["generation"]
        cells = [{"field_id": f"g{generation}-f{i // 10}", "cell": i % 10, "kind": "wbc", "label": "unidentified",
                  "label_score": 0.4, "atypical": False, "typeable": True, "jpeg": crop}
                 for i in range(offset, min(offset + 24, n))]
        props = mqtt.Properties(mqtt.PacketTypes.PUBLISH)
        if msg.properties is not None and getattr(msg.properties, "CorrelationData", None):
            props.CorrelationData = msg.properties.CorrelationData
        client.publish("smearscope/ward-g/cmd_response/get_review", json.dumps({
            "ok": True, "run_id": "run-g", "offset": offset, "total": n, "not_kept": 0,
            "next_offset": offset + 24 if offset + 24 < n else None, "wbc_types": ["lymphocyte", "monocyte"],
            "rbc_types": ["normal"], "overlay": None, "cells": cells}), qos=1, properties=props)

    responder = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    responder.username_pw_set("station", MQTT_USERS["station"])
    responder.on_message = answer
    responder.on_connect = lambda c, *a: c.subscribe("smearscope/ward-g/cmd/get_review", qos=1)
    responder.connect("127.0.0.1", ws_broker.port)
    responder.loop_start()
    state = _closed_run_state(_specimen("ward-g", "run-g", [], time.time()))
    state.update(state="open", end_reason=None, review={"cells": 300, "not_kept": 0, "overlays": 0})
    try:
        with _page_and_a_station(tmp_path, ws_broker) as (driver, send, log, url):
            send("smearscope/ward-g/status", "online")
            send("smearscope/ward-g/run", json.dumps(state))
            driver.get(url)
            card = "[data-station='ward-g']"
            figures = lambda: len(driver.find_elements(By.CSS_SELECTOR, f"{card} .gallery figure"))
            more = lambda: driver.find_element(By.CSS_SELECTOR, f"{card} .more")
            _wait("the first page", lambda: figures() == 24 and more().is_displayed(), 20, [log])
            for shown in (48, 72):
                more().click()
                _wait(f"{shown} crops", lambda: figures() == shown and more().is_displayed(), 20, [log])  # noqa: B023
            driver.execute_script(
                "const g = document.querySelector(arguments[0]); window.fewest = g.children.length;"
                "new MutationObserver(() => { window.fewest = Math.min(window.fewest, g.children.length); })"
                ".observe(g, {childList: true});", f"{card} .gallery")
            before = len(asked)
            total.update(n=330, generation=2)  # a field: 30 more crops
            send("smearscope/ward-g/run", json.dumps({**state, "review": {**state["review"], "cells": 330}}))
            first_field = lambda: driver.execute_script(
                "const s = document.querySelector(arguments[0]); return s ? s.dataset.field : null;",
                f"{card} .gallery select.type")
            _wait("the three pages asked again and shown", lambda: asked[before:] == [0, 24, 48]
                  and (first_field() or "").startswith("g2-") and more().is_displayed(), 20, [log])
            assert figures() == 72 and driver.execute_script("return window.fewest") == 72
            assert driver.find_element(By.CSS_SELECTOR, f"{card} .review-count").text == "(72 of 330)"
    finally:
        responder.loop_stop()
        responder.disconnect()


@pytest.mark.broker
@needs_chromium
def test_a_jetsons_telemetry_shows_the_stations_pipeline_not_jtops_raw_stats(
    tmp_path: Path, ws_broker: MosquittoBroker,
) -> None:
    """A Jetson station's sample (jtop's stats summarized by device.telemetry, as the station
    sends them): the page listed its first 14 values, all summaries, temperatures and jtop's raw
    stats, so a full disk or an outbox backlog (the pipeline's) never showed. The pipeline now
    comes first, a full disk in red, and jtop's raw stats are not listed."""
    import datetime as dt

    from selenium.webdriver.common.by import By

    from smearscope.device.telemetry import summarize_jtop_stats

    stats: dict[str, Any] = {"time": dt.datetime(2026, 12, 6, 9, 0), "uptime": dt.timedelta(hours=5),
                             **{f"CPU{i}": 20 + i for i in range(1, 13)}, "RAM": 0.41, "SWAP": 0.0, "EMC": 12,
                             "GPU": 63.0, "APE": "OFF", "NVENC": "OFF", "NVDEC": "OFF", "NVJPG": "OFF",
                             "Fan pwmfan0": 38.0, **{f"Temp {z}": 45.0 + i for i, z in enumerate(
                                 ("cpu", "cv0", "cv1", "cv2", "gpu", "soc0", "soc1", "soc2", "tj"))},
                             "Power VDD_GPU_SOC": 5200, "Power VDD_CPU_CV": 1900, "Power VIN_SYS_5V0": 3100,
                             "Power TOT": 10200, "jetson_clocks": "ON", "nvp model": "MAXN"}
    sample = {**summarize_jtop_stats(stats), "source": "jtop", "read_at": time.time(),
              "pipeline": {"fields_analysed": 812, "rejected": 3, "failed": 0, "frames_dropped": 0,
                           "disk_full": True, "outbox_messages": 1234, "source_state": "reconnect_wait",
                           "camera_hung_calls": 2, "camera_stuck_threads": 1,
                           "camera_last_hang_at": time.time() - 60, "camera_recovering": True}}
    with _page_and_a_station(tmp_path, ws_broker) as (driver, send, log, url):
        _open_with_station_online(driver, send, log, url, "jetson")
        send("smearscope/jetson/telemetry", json.dumps(sample), retain=False)
        shown = lambda: {dd.get_attribute("data-key"): dd for dd in driver.find_elements(
            By.CSS_SELECTOR, "[data-station='jetson'] dl.telemetry dd")}
        _wait("the sample", lambda: len(shown()) > 0, 20, [log])
        values = {k: dd.text for k, dd in shown().items()}
        assert values["pipeline.disk_full"] == "true" and values["pipeline.outbox_messages"] == "1234", values
        assert "alarm" in shown()["pipeline.disk_full"].get_attribute("class")
        # a camera recovering from a hang (no frame since): what it does now, and the hang marked
        assert values["pipeline.source_state"] == "reconnect_wait" and values["pipeline.camera_hung_calls"] == "2"
        assert "alarm" in shown()["pipeline.camera_recovering"].get_attribute("class")
        assert "alarm" not in shown()["pipeline.camera_hung_calls"].get_attribute("class")
        assert values["pipeline.camera_last_hang_at"] and "." not in values["pipeline.camera_last_hang_at"], values
        assert not [k for k in values if k.startswith("jtop.")], values
        # the machine's summaries and every temperature zone still listed
        assert values["cpu_percent"] == "26.5" and values["gpu_percent"] == "63" and values["source"] == "jtop"
        assert {k for k in values if k.startswith("temperatures_c.")} == {
            f"temperatures_c.{z}" for z in ("cpu", "cv0", "cv1", "cv2", "gpu", "soc0", "soc1", "soc2", "tj")}


@pytest.mark.broker
@needs_chromium
def test_a_station_without_a_run_says_so(tmp_path: Path, ws_broker: MosquittoBroker) -> None:
    """A station online before its first run (its status alone, no run state): its card read
    empty tables under a bare "Cells counted on the smear" and a blank telemetry list. It now says
    "no specimen run yet" and "no sample yet", and shows no counts line; a run and a sample replace both."""
    from selenium.webdriver.common.by import By

    with _page_and_a_station(tmp_path, ws_broker) as (driver, send, log, url):
        _open_with_station_online(driver, send, log, url, "ward-n")
        card = driver.find_element(By.CSS_SELECTOR, "[data-station='ward-n']")
        assert card.find_element(By.CSS_SELECTOR, ".run-line").text == "no specimen run yet"
        assert not card.find_element(By.CSS_SELECTOR, ".counts-line").is_displayed()
        assert card.find_element(By.CSS_SELECTOR, ".telemetry-none").text == "no sample yet"
        send("smearscope/ward-n/run", json.dumps(_closed_run_state(_specimen("ward-n", "run-n", [], time.time()))))
        send("smearscope/ward-n/telemetry", json.dumps({"source": "proc", "read_at": time.time()}), retain=False)
        _wait("the run and the sample", lambda: card.find_element(By.CSS_SELECTOR, ".counts-line").is_displayed()
              and not card.find_element(By.CSS_SELECTOR, ".telemetry-none").is_displayed(), 20, [log])
        assert card.find_element(By.CSS_SELECTOR, ".run-line").text.startswith("run run-n · ")


@pytest.mark.broker
@needs_chromium
def test_a_report_from_before_each_size_class_was_listed_shows_all_three_not_assessable(
    tmp_path: Path, ws_broker: MosquittoBroker,
) -> None:
    """A closed run of the previous version (its retained state, or get_runs from its outbox file)
    under a calibration in doubt lists only the size-based class a cell was given (spherocyte): its
    FHIR bundle and the state's rbc_grades read microcyte and macrocyte not assessable, but the page
    had no row for them, which reads as none seen. It now lists all three, "–" and not assessable."""
    from selenium.webdriver.common.by import By

    old = _specimen("ward-o", "run-o", [Flag(code="calibration_suspect", severity="warning", cells=[],
                                             message="the red cells point to 0.1 um/px")], time.time())
    old = old.model_copy(update={"rbc_morphology": [
        ClassShare(label="normal", count=3990, percent=99.75),
        ClassShare(label="spherocyte", count=10, percent=0.25, assessable=False)]})
    state = _closed_run_state(old)
    assert {state["rbc_grades"][k] for k in SIZE_BASED} == {"not assessable"}  # the station's own reading
    with _page_and_a_station(tmp_path, ws_broker) as (driver, send, log, url):
        send("smearscope/ward-o/run", json.dumps(state))
        driver.get(url)
        rows = lambda: {tr.get_attribute("data-label"): [td.text for td in tr.find_elements(By.TAG_NAME, "td")[1:]]
                        for tr in driver.find_elements(By.CSS_SELECTOR, "[data-station='ward-o'] .morphology tbody tr")}
        _wait("the run's morphology", lambda: len(rows()) >= 2, 20, [log])
        assert rows() == {"normal": ["3990", "99.8", ""], **{k: ["–", "–", "not assessable"] for k in SIZE_BASED}}, rows()


@pytest.mark.broker
@needs_chromium
def test_a_long_run_line_leaves_the_stations_name_and_status_whole(tmp_path: Path, ws_broker: MosquittoBroker) -> None:
    """An open run of a station gone offline: its line (start, fields, halted, last update) is
    long, and it squeezed the card's head: the name read "ward-" over "2" and the badge "offlin"
    over "e" in a 1500 px window. Name and status now stay on one line each; the run line wraps."""
    state = _closed_run_state(_specimen("ward-2", "run-bbbbbbbb", [], time.time()))
    state.update(state="open", end_reason=None)
    one_line = ("const r = document.createRange(); r.selectNodeContents(document.querySelector(arguments[0]));"
                "return new Set([...r.getClientRects()].map((b) => Math.round(b.top))).size === 1;")
    with _page_and_a_station(tmp_path, ws_broker) as (driver, send, log, url):
        send("smearscope/ward-2/status", "offline")
        send("smearscope/ward-2/run", json.dumps(state))
        driver.get(url)
        card = "[data-station='ward-2']"
        line = lambda: driver.execute_script(
            "const n = document.querySelector(arguments[0]); return n ? n.textContent : '';", f"{card} .run-line")
        _wait("the halted run", lambda: "halted" in line() and "last update" in line(), 20, [log])
        for width in (1500, 1024):
            driver.set_window_size(width, 900)
            for part in (".station-id", ".status"):
                assert driver.execute_script(one_line, f"{card} {part}"), (width, part)
            width_now = driver.execute_script(
                "return [document.documentElement.scrollWidth, document.documentElement.clientWidth]")
            assert width_now[0] <= width_now[1], width_now


#: Markup that would set a global, retitle the page or leave an element with an id starting "pwn"
#: if the page ever inserted it as HTML (the Content-Security-Policy would block the handlers, not
#: the elements), or a URL that would run if it became a link's or a frame's.
HOSTILE = ("<img id=pwn-img src=x onerror=\"window.__pwned=1;document.title='pwned'\">"
           "<script>window.__pwned=2</script><b id=pwn-b>bold</b>")
HOSTILE_URL = "javascript:window.__pwned=3//"
#: What the page holds that markup put in as HTML would change (run in the page).
PAGE_INSPECTION = """
    const all = [...document.querySelectorAll('*')];
    return {pwned: window.__pwned === undefined ? null : String(window.__pwned), title: document.title,
            scripts: document.scripts.length,
            injected: document.querySelectorAll('[id^=pwn], svg, iframe, object, embed, a, form:not(#login)').length,
            handlers: all.flatMap((e) => [...e.attributes].map((a) => a.name)).filter((n) => n.startsWith('on')),
            urls: all.flatMap((e) => ['href', 'src', 'action', 'formaction'].map((n) => e.getAttribute(n)))
                     .filter((v) => v !== null),
            options: [...document.querySelectorAll('select.type option')].map((o) => o.textContent),
            text: document.body.innerText};"""


@pytest.mark.broker
@needs_chromium
def test_markup_in_any_message_a_broker_client_can_publish_is_shown_as_text(
    tmp_path: Path, ws_broker: MosquittoBroker,
) -> None:
    """Anyone who can publish on the topics (a station, or another client with those rights) puts
    markup in every string the page shows: the station id (a topic level), the run id, labels,
    flag messages, verified_by, telemetry keys and values, the review gallery's cells, types and
    crop and overlay data, earlier runs, command answers. None of it becomes an element, an
    attribute or a script: no global set, the title kept, no element of the payload's in the
    page, no violation of the page's policy reported, every image a data:image/jpeg URL; the text
    itself is shown."""
    from selenium.webdriver.common.by import By

    from smearscope.service.analysis.report import Counts, SizeStats

    station = "<img src=x onerror=window.__pwned=4>"
    base = f"smearscope/{station}"
    run_id = "run\"><svg onload=window.__pwned=5>" + HOSTILE
    report = Report(report_id="r-hostile", kind="specimen", created_at=time.time(), station_id="s", run_id="r",
                    fields_analyzed=2, counts=Counts(rbc=200, wbc=4, platelet=10),
                    wbc_differential=[ClassShare(label="lymphocyte", count=4, percent=100.0)],
                    rbc_morphology=[ClassShare(label="normal", count=200, percent=100.0)],
                    rbc_size=SizeStats(n=200, mean_diameter_um=7.4, sd_um=0.6, cv_percent=8.1, median_diameter_um=7.3),
                    ratios={}, cells=[], timing_ms={"run_ms": 60_000.0}, flags=[])
    state = _closed_run_state(report)
    state["run_id"] = state["progress"]["run_id"] = run_id
    state["review"] = {"cells": 2}
    body = state["report"]
    body.update(run_id=run_id, station_id=station, verification={
        "verified_by": HOSTILE, "verified_at": time.time(), "supersedes": HOSTILE, "left_to_review": 1})
    body["wbc_differential"][0]["label"] = HOSTILE
    body["rbc_morphology"][0].update(label=HOSTILE, grade=HOSTILE)
    body["flags"] = [{"code": HOSTILE, "severity": "critical", "message": "flag " + HOSTILE, "cells": []},
                     {"code": "x", "severity": HOSTILE, "message": HOSTILE_URL, "cells": []}]
    state["rbc_grades"] = {HOSTILE: HOSTILE}
    cell = {"field_id": HOSTILE, "cell": 1, "kind": HOSTILE, "label": "crop " + HOSTILE, "label_score": 0.5,
            "atypical": False, "typeable": True, "typed": HOSTILE, "types": [HOSTILE, HOSTILE_URL],
            "jpeg": "x\" onerror=\"window.__pwned=6"}
    review = {"ok": True, "run_id": run_id, "offset": 0, "total": 2, "next_offset": None, "not_kept": HOSTILE,
              "cells": [cell, {**cell, "cell": 2, "jpeg": ",<svg onload=window.__pwned=7>", "label": "unidentified"}],
              "wbc_types": [HOSTILE], "typed_per_type": {HOSTILE: HOSTILE},
              "overlay": {"field_id": HOSTILE, "jpeg": "');window.__pwned=8;('"}}
    earlier = {**state, "run_id": HOSTILE_URL, "progress": {**state["progress"], "fields": HOSTILE},
               "report": {**body, "run_id": HOSTILE_URL}}
    with _page_and_a_station(tmp_path, ws_broker) as (driver, send, log, url):
        send(f"{base}/status", HOSTILE)
        send(f"{base}/run", json.dumps(state))
        send(f"{base}/telemetry", json.dumps({HOSTILE: HOSTILE, "gpu": {HOSTILE: HOSTILE_URL}}))
        driver.get(url)
        card = lambda: driver.find_elements(By.CSS_SELECTOR, ".station")
        _wait("the station's card", lambda: bool(card()) and HOSTILE in card()[0].text, 20, [log])
        send(f"{base}/cmd_response/get_review", json.dumps(review), retain=False)
        send(f"{base}/cmd_response/get_runs", json.dumps({"ok": True, "runs": [earlier]}), retain=False)
        gallery = lambda: driver.find_elements(By.CSS_SELECTOR, ".gallery figure")
        _wait("the gallery's two cells", lambda: len(gallery()) == 2, 20, [log])
        _wait("the earlier run listed", lambda: len(driver.find_elements(By.CSS_SELECTOR, ".runs option")) == 2, 20, [log])
        send(f"{base}/cmd_response/verify_run", json.dumps({"ok": False, "error": HOSTILE, "message": HOSTILE}),
             retain=False)
        send(f"{base}/cmd_response/type_cells", json.dumps({"ok": False, "error": HOSTILE, "message": HOSTILE}),
             retain=False)
        state_text = lambda: driver.find_element(By.CSS_SELECTOR, ".verify-state").text
        _wait("the refusal shown", lambda: state_text() == HOSTILE, 20, [log])
        gallery_page = driver.execute_script(PAGE_INSPECTION)
        from selenium.webdriver.support.select import Select

        Select(driver.find_element(By.CSS_SELECTOR, ".runs")).select_by_value(HOSTILE_URL)  # the earlier run shown
        _wait("the earlier run shown", lambda: "earlier run" in card()[0].text, 20, [log])
        page = driver.execute_script(PAGE_INSPECTION)
        refused = [e["message"] for e in driver.get_log("browser") if "Content Security Policy" in e["message"]]
        text = card()[0].text
    own = re.findall(r'(?:src|href)="([^"]+)"', (ROOT / "service" / "dashboard" / "static" / "index.html").read_text())
    for inspected in (gallery_page, page):
        # the critical flag names the station in the title, as text
        assert inspected["pwned"] is None and inspected["title"] == f"CRITICAL: \u2068{station}\u2069 · smearscope: stations", inspected
        assert inspected["scripts"] == sum(u.endswith(".js") for u in own), inspected
        assert inspected["injected"] == 0 and inspected["handlers"] == [], inspected
    assert refused == []
    images = [u for u in gallery_page["urls"] if u not in own]
    assert len(images) == 3 and all(u.startswith("data:image/jpeg;base64,") for u in images), images
    assert HOSTILE in gallery_page["options"] and HOSTILE_URL in gallery_page["options"]
    assert "crop " + HOSTILE in gallery_page["text"]
    for shown_as_text in (station, "flag " + HOSTILE, HOSTILE_URL, "verified specimen report (verified by " + HOSTILE):
        assert shown_as_text in text, shown_as_text


@pytest.mark.parametrize("bind", ["0.0.0.0", "::1"])
def test_the_address_printed_at_start_is_one_a_browser_can_open(bind: str) -> None:
    """`--bind 0.0.0.0` printed http://0.0.0.0:PORT/, which reaches nothing from another machine
    and which browsers refuse: it prints this machine's name now (which the page answers), and
    the local address beside it. `--bind ::1` failed to start (an IPv4-only server: "Address
    family for hostname not supported"); it serves now, at http://[::1]:PORT/."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "smearscope", "dashboard", "--port", str(port), "--bind", bind,
                             "--broker", "ws://127.0.0.1:9"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        assert line.startswith("smearscope dashboard: http://"), line + (proc.stderr.read() if proc.poll() else "")
        url = line.split()[2]
        if bind == "0.0.0.0":
            assert url == f"http://{socket.gethostname()}:{port}/", line
            assert f"http://localhost:{port}/" in line
            url = f"http://127.0.0.1:{port}/"  # the name may not resolve on a test machine
            request = urllib.request.Request(url, headers={"Host": f"{socket.gethostname()}:{port}"})
        else:
            assert url == f"http://[::1]:{port}/", line
            request = urllib.request.Request(url)
        with urllib.request.urlopen(request, timeout=10) as answer:
            assert answer.status == 200 and b"smearscope" in answer.read()
    finally:
        proc.terminate()
        proc.communicate(timeout=10)


def _start_dashboard(port: int, bind: str) -> tuple[subprocess.Popen[str], str]:
    """A dashboard on `bind`, and the line it printed at start."""
    proc = subprocess.Popen([sys.executable, "-m", "smearscope", "dashboard", "--port", str(port), "--bind", bind,
                             "--broker", "ws://127.0.0.1:9"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline() if proc.stdout else ""
    if not line.startswith("smearscope dashboard: http://"):
        proc.terminate()
        _, err = proc.communicate(timeout=10)
        pytest.fail(line + err)
    return proc, line


def _stop(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    proc.communicate(timeout=10)


def test_bound_to_every_address_it_prints_an_ip_address_beside_the_machines_name() -> None:
    """A station's name (a Jetson's "ubuntu") often resolves nowhere else on the lab network:
    `--bind 0.0.0.0` prints this machine's address too, which the page answers from any machine."""
    with open("/proc/net/route") as routes:
        if not any(line.split()[1] == "00000000" for line in routes.readlines()[1:]):
            pytest.skip("no default route: this machine has no address on a network")
    port = free_port()
    proc, line = _start_dashboard(port, "0.0.0.0")
    try:
        found = re.findall(r"http://(\d+\.\d+\.\d+\.\d+):(\d+)/", line)
        assert found, line
        address, printed_port = found[0]
        assert not ipaddress.ip_address(address).is_loopback and int(printed_port) == port, line
        with urllib.request.urlopen(f"http://{address}:{port}/", timeout=10) as answer:
            assert answer.status == 200 and b"smearscope" in answer.read()
    finally:
        _stop(proc)


def _hosts_alias() -> str | None:
    """A name /etc/hosts gives a loopback address that is none of this machine's own names."""
    own = {"localhost", socket.gethostname().lower(), socket.getfqdn().lower()}
    with contextlib.suppress(OSError), open("/etc/hosts") as hosts:
        for line in hosts:
            fields = line.split("#")[0].split()
            if len(fields) >= 2 and fields[0].startswith("127."):
                for name in fields[1:]:
                    if name.lower() not in own:
                        return name
    return None


def test_a_name_given_to_bind_is_a_name_the_page_answers() -> None:
    """`--bind scope-pc.lab` printed http://scope-pc.lab:PORT/, and the page refused that very
    address 421 (not one of its names) unless --host named it again."""
    name = _hosts_alias()
    if name is None:
        pytest.skip("no alias of a loopback address in /etc/hosts")
    port = free_port()
    proc, line = _start_dashboard(port, name)
    try:
        assert line.split()[2] == f"http://{name}:{port}/", line
        request = urllib.request.Request(f"http://127.0.0.1:{port}/", headers={"Host": f"{name}:{port}"})
        with urllib.request.urlopen(request, timeout=10) as answer:
            assert answer.status == 200 and b"smearscope" in answer.read()
    finally:
        _stop(proc)


def _link_local() -> tuple[str, str] | None:
    """A link-local IPv6 address of this machine and its interface."""
    with contextlib.suppress(OSError), open("/proc/net/if_inet6") as table:
        for line in table:
            raw, _, _, scope, _, interface = line.split()
            if scope == "20":  # link
                return str(ipaddress.IPv6Address(bytes.fromhex(raw))), interface
    return None


def test_an_ipv6_address_with_its_zone_serves_and_prints_the_zone_as_a_url_writes_it() -> None:
    """`--bind fe80::1%eth0` (a link-local address names its interface) failed to start with
    "[Errno 22] Invalid argument"; it serves, printed as RFC 6874 writes it (%25eth0)."""
    found = _link_local()
    if found is None:
        pytest.skip("no link-local IPv6 address on this machine")
    address, interface = found
    port = free_port()
    proc, line = _start_dashboard(port, f"{address}%{interface}")
    try:
        assert line.split()[2] == f"http://[{address}%25{interface}]:{port}/", line
        with socket.create_connection((f"{address}%{interface}", port), timeout=10) as conn:
            conn.sendall(f"GET / HTTP/1.1\r\nHost: [{address}%25{interface}]:{port}\r\nConnection: close\r\n\r\n".encode())
            assert conn.recv(100).startswith(b"HTTP/1.0 200 ")
    finally:
        _stop(proc)


def test_a_port_already_taken_is_said_in_words_with_what_to_do() -> None:
    """A second dashboard on a port one already serves: exit 69 (EX_UNAVAILABLE, which its unit
    retries, where a mistake in the command exits 2, which it does not) naming the port and --port,
    not "[Errno 98] Address already in use"."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "smearscope", "dashboard", "--port", str(port),
                               "--broker", "ws://127.0.0.1:9"], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 69, proc.stdout + proc.stderr
    assert proc.stderr.strip() == (f"smearscope dashboard: port {port} on 127.0.0.1 is taken (another dashboard, "
                                   "or another server): choose another with --port")


def test_a_bind_address_it_cannot_listen_on_is_said_in_words() -> None:
    """`--bind` a name that does not resolve, or an address no interface of this machine has:
    exit 69 (the unit retries: the address may come up) naming --bind and what is wrong, not "[Errno -2] Name or service not known" or
    "[Errno 99] Cannot assign requested address"; an IPv6 address written in brackets as in a URL
    ([::1]) serves, as ::1."""
    def start(bind: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "smearscope", "dashboard", "--port", str(free_port()),
                               "--bind", bind, "--broker", "ws://127.0.0.1:9"],
                              capture_output=True, text=True, timeout=60, check=False)

    proc = start("no-such-host.invalid")
    assert proc.returncode == 69 and proc.stderr.strip() == (
        "smearscope dashboard: --bind no-such-host.invalid: no such host here (an address of this machine, "
        "or a name it resolves to one)"), proc.stderr
    proc = start("192.0.2.254")  # TEST-NET-1: no machine's own
    assert proc.returncode == 69 and proc.stderr.strip() == (
        "smearscope dashboard: --bind 192.0.2.254: no address of this machine (ip -brief address lists them)"), proc.stderr
    port = free_port()
    proc_served, line = _start_dashboard(port, "[::1]")
    try:
        assert line.split()[2] == f"http://[::1]:{port}/", line
    finally:
        _stop(proc_served)


def test_a_password_file_that_cannot_be_read_is_named_with_its_option(tmp_path: Path) -> None:
    """`dashboard --password-file` naming no file said "[Errno 2] No such file or directory:
    'pw'", naming neither the option nor what the file is; `archive` alike (one function)."""
    missing = tmp_path / "pw"
    for command in (["dashboard", "--broker", "ws://127.0.0.1:9", "--port", str(free_port())],
                    ["archive", "--broker", "mqtt://127.0.0.1:9", "--dir", str(tmp_path / "archive")]):
        proc = subprocess.run([sys.executable, "-m", "smearscope", *command, "--username", "u",
                               "--password-file", str(missing)], capture_output=True, text=True, timeout=60,
                              check=False)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert proc.stderr.strip() == (f"smearscope {command[0]}: cannot read --password-file {missing}: "
                                       "No such file or directory"), proc.stderr
