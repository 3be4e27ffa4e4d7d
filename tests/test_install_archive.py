"""systemd/install-archive.sh run here with its functions sourced and every path moved under tmp_path,
with the stubs of tests/install_harness.py. What the real pip, useradd and systemd do is not run here."""

from __future__ import annotations

import os
import shlex
import shutil
import sqlite3
import subprocess
from pathlib import Path

import pytest
from install_harness import REPO, SMEARSCOPE, InstallServer, file_mode

INSTALL = REPO / "systemd" / "install-archive.sh"
EXAMPLE_ENV = REPO / "config" / "archive.env.example"


class Server(InstallServer):
    """A clinic server for install-archive.sh: also its state and HL7 folders, and the group mirth."""

    script = INSTALL
    knobs = ("START", "HL7", "HL7_GROUP")

    def __init__(self, tmp_path: Path) -> None:
        super().__init__(tmp_path)
        self.state = tmp_path / "var" / "lib" / "smearscope-archive"
        self.hl7 = tmp_path / "var" / "spool" / "smearscope-hl7"
        (tmp_path / "groups").write_text("mirth\n")

    def paths(self) -> dict[str, str]:
        return {**super().paths(), "STATE_DIR": str(self.state), "HL7_DIR": str(self.hl7)}


def _smearscope(venv: Path) -> None:
    """A venv's `smearscope` that is this checkout's (a file of its own: the tests never write through a link)."""
    (venv / "bin").mkdir(parents=True, exist_ok=True)
    (venv / "bin" / "smearscope").write_text(f'#!/usr/bin/env bash\nexec {shlex.quote(str(SMEARSCOPE))} "$@"\n')
    (venv / "bin" / "smearscope").chmod(0o755)


def _configure(server: Server, ca: Path) -> None:
    """What clinic IT writes after the first run: its broker, its CA, the password."""
    (server.etc / "archive.env").write_text(
        f"ARCHIVE_BROKER=mqtts://mqtt.ward.lan:8883\nARCHIVE_OPTIONS=--ca-file {ca} --username archive\n")
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    (server.etc / "archive-mqtt-password").write_text("s3cret\n")


def test_sourcing_defines_the_steps_and_runs_nothing(tmp_path: Path) -> None:
    server = Server(tmp_path)
    proc = server.run("declare -F preflight service_user install_venv state_dir install_env install_password "
                      "hl7_dir install_unit check_env archived main")
    assert proc.returncode == 0, proc.stderr
    assert not server.log("pip.log") and not server.log("sys.log") and not server.etc.exists()


def test_a_first_run_installs_the_archive_and_says_what_is_left(tmp_path: Path) -> None:
    server = Server(tmp_path)
    proc = server.run()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    sys_log = server.log("sys.log")
    assert ("useradd --system --user-group --home-dir "
            f"{server.state} --no-create-home --shell /usr/sbin/nologin smearscope-archive") in sys_log
    # the venv made and the checkout installed in it
    assert server.log("pip.log") == [f"venv {server.prefix / 'venv'}", "install --quiet --upgrade pip",
                                     f"install --quiet {REPO}"]
    assert (server.prefix / "venv" / "bin" / "smearscope").exists()
    installs = server.log("install.log")
    # the state folder: the archive user's, 0750
    assert file_mode(server.state) == 0o750 and f"install -d -m 0750 {server.state}" in installs
    i = installs.index(f"install -d -m 0750 {server.state}")
    assert installs[i - 2:i] == ["owner -o smearscope-archive", "owner -g smearscope-archive"]
    # archive.env: the example, root's, 0640; the password: there, empty, 0600, root's
    env = server.etc / "archive.env"
    assert env.read_bytes() == EXAMPLE_ENV.read_bytes() and file_mode(env) == 0o640
    password = server.etc / "archive-mqtt-password"
    assert password.stat().st_size == 0 and file_mode(password) == 0o600
    assert f"chown root:root {password}" in installs
    # the unit and its Documentation=, reloaded and enabled, not started
    unit = server.units / "smearscope-archive.service"
    assert unit.read_bytes() == (REPO / "systemd" / "smearscope-archive.service").read_bytes()
    assert "Documentation=file:///opt/smearscope/docs/ARCHIVE.md" in unit.read_text()
    for doc in ("ARCHIVE.md", "HL7.md"):
        assert (server.prefix / "docs" / doc).read_bytes() == (REPO / "docs" / doc).read_bytes()
    systemctl = [c for c in sys_log if c.startswith("systemctl")]
    assert systemctl == ["systemctl daemon-reload", "systemctl enable smearscope-archive.service"]
    assert not server.hl7.exists()  # no HL7 folder unless asked
    # what is left, said plainly
    out = proc.stdout
    assert "left to do:" in out and f"{env} is still the example: set ARCHIVE_BROKER" in out
    assert "put the CA certificate of the broker's certificate at /etc/smearscope/clinic-ca.crt" in out
    assert f"write the broker password of user 'archive' into {password}" in out
    assert "no report archived yet" in out


