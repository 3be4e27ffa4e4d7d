"""The systemd unit passes `systemd-analyze verify` and says what the station relies on."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import tomllib

from smearscope.service.config import EXIT_CONFIG

REPO = Path(__file__).resolve().parents[1]
UNIT = REPO / "systemd" / "smearscope.service"
INSTALL = REPO / "systemd" / "install-jetson.sh"
EXEC_START = "/opt/smearscope/venv/bin/smearscope run --config /etc/smearscope/station.toml"

needs_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed"
)


def _directives(text: str) -> dict[str, list[str]]:
    """'Section.Key' -> every value (units repeat keys such as DeviceAllow=)."""
    out: dict[str, list[str]] = {}
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return out


def _verify(unit_text: str, tmp_path: Path) -> str:
    """`systemd-analyze verify` output for a copy whose ExecStart binary exists here."""
    unit = tmp_path / "smearscope.service"
    unit.write_text(unit_text.replace("ExecStart=/opt/smearscope/venv/bin/smearscope",
                                      "ExecStart=/bin/true"))
    proc = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                          text=True, timeout=60, check=False)
    return f"rc={proc.returncode}\n{proc.stdout}{proc.stderr}"


@needs_analyze
def test_unit_verifies_without_errors_or_warnings(tmp_path: Path) -> None:
    output = _verify(UNIT.read_text(), tmp_path)
    assert output.startswith("rc=0"), output
    assert not [ln for ln in output.splitlines() if "smearscope.service" in ln], output


@needs_analyze
def test_verify_would_catch_a_broken_unit(tmp_path: Path) -> None:
    """Guard against a vacuous pass: the same check flags a typo."""
    broken = UNIT.read_text().replace("Restart=on-failure", "Restart=on-falure")
    assert "Failed to parse service restart specifier" in _verify(broken, tmp_path)


def test_unit_has_the_directives_the_station_relies_on() -> None:
    d = _directives(UNIT.read_text())
    one = {k: v[-1] for k, v in d.items()}
    assert one["Service.ExecStart"] == EXEC_START
    assert one["Service.Type"] == "notify" and one["Service.NotifyAccess"] == "main"
    assert one["Service.WatchdogSec"] == "60"
    assert one["Service.ExecReload"] == "/bin/kill -HUP $MAINPID"  # the daemon reloads on SIGHUP
    assert one["Service.Restart"] == "on-failure" and one["Service.RestartSec"]
    assert one["Service.RestartPreventExitStatus"] == str(EXIT_CONFIG)
    assert one["Service.LoadCredential"] == "mqtt-password:/etc/smearscope/mqtt-password"
    assert one["Service.User"] == "smearscope"
    assert set(one["Service.SupplementaryGroups"].split()) == {"video", "render"}
    for key, value in {
        "ProtectSystem": "strict", "ProtectHome": "yes", "NoNewPrivileges": "yes",
        "PrivateTmp": "yes", "StateDirectory": "smearscope", "LogsDirectory": "smearscope",
        "DevicePolicy": "closed", "ProtectKernelTunables": "yes", "ProtectKernelModules": "yes",
        "ProtectControlGroups": "yes", "RestrictNamespaces": "yes", "CapabilityBoundingSet": "",
    }.items():
        assert one[f"Service.{key}"] == value, key
    assert set(one["Service.RestrictAddressFamilies"].split()) == {
        "AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"}
    assert "char-video4linux rw" in d["Service.DeviceAllow"]
    assert not any(k.startswith("Service.Environment") and "PASSWORD" in v.upper()
                   for k, vs in d.items() for v in vs), "secrets belong in LoadCredential="
    assert one["Install.WantedBy"] == "multi-user.target"


def test_credential_name_matches_the_example_config() -> None:
    example = tomllib.loads((REPO / "config" / "station.example.toml").read_text())
    name = _directives(UNIT.read_text())["Service.LoadCredential"][0].split(":")[0]
    assert example["mqtt"]["password_credential"] == name


def test_install_script_is_valid_bash_and_matches_the_unit() -> None:
    subprocess.run(["bash", "-n", str(INSTALL)], check=True, timeout=30)
    script = INSTALL.read_text()
    assert 'PREFIX="${PREFIX:-/opt/smearscope}"' in script  # -> $PREFIX/venv/bin/smearscope
    assert 'CONF_DIR="${CONF_DIR:-/etc/smearscope}"' in script
    assert 'PASSWORD_PATH="$CONF_DIR/mqtt-password"' in script
    assert "SERVICE_USER=smearscope" in script
    assert "validate-config" in script and "systemd-analyze verify" in script
    # Issue 18, item 12: models where the config points (hashes checked), doctor, Python 3.10+.
    assert 'install-models "$MODELS_DIR"' in script and "doctor --config" in script
    assert "sys.version_info < (3, 10)" in script and "JetPack 5 (Python 3.8) is not" in script


def _exposure(unit: Path) -> tuple[float | None, str]:
    """The unit's overall exposure level by `systemd-analyze security --offline` (None where it printed
    none) and what it printed on stdout; skips where this systemd-analyze cannot check offline."""
    proc = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(unit)],
                          capture_output=True, text=True, timeout=60, check=False)
    match = re.search(r"Overall exposure level for \S+: ([0-9.]+)", proc.stdout + proc.stderr)
    if proc.returncode != 0 and match is None:
        pytest.skip(f"systemd-analyze security --offline unsupported: {proc.stderr.strip()[:200]}")
    return (float(match.group(1)) if match is not None else None), proc.stdout


@needs_analyze
def test_security_exposure_stays_low(tmp_path: Path) -> None:
    unit = tmp_path / "smearscope.service"
    unit.write_text(UNIT.read_text().replace("/opt/smearscope/venv/bin/smearscope", "/bin/true"))
    level, stdout = _exposure(unit)
    assert level is not None and level <= 3.0, stdout[-500:]


def _analyze_verify(unit: Path, text: str) -> tuple[int, str]:
    """`unit` written with `text`, and `systemd-analyze verify`'s exit status and output for it."""
    unit.write_text(text)
    proc = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60,
                          check=False)
    return proc.returncode, proc.stdout + proc.stderr


def _verified_copy(source: Path, tmp_path: Path) -> Path:
    """A copy of the unit `source` (its ExecStart a binary that exists here) that verifies without a word
    about it, where the same check sees a Restart= typo; the copy holds the unit as shipped again."""
    unit = tmp_path / source.name
    text = source.read_text().replace("/opt/smearscope/venv/bin/smearscope", "/bin/true")
    returncode, output = _analyze_verify(unit, text)
    assert returncode == 0 and source.name not in output, output
    _, output = _analyze_verify(unit, text.replace("Restart=on-failure", "Restart=on-falure"))  # sees a typo
    assert "Failed to parse service restart specifier" in output
    unit.write_text(text)
    return unit


ARCHIVE_UNIT = REPO / "systemd" / "smearscope-archive.service"


@needs_analyze
def test_the_archive_unit_verifies_and_its_exposure_stays_low(tmp_path: Path) -> None:
    level, stdout = _exposure(_verified_copy(ARCHIVE_UNIT, tmp_path))
    assert level is not None and level <= 2.0, stdout[-500:]


def test_the_archive_unit_starts_the_archive_the_example_env_describes() -> None:
    """ExecStart with the example archive.env parses as `smearscope archive`; its folder is the unit's
    state directory, its credential the one the command reads."""
    import shlex

    from smearscope.cli import ARCHIVE_DIR, build_parser
    from smearscope.cli.archive import CREDENTIAL

    d = _directives(ARCHIVE_UNIT.read_text())
    one = {k: v[-1] for k, v in d.items()}
    env = dict(line.split("=", 1) for line in (REPO / "config" / "archive.env.example").read_text().splitlines()
               if line and not line.startswith("#"))
    assert one["Service.EnvironmentFile"] == "/etc/smearscope/archive.env"
    command = one["Service.ExecStart"].replace("${ARCHIVE_BROKER}", env["ARCHIVE_BROKER"]).replace(
        "$ARCHIVE_OPTIONS", env["ARCHIVE_OPTIONS"])
    argv = shlex.split(command)
    assert argv[0] == "/opt/smearscope/venv/bin/smearscope"
    args = build_parser().parse_args(argv[1:])
    assert args.command == "archive" and args.archive_command is None and args.username == "archive"
    assert str(args.dir) == ARCHIVE_DIR == f"/var/lib/{one['Service.StateDirectory']}"
    assert one["Service.LoadCredential"] == f"{CREDENTIAL}:/etc/smearscope/{CREDENTIAL}"
    assert one["Service.User"] == "smearscope-archive"
    for key, value in {"ProtectSystem": "strict", "ProtectHome": "yes", "NoNewPrivileges": "yes",
                       "PrivateTmp": "yes", "PrivateDevices": "yes", "CapabilityBoundingSet": "",
                       "MemoryDenyWriteExecute": "yes", "RestrictNamespaces": "yes"}.items():
        assert one[f"Service.{key}"] == value, key
    assert not any("PASSWORD" in v.upper() for k, vs in d.items() if k.startswith("Service.Environment")
                   for v in vs), "secrets belong in LoadCredential="


def _bytes(limit: str) -> int:
    """A systemd memory limit (`2560M`, `3G`) in bytes; K, M, G, T are powers of 1024."""
    match = re.fullmatch(r"(\d+)([KMGT]?)", limit)
    assert match is not None, limit
    return int(match[1]) * 1024 ** " KMGT".index(match[2] or " ")


def test_the_memory_bound_holds_the_stated_peak_and_fits_an_orin_nano() -> None:
    """MemoryHigh is above the peak docs/STATION.md states for the largest frame the station accepts
    (64 MP, device.ingest's limit) at the example config's concurrent_fields, with a quarter to spare, and
    MemoryMax above that and within half an Orin Nano's 8 GB (the GPU shares them). Raising the frame
    limit or the example's concurrent_fields, or a limit under the peak, fails here until both agree."""
    one = {k: v[-1] for k, v in _directives(UNIT.read_text()).items()}
    high, cap = _bytes(one["Service.MemoryHigh"]), _bytes(one["Service.MemoryMax"])
    assert one["Service.MemorySwapMax"] == "0" and one["Service.OOMPolicy"] == "stop"
    assert one["Service.Restart"] == "on-failure"  # an OOM kill (result oom-kill) is restarted

    from smearscope.device.ingest.decode import IngestLimits

    assert IngestLimits().max_pixels == 64_000_000  # the frames the peak was measured with
    concurrent = tomllib.loads((REPO / "config" / "station.example.toml").read_text())["analysis"]["concurrent_fields"]
    stated = re.search(r"Frames of the largest accepted size \(64 megapixels\) take it to\s+about ([0-9.]+) GB "
                       rf"with `concurrent_fields = {concurrent}`", (REPO / "docs" / "STATION.md").read_text())
    assert stated is not None, f"docs/STATION.md states no peak for 64 MP frames at concurrent_fields = {concurrent}"
    peak = float(stated[1]) * 1e9
    assert high >= 1.25 * peak, (high, peak)
    assert peak < high < cap <= 8e9 / 2, (peak, high, cap)


@needs_analyze
def test_verify_reads_the_memory_limits(tmp_path: Path) -> None:
    """Guard against a vacuous pass: a memory limit systemd cannot read is said by the verify."""
    broken = UNIT.read_text().replace("MemoryMax=3G", "MemoryMax=3Q")
    assert "Invalid memory limit '3Q'" in _verify(broken, tmp_path)


@needs_analyze
def test_the_archive_unit_lets_the_archive_write_the_hl7_folder_the_docs_name(tmp_path: Path) -> None:
    """ProtectSystem=strict leaves the archive its state directory only: the HL7 folder of docs/HL7.md and
    config/archive.env.example is in ReadWritePaths=, optional ("-": a unit without --hl7-dir starts
    without it), and `systemd-analyze verify` reads the directive (it names a relative path)."""
    folder = "/var/spool/smearscope-hl7"
    d = _directives(ARCHIVE_UNIT.read_text())
    assert d["Service.ReadWritePaths"] == [f"-{folder}"]
    assert f"--hl7-dir {folder}" in (REPO / "config" / "archive.env.example").read_text()
    assert f"--hl7-dir {folder}" in (REPO / "docs" / "HL7.md").read_text()
    unit = tmp_path / "smearscope-archive.service"
    text = ARCHIVE_UNIT.read_text().replace("/opt/smearscope/venv/bin/smearscope", "/bin/true")
    returncode, output = _analyze_verify(unit, text)
    assert returncode == 0 and "smearscope-archive.service" not in output
    relative = text.replace(f"ReadWritePaths=-{folder}", "ReadWritePaths=-var/spool/smearscope-hl7")
    _, output = _analyze_verify(unit, relative)
    assert "ReadWritePaths= path is not absolute" in output


DASHBOARD_UNIT = REPO / "systemd" / "smearscope-dashboard.service"
DASHBOARD_ENV = REPO / "config" / "dashboard.env.example"


@needs_analyze
def test_the_dashboard_unit_verifies_and_its_exposure_stays_low(tmp_path: Path) -> None:
    level, stdout = _exposure(_verified_copy(DASHBOARD_UNIT, tmp_path))
    assert level is not None and level <= 2.0, stdout[-500:]
    one = {k: v[-1] for k, v in _directives(DASHBOARD_UNIT.read_text()).items()}
    assert one["Service.User"] == "smearscope-dashboard" and one["Service.Restart"] == "on-failure"
    # a command mistake (2) waits for its mending; a port or address it cannot listen on is retried
    from smearscope.cli.dashboard import EXIT_CANNOT_LISTEN

    assert one["Service.RestartPreventExitStatus"].split() == ["2"] and EXIT_CANNOT_LISTEN not in (0, 2)
    for key, value in {"ProtectSystem": "strict", "ProtectHome": "yes", "NoNewPrivileges": "yes",
                       "PrivateTmp": "yes", "PrivateDevices": "yes", "CapabilityBoundingSet": "",
                       "MemoryDenyWriteExecute": "yes", "RestrictNamespaces": "yes"}.items():
        assert one[f"Service.{key}"] == value, key
    assert "ReadWritePaths" not in one  # it writes nothing
    assert not any("PASSWORD" in v.upper() for k, vs in _directives(DASHBOARD_UNIT.read_text()).items()
                   if k.startswith("Service.Environment") for v in vs), "secrets belong in LoadCredential="


def _ws_login(port: int, username: str, password: str) -> str:
    """The CONNACK reason a login over the broker's WebSockets listener gets, as the page's own."""
    import threading

    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    answered = threading.Event()
    reason: list[str] = []

    def on_connect(client, userdata, flags, reason_code, properties) -> None:
        reason.append(str(reason_code))
        answered.set()

    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, transport="websockets",
                         protocol=mqtt.MQTTv5)
    client.username_pw_set(username, password)
    client.on_connect = on_connect
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        assert answered.wait(20), "no CONNACK"
    finally:
        client.disconnect()
        client.loop_stop()
    return reason[0]


@pytest.mark.broker
@pytest.mark.parametrize("written", [True, False], ids=["password", "empty-as-installed"])
def test_the_dashboard_unit_serves_the_page_with_the_credential_it_loads(tmp_path: Path, written: bool) -> None:
    """ExecStart with the example dashboard.env and the credentials folder LoadCredential= makes: the
    dashboard serves the page, and its config.json carries the account and the password of the credential
    the unit loads, which the broker's WebSockets listener accepts. The credential still empty, as
    install-dashboard.sh leaves it, is no password (null): the page asks for it rather than log in with ""
    and be refused every second."""
    import json
    import os
    import shlex
    import sys
    import urllib.request

    from broker import MosquittoBroker, free_port, wait_for_port

    one = {k: v[-1] for k, v in _directives(DASHBOARD_UNIT.read_text()).items()}
    assert one["Service.EnvironmentFile"] == "/etc/smearscope/dashboard.env"
    name, _, source = one["Service.LoadCredential"].partition(":")
    assert source == f"/etc/smearscope/{name}"
    env = dict(line.split("=", 1) for line in DASHBOARD_ENV.read_text().splitlines()
               if line and not line.startswith("#"))
    options = shlex.split(env["DASHBOARD_OPTIONS"])
    username = options[options.index("--username") + 1]
    secret = "dashboard-secret"
    broker = MosquittoBroker(tmp_path / "broker", {username: secret}, websockets=True)
    broker.start()
    http_port = free_port()
    options[options.index("--port") + 1] = str(http_port)  # the example's 8080 may be taken here
    command = one["Service.ExecStart"].replace("${DASHBOARD_BROKER}", f"ws://127.0.0.1:{broker.ws_port}").replace(
        "$DASHBOARD_OPTIONS", shlex.join(options))
    argv = shlex.split(command)
    assert argv[0] == "/opt/smearscope/venv/bin/smearscope"
    credentials = tmp_path / "credentials"  # as systemd hands it over: the file named as the credential
    credentials.mkdir(mode=0o500)
    (credentials / name).write_text(secret + "\n" if written else "")
    log = tmp_path / "dashboard.log"
    with log.open("w") as out:
        proc = subprocess.Popen([str(Path(sys.executable).with_name("smearscope")), *argv[1:]], stdout=out,
                                stderr=subprocess.STDOUT,
                                env={**os.environ, "CREDENTIALS_DIRECTORY": str(credentials)})
    try:
        wait_for_port(http_port, 30, proc)
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/", timeout=10) as page:
            assert page.status == 200 and b"<html" in page.read().lower()
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/config.json", timeout=10) as answer:
            config = json.load(answer)
        assert config["broker"] == f"ws://127.0.0.1:{broker.ws_port}"
        assert (config["username"], config["password"]) == (username, secret if written else None), config
        if written:
            assert _ws_login(broker.ws_port, config["username"], config["password"]) == "Success"
    finally:
        proc.terminate()
        proc.wait(20)
        broker.stop()
        os.chmod(credentials, 0o700)
    assert "dashboard" in log.read_text(), log.read_text()
