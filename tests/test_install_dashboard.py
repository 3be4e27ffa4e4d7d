"""systemd/install-dashboard.sh run here with its functions sourced and every path moved under tmp_path,
with the stubs of tests/install_harness.py (useradd, runuser, systemctl log what they are asked;
`install -o/-g` and `chown` drop the ownership; python3 makes a stub venv whose pip logs its calls and
whose `smearscope` is this checkout's). What the real pip, useradd and systemd do is not run here."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from install_harness import REPO, InstallServer, file_mode

INSTALL = REPO / "systemd" / "install-dashboard.sh"
EXAMPLE_ENV = REPO / "config" / "dashboard.env.example"
UNIT = "smearscope-dashboard.service"


class Server(InstallServer):
    """A clinic server for install-dashboard.sh."""

    script = INSTALL


def test_a_first_run_installs_the_dashboard_and_says_what_is_left(tmp_path: Path) -> None:
    server = Server(tmp_path)
    proc = server.run()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    sys_log = server.log("sys.log")
    assert ("useradd --system --user-group --home-dir /nonexistent --no-create-home --shell /usr/sbin/nologin "
            "smearscope-dashboard") in sys_log
    assert server.log("pip.log") == [f"venv {server.prefix / 'venv'}", "install --quiet --upgrade pip",
                                     f"install --quiet {REPO}"]
    env, password = server.etc / "dashboard.env", server.etc / "dashboard-mqtt-password"
    assert env.read_bytes() == EXAMPLE_ENV.read_bytes() and file_mode(env) == 0o640
    assert password.stat().st_size == 0 and file_mode(password) == 0o600
    # the password file is the one the unit's LoadCredential= reads, under the name the dashboard reads
    unit = server.units / UNIT
    assert unit.read_bytes() == (REPO / "systemd" / UNIT).read_bytes()
    assert "LoadCredential=dashboard-mqtt-password:/etc/smearscope/dashboard-mqtt-password" in unit.read_text()
    assert "EnvironmentFile=/etc/smearscope/dashboard.env" in unit.read_text()
    assert (server.prefix / "docs" / "MQTT.md").read_bytes() == (REPO / "docs" / "MQTT.md").read_bytes()
    assert [c for c in sys_log if c.startswith("systemctl")] == [
        "systemctl daemon-reload", f"systemctl enable {UNIT}"]
    out = proc.stdout
    assert "left to do:" in out and f"{env} is still the example: set DASHBOARD_BROKER" in out
    assert f"write the broker password of user 'dashboard' into {password}" in out
    assert "--bind 127.0.0.1 serves this machine only" in out


def test_a_second_run_overwrites_nothing_and_starts_a_configured_dashboard(tmp_path: Path) -> None:
    server = Server(tmp_path)
    assert server.run().returncode == 0
    env, password = server.etc / "dashboard.env", server.etc / "dashboard-mqtt-password"
    env.write_text("DASHBOARD_BROKER=wss://broker.ward.lan:9443\n"
                   "DASHBOARD_OPTIONS=--username dashboard --port 8080 --bind 10.1.2.3\n")
    password.write_text("s3cret\n")
    before = env.read_bytes(), password.read_bytes()
    server.clear_logs()
    proc = server.run(START="1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (env.read_bytes(), password.read_bytes()) == before and file_mode(password) == 0o600
    assert not any(c.startswith("useradd") for c in server.log("sys.log"))
    assert server.log("pip.log") == ["install --quiet --upgrade pip", f"install --quiet {REPO}"]
    assert [c for c in server.log("sys.log") if c.startswith("systemctl")] == [
        "systemctl daemon-reload", f"systemctl enable {UNIT}", f"systemctl restart {UNIT}"]
    assert "left to do" not in proc.stdout and "s3cret" not in proc.stdout + proc.stderr


def test_start_with_something_left_does_not_start_it(tmp_path: Path) -> None:
    server = Server(tmp_path)
    (server.etc).mkdir(parents=True)
    (server.etc / "dashboard.env").write_text("DASHBOARD_BROKER=mqtt://broker:1883\nDASHBOARD_OPTIONS=\n")
    proc = server.run(START="1")
    assert proc.returncode == 1
    assert "DASHBOARD_BROKER=mqtt://broker:1883 is not ws://HOST:PORT or wss://HOST:PORT" in proc.stdout
    assert f"systemctl restart {UNIT}" not in server.log("sys.log")


def test_a_venv_the_archive_installer_made_is_upgraded_and_a_stations_is_left_alone(tmp_path: Path) -> None:
    server = Server(tmp_path)
    assert server.run("install_venv").returncode == 0
    venv = server.prefix / "venv"
    (venv / ".installed-by-install-dashboard").unlink()
    (venv / ".installed-by-install-archive").touch()  # install-archive.sh's
    server.clear_logs()
    assert server.run("install_venv").returncode == 0
    assert server.log("pip.log") == ["install --quiet --upgrade pip", f"install --quiet {REPO}"]
    (venv / ".installed-by-install-archive").unlink()  # now a station's: not its to change
    server.clear_logs()
    proc = server.run("install_venv")
    assert proc.returncode == 0 and "not changed" in proc.stdout, proc.stdout + proc.stderr
    assert server.log("pip.log") == []


def test_a_machine_without_systemd_is_refused_with_nothing_changed(tmp_path: Path) -> None:
    server = Server(tmp_path)
    (tmp_path / "run-systemd").rmdir()
    proc = server.run()
    assert proc.returncode == 1 and "does not run systemd" in proc.stderr
    assert not server.etc.exists() and not server.log("sys.log")


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_shellcheck_passes() -> None:
    subprocess.run(["shellcheck", str(INSTALL)], check=True, timeout=60)


def test_bash_parses_it() -> None:
    subprocess.run(["bash", "-n", str(INSTALL)], check=True, timeout=30)


@pytest.mark.parametrize("name", ["install-dashboard.sh", "install-archive.sh"])
def test_a_script_copied_without_install_common_says_to_run_it_from_a_checkout(tmp_path: Path, name: str) -> None:
    """Both scripts source systemd/install-common.sh from beside them: one copied alone says so, changing nothing."""
    copy = tmp_path / "systemd" / name
    copy.parent.mkdir()
    shutil.copy(REPO / "systemd" / name, copy)
    proc = subprocess.run(["bash", str(copy)], stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30,
                          check=False)
    assert proc.returncode == 1
    assert f"error: run from a smearscope checkout ({tmp_path} has no systemd/install-common.sh)" in proc.stderr
    assert sorted(tmp_path.rglob("*")) == [copy.parent, copy]