def test_a_second_run_overwrites_nothing_and_starts_a_configured_archive(tmp_path: Path) -> None:
    server = Server(tmp_path)
    assert server.run().returncode == 0
    ca = tmp_path / "clinic-ca.crt"
    _configure(server, ca)
    env, password = server.etc / "archive.env", server.etc / "archive-mqtt-password"
    env_before, password_before = env.read_bytes(), password.read_bytes()
    server.clear_logs()
    proc = server.run(START="1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert env.read_bytes() == env_before and password.read_bytes() == password_before
    assert file_mode(password) == 0o600
    assert f"keeping {env} (never overwritten)" in proc.stdout
    assert f"keeping {password} (never overwritten)" in proc.stdout
    sys_log = server.log("sys.log")
    assert not any(c.startswith("useradd") for c in sys_log)  # the user is there already
    # its own venv is upgraded with the checkout, not made again
    assert server.log("pip.log") == ["install --quiet --upgrade pip", f"install --quiet {REPO}"]
    assert [c for c in sys_log if c.startswith("systemctl")] == [
        "systemctl daemon-reload", "systemctl enable smearscope-archive.service",
        "systemctl restart smearscope-archive.service"]
    assert "left to do" not in proc.stdout and "started; follow it with" in proc.stdout
    assert "s3cret" not in proc.stdout + proc.stderr
    assert f"runuser -u smearscope-archive -- test -r {ca}" in sys_log


def test_start_waits_while_something_is_left_to_do(tmp_path: Path) -> None:
    server = Server(tmp_path)
    proc = server.run(START="1")
    assert proc.returncode == 1
    assert "not started" in proc.stdout and "write the broker password" in proc.stdout
    assert "systemctl restart smearscope-archive.service" not in server.log("sys.log")
    assert "systemctl enable smearscope-archive.service" in server.log("sys.log")


def test_a_station_venv_is_used_as_it_is(tmp_path: Path) -> None:
    """On a station, /opt/smearscope/venv is install-jetson.sh's (JetPack's TensorRT and OpenCV, numpy < 2):
    a `pip install` of the checkout there would undo that, so the archive's installer leaves it alone."""
    server = Server(tmp_path)
    subprocess.run([str(tmp_path / "stubs" / "python3"), "-m", "venv", str(server.prefix / "venv")],
                   env={**os.environ, "PIPLOG": str(tmp_path / "station.log"), "FAKE_PIP": str(tmp_path / "stubs" / "pip")},
                   check=True)
    _smearscope(server.prefix / "venv")
    proc = server.run()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not server.log("pip.log")
    assert f"using the venv already in {server.prefix / 'venv'} (smearscope " in proc.stdout
    assert not (server.prefix / "venv" / ".installed-by-install-archive").exists()


def test_the_venv_install_dashboard_made_is_upgraded(tmp_path: Path) -> None:
    """The dashboard's installer (systemd/install-dashboard.sh) made the venv from the same checkout: the
    archive's upgrades it rather than take it for a station's and leave it at the older version."""
    server = Server(tmp_path)
    venv = server.prefix / "venv"
    subprocess.run([str(tmp_path / "stubs" / "python3"), "-m", "venv", str(venv)],
                   env={**os.environ, "PIPLOG": str(tmp_path / "dashboard.log"), "FAKE_PIP": str(tmp_path / "stubs" / "pip")},
                   check=True)
    _smearscope(venv)
    (venv / ".installed-by-install-dashboard").touch()
    proc = server.run()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert server.log("pip.log") == ["install --quiet --upgrade pip", f"install --quiet {REPO}"]
    assert "using the venv already" not in proc.stdout


def test_a_venv_left_without_pip_by_a_missing_python3_venv_is_made_again(tmp_path: Path) -> None:
    """Without python3-venv, `python3 -m venv` leaves the venv's python and no pip, and the script
    says to install python3-venv; the rerun it asks for stopped at "exists but has no smearscope
    installed ... move that venv away", taking the half-made venv for someone else's. It makes it
    again and installs."""
    server = Server(tmp_path)
    venv = server.prefix / "venv"
    proc = server.run(FAKE_NO_ENSUREPIP="1")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "apt install python3-venv" in proc.stderr
    assert (venv / "bin" / "python").exists() and not (venv / "bin" / "pip").exists()
    proc = server.run()  # python3-venv installed since
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert server.log("pip.log")[:2] == [f"venv {venv}"] * 2 and "using the venv already" not in proc.stdout
    assert (venv / "bin" / "smearscope").is_file() and (venv / ".installed-by-install-archive").is_file()


def test_the_hl7_folder_for_the_interface_engine_group(tmp_path: Path) -> None:
    server = Server(tmp_path)
    proc = server.run(HL7_GROUP="mirth")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert file_mode(server.hl7) == 0o2770  # setgid: each file the archive writes is group mirth
    installs = server.log("install.log")
    i = installs.index(f"install -d -m 2770 {server.hl7}")
    assert installs[i - 2:i] == ["owner -o smearscope-archive", "owner -g mirth"]
    assert f"add --hl7-dir {server.hl7} to ARCHIVE_OPTIONS" in proc.stdout
    # named in archive.env, it is no longer left to do; a run without HL7_GROUP leaves the folder as it is
    env = server.etc / "archive.env"
    env.write_text(env.read_text().replace("--username archive", f"--username archive --hl7-dir {server.hl7}"))
    server.clear_logs()
    proc = server.run(HL7="1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "--hl7-dir" not in proc.stdout.split("left to do:")[-1]
    assert not any(str(server.hl7) in line for line in server.log("install.log"))
    assert file_mode(server.hl7) == 0o2770


def test_without_hl7_group_the_folder_is_the_archive_users_alone(tmp_path: Path) -> None:
    server = Server(tmp_path)
    assert server.run(HL7="1").returncode == 0
    installs = server.log("install.log")
    i = installs.index(f"install -d -m 0750 {server.hl7}")
    assert installs[i - 2:i] == ["owner -o smearscope-archive", "owner -g smearscope-archive"]
    assert file_mode(server.hl7) == 0o750


@pytest.mark.parametrize(("env", "why"), [
    ({"HL7_GROUP": "interface"}, "HL7_GROUP=interface: no such group"),
    ({"SYSTEMD_RUN_DIR": "/nonexistent/run/systemd/system"}, "this machine does not run systemd"),
    ({"FAKE_PY_OLD": "1"}, "is Python 3.8: smearscope needs Python 3.10 or newer"),
])
def test_refusals_change_nothing(tmp_path: Path, env: dict[str, str], why: str) -> None:
    server = Server(tmp_path)
    proc = server.run(**env)
    assert proc.returncode == 1 and why in proc.stderr, proc.stderr
    assert not server.log("pip.log") and not server.log("sys.log") and not server.log("install.log")
    assert not server.prefix.exists() and not server.etc.exists()


def _check(server: Server, env: str, password: str = "", call: str = "check_env") -> str:
    server.etc.mkdir(parents=True, exist_ok=True)
    (server.etc / "archive.env").write_text(env)
    (server.etc / "archive-mqtt-password").write_text(password, newline="")
    proc = server.run(f'{call}; printf "TODO %s\\n" "${{TODO[@]}}"')
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_the_env_check_names_what_the_archive_would_refuse(tmp_path: Path) -> None:
    server = Server(tmp_path)
    out = _check(server, "ARCHIVE_OPTIONS=--username archive\n")
    assert "sets no ARCHIVE_BROKER" in out
    out = _check(server, "ARCHIVE_BROKER=mqtts://b.lan:8883\nARCHIVE_OPTIONS=--username archive\n", "pw")
    assert "names no --ca-file" in out and "write the broker password" not in out
    ca = tmp_path / "ca.crt"
    ca.write_text("x")
    out = _check(server, f'ARCHIVE_BROKER="mqtts://b.lan:8883"\nARCHIVE_OPTIONS="--ca-file={ca} --username=lab"\n',
                 "\ufeff\r\n")  # only a byte order mark and a line ending: no password
    assert "TODO write the broker password of user 'lab'" in out and "ca-file" not in out
    out = _check(server, "ARCHIVE_BROKER=tcp://b.lan\nARCHIVE_OPTIONS=--password-file /root/pw --username archive\n")
    assert "is not mqtt://HOST:PORT or mqtts://HOST:PORT" in out and "write the broker password" not in out
    out = _check(server, f"ARCHIVE_BROKER=mqtt://b.lan:1883\nARCHIVE_OPTIONS=--hl7-dir {tmp_path / 'nowhere'}\n")
    assert f"--hl7-dir {tmp_path / 'nowhere'}, which does not exist" in out
    out = _check(server, "ARCHIVE_BROKER=mqtt://b.lan:1883\nARCHIVE_OPTIONS=\n", "pw")
    assert out.strip().endswith("TODO") and "names no --username" in out  # nothing left to do


def test_the_closing_find_counts_the_archived_reports_as_the_archive_user(tmp_path: Path) -> None:
    server = Server(tmp_path)
    shutil.copytree(REPO / "tests" / "data" / "archive-v1", server.state)
    _smearscope(server.prefix / "venv")
    proc = server.run('archived; printf "TODO %s\\n" "${TODO[@]}"')
    assert proc.returncode == 0, proc.stderr
    assert f"the archive in {server.state} holds 2 report(s)" in proc.stdout
    find = f"runuser -u smearscope-archive -- {server.prefix / 'venv' / 'bin' / 'smearscope'} archive find --dir {server.state} --json"
    assert find in server.log("sys.log")
    # an index the installed smearscope cannot read is said, not counted as empty
    with sqlite3.connect(server.state / "index.sqlite") as db:
        db.execute("PRAGMA user_version = 9")
    proc = server.run('archived; printf "TODO %s\\n" "${TODO[@]}"')
    assert f"TODO smearscope archive find --dir {server.state} failed as smearscope-archive" in proc.stdout
    assert "version 9, newer than" in proc.stdout


def test_the_script_is_valid_bash_and_shellcheck_clean() -> None:
    subprocess.run(["bash", "-n", str(INSTALL)], check=True, timeout=30)
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed")
    proc = subprocess.run(["shellcheck", str(INSTALL)], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout
