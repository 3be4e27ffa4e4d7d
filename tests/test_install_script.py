"""systemd/install-jetson.sh's steps, run here with its functions sourced: pip and the venv's
python are stubs (pip logs what it is asked; python answers for JetPack's TensorRT and OpenCV and
hands everything else to this interpreter), `install -o/-g` and `chown` drop the ownership (the
tests need not run as root). What pip would resolve on a Jetson is not run here."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

REPO = Path(__file__).resolve().parents[1]
INSTALL = REPO / "systemd" / "install-jetson.sh"
CONSTRAINTS = REPO / "systemd" / "jetpack-constraints.txt"

FAKE_PIP = """#!/usr/bin/env bash
printf '%s\\n' "$*" >> "$PIPLOG"
if [[ "$1" == show ]]; then [[ -n "${PIP_HAS_ORT:-}" ]]; exit; fi
"""

FAKE_PYTHON = """#!/usr/bin/env bash
case "$*" in
  *"import sys, tensorrt"*|*"import tensorrt;"*)  # JetPack's TensorRT, not a config field's name
    [[ -n "${FAKE_TRT:-}" ]] || exit 1
    (( ${FAKE_TRT%%.*} >= 10 )) || exit 1
    [[ "$*" == *print* ]] && echo "$FAKE_TRT"
    exit 0 ;;
  *GStreamer*) exit 1 ;;
  *"import cv2, numpy, onnxruntime"*)
    if [[ -n "${FAKE_IMPORT_ERROR:-}" ]]; then echo "$FAKE_IMPORT_ERROR" >&2; exit 1; fi ;;
esac
exec @PYTHON@ "$@"
"""

# Ownership needs root; the tests check the arguments instead.
STUBS = """
install() { local a=(); while (($#)); do case $1 in -o|-g) printf 'owner %s %s\\n' "$1" "$2" >> "$INSTALLLOG"; shift 2;;
  *) a+=("$1"); shift;; esac; done; printf 'install %s\\n' "${a[*]}" >> "$INSTALLLOG"; command install "${a[@]}"; }
chown() { :; }
"""


def _prefix(tmp_path: Path) -> Path:
    prefix = tmp_path / "opt"
    bin_dir = prefix / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "pip").write_text(FAKE_PIP)
    (bin_dir / "python").write_text(FAKE_PYTHON.replace("@PYTHON@", shlex.quote(sys.executable)))
    for name in ("pip", "python"):
        (bin_dir / name).chmod(0o755)
    return prefix


def _run(tmp_path: Path, call: str, stdin=subprocess.DEVNULL, **env: str) -> subprocess.CompletedProcess:
    prefix = _prefix(tmp_path) if not (tmp_path / "opt").exists() else tmp_path / "opt"
    full_env = {**os.environ, "PREFIX": str(prefix), "CONF_DIR": str(tmp_path / "etc"),
                "PIPLOG": str(tmp_path / "pip.log"), "INSTALLLOG": str(tmp_path / "install.log"), **env}
    script = f"source {shlex.quote(str(INSTALL))}\n{STUBS}\n{call}\n"
    return subprocess.run(["bash", "-c", script], env=full_env, stdin=stdin, capture_output=True,
                          text=True, timeout=120, check=False)


def _pip_calls(tmp_path: Path) -> list[str]:
    return (tmp_path / "pip.log").read_text().splitlines()


def test_sourcing_defines_the_steps_and_runs_nothing(tmp_path: Path) -> None:
    proc = _run(tmp_path, "declare -F install_packages install_jetson_extra state_dir mqtt_password")
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "pip.log").exists()  # not root, not a Jetson: sourcing ran no step


def test_empty_extras_install_the_package_alone(tmp_path: Path) -> None:
    """EXTRAS="" (JetPack 6.0, ONNX Runtime on the CPU): `pip install SRC`, never `SRC[]`."""
    proc = _run(tmp_path, "install_packages", EXTRAS="")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    calls = _pip_calls(tmp_path)
    assert calls[-1] == f"install --quiet --constraint {CONSTRAINTS} {REPO}", calls
    assert not any("[" in c or "jetson-ai-lab" in c or "uninstall" in c for c in calls), calls
    assert "cv2 " in proc.stdout and "numpy " in proc.stdout  # the closing import check


def test_other_extras_pass_through_without_jetson(tmp_path: Path) -> None:
    proc = _run(tmp_path, "install_packages", EXTRAS="jetson, test", FAKE_TRT="10.3.0", PIP_HAS_ORT="1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"install --quiet --constraint {CONSTRAINTS} {REPO}[test]" in _pip_calls(tmp_path)


def test_jetson_extra_the_jetpack_way(tmp_path: Path) -> None:
    """tensorrt from JetPack (not pip); the CPU onnxruntime uninstalled before onnxruntime-gpu comes
    from the Jetson AI Lab index; every install under the numpy<2 constraints."""
    proc = _run(tmp_path, "install_packages", EXTRAS="jetson", FAKE_TRT="10.3.0", PIP_HAS_ORT="1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    calls = _pip_calls(tmp_path)
    installs = [c for c in calls if c.startswith("install") and "--upgrade pip" not in c]
    assert all(f"--constraint {CONSTRAINTS}" in c for c in installs), installs
    assert installs[0].endswith(f" {REPO}")
    uninstall = calls.index("uninstall --quiet --yes onnxruntime")
    gpu = [i for i, c in enumerate(calls) if "onnxruntime-gpu" in c]
    assert gpu and min(gpu) > uninstall, calls
    extra = calls[min(gpu)]
    assert "--extra-index-url https://pypi.jetson-ai-lab.io/jp6/cu126/+simple/" in extra
    assert "--prefer-binary" in extra
    for req in ("onnxruntime-gpu>=1.17", "pycuda>=2024.1", "jetson-stats>=4.2"):
        assert req in extra.split(), extra
    assert not any("tensorrt" in c for c in calls), calls
    assert "--force-reinstall --no-deps onnxruntime-gpu>=1.17" in calls[-1]  # a re-run's CPU files
    assert "tensorrt 10.3.0 from JetPack" in proc.stdout


def test_jetson_extra_matches_pyproject() -> None:
    """The script reads the extra from the package metadata; pyproject keeps the four members."""
    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["jetson"]
    assert [r.split(">")[0] for r in extra] == ["tensorrt", "pycuda", "onnxruntime-gpu", "jetson-stats"]


def test_jetson_extra_without_jetpack_tensorrt_says_what_to_install(tmp_path: Path) -> None:
    for trt in ("", "8.6.2"):  # none, or JetPack 6.0's
        proc = _run(tmp_path, "install_packages", EXTRAS="jetson", FAKE_TRT=trt)
        assert proc.returncode == 1
        assert "apt install python3-libnvinfer" in proc.stderr and 'EXTRAS=""' in proc.stderr


def test_numpy_is_constrained_below_2() -> None:
    lines = [ln.strip() for ln in CONSTRAINTS.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    assert lines == ["numpy<2"]


def test_a_venv_that_cannot_import_cv2_stops_the_install_with_a_reason(tmp_path: Path) -> None:
    err = "ImportError: numpy.core.multiarray failed to import"
    proc = _run(tmp_path, "install_packages", EXTRAS="", FAKE_IMPORT_ERROR=err)
    assert proc.returncode == 1
    assert "cannot import cv2, numpy and onnxruntime together" in proc.stderr
    assert err in proc.stderr and "numpy < 2" in proc.stderr


def test_state_dir_is_owned_by_the_service_user(tmp_path: Path) -> None:
    state = tmp_path / "var" / "lib" / "smearscope"
    proc = _run(tmp_path, f"STATE_DIR={shlex.quote(str(state))}; state_dir")
    assert proc.returncode == 0, proc.stderr
    log = (tmp_path / "install.log").read_text()
    assert "owner -o smearscope" in log and "owner -g smearscope" in log
    assert f"install -d -m 0750 {state}" in log and state.is_dir()
    # ... and before the models directory beneath it is made (root-owned parents otherwise)
    body = INSTALL.read_text().split("# 3. state directory and configuration")[-1]
    assert body.index("state_dir") < body.index('install -d -m 0755 -o "$SERVICE_USER"')


def _config(tmp_path: Path) -> Path:
    etc = tmp_path / "etc"
    etc.mkdir(exist_ok=True)
    conf = etc / "station.toml"
    conf.write_text((REPO / "config" / "station.example.toml").read_text())
    return conf


def _credential(conf: Path) -> str | None:
    return tomllib.loads(conf.read_text())["mqtt"].get("password_credential")


def test_no_password_on_a_new_config_names_no_credential(tmp_path: Path) -> None:
    conf = _config(tmp_path)
    proc = _run(tmp_path, "mqtt_password 1")  # stdin is not a terminal: no prompt
    assert proc.returncode == 0, proc.stderr
    password = tmp_path / "etc" / "mqtt-password"
    assert password.exists() and password.stat().st_size == 0  # LoadCredential= needs the file
    assert _credential(conf) is None
    assert "names no password credential" in proc.stdout and "uncomment password_credential" in proc.stdout
    assert "[mqtt]" in conf.read_text() and '# password_credential = "mqtt-password"' in conf.read_text()


def test_no_password_with_an_existing_config_naming_one_is_a_warning(tmp_path: Path) -> None:
    conf = _config(tmp_path)
    proc = _run(tmp_path, 'mqtt_password 0; echo "problem=$PASSWORD_PROBLEM"')
    assert proc.returncode == 0, proc.stderr
    assert _credential(conf) == "mqtt-password"  # an operator's config is never rewritten
    assert "would refuse to start (exit 78" in proc.stdout and "problem=1" in proc.stdout


def test_a_rerun_after_a_stop_still_treats_the_example_config_as_its_own(tmp_path: Path) -> None:
    """A first run copied the example config, then stopped (a failed step); the re-run with no
    password comments out its password_credential as the first would have (it left the config
    naming an empty credential: exit 78 at start); an operator's edited config stays as it is."""
    (tmp_path / "etc").mkdir()
    first = _run(tmp_path, 'install_config; echo "fresh=$CONFIG_FRESH"')
    assert first.returncode == 0 and "fresh=1" in first.stdout, first.stderr
    conf = tmp_path / "etc" / "station.toml"
    again = _run(tmp_path, 'install_config; mqtt_password "$CONFIG_FRESH"; echo "fresh=$CONFIG_FRESH"')
    assert again.returncode == 0 and "fresh=1" in again.stdout, again.stderr
    assert _credential(conf) is None
    example = (REPO / "config" / "station.example.toml").read_text()
    conf.write_text(example.replace('station_id = "', 'station_id = "ward-3-', 1))  # the operator's edit
    edited = _run(tmp_path, 'install_config; mqtt_password "$CONFIG_FRESH"; echo "fresh=$CONFIG_FRESH"')
    assert "fresh=0" in edited.stdout and _credential(conf) == "mqtt-password"


def test_a_password_keeps_the_credential(tmp_path: Path) -> None:
    conf = _config(tmp_path)
    secret = tmp_path / "pw"
    secret.write_text("s3cret")
    proc = _run(tmp_path, 'PASSWORD_PROBLEM=0; mqtt_password 1; echo "problem=$PASSWORD_PROBLEM"',
                MQTT_PASSWORD_FILE=str(secret))
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "etc" / "mqtt-password").read_text() == "s3cret"
    assert _credential(conf) == "mqtt-password" and "problem=0" in proc.stdout
    assert "s3cret" not in proc.stdout + proc.stderr


def test_a_password_file_holding_only_a_line_ending_is_no_password(tmp_path: Path) -> None:
    """MQTT_PASSWORD_FILE made by `echo "$PW" > pw` with PW unset holds "\\n": the installer took it
    for a password (file not empty) and kept the config's credential; the station then refused the
    empty password at start (exit 78, not restarted) and the installer had said nothing."""
    from smearscope.service.config.mqtt import MqttConfig
    from smearscope.service.mqtt.credentials import CredentialError, read_password

    for ending in ("\n", "\r\n", "\ufeff\r\n"):  # the last: an empty line saved as "UTF-8 with BOM"
        conf = _config(tmp_path)
        secret = tmp_path / "pw"
        secret.write_text(ending, newline="", encoding="utf-8")
        proc = _run(tmp_path, 'PASSWORD_PROBLEM=0; mqtt_password 0; echo "problem=$PASSWORD_PROBLEM"',
                    MQTT_PASSWORD_FILE=str(secret))
        assert proc.returncode == 0, proc.stderr
        config = MqttConfig.model_validate({"username": "st", "password_credential": "mqtt-password"})
        try:  # what the station makes of it
            read_password(config, {"CREDENTIALS_DIRECTORY": str(tmp_path / "etc")})
            refused = False
        except CredentialError:
            refused = True
        assert refused and _credential(conf) == "mqtt-password"
        assert "problem=1" in proc.stdout and "would refuse to start (exit 78" in proc.stdout, proc.stdout
        (tmp_path / "etc" / "mqtt-password").unlink()


# Step 6 with systemctl, systemd-analyze, runuser (runs the command as this user) and the venv's
# smearscope as stubs on PATH: each logs its call; SMEARSCOPE_FAIL names the subcommand that fails.
FAKE_TOOL = """#!/usr/bin/env bash
printf '%s %s\\n' "$(basename "$0")" "$*" >> "$CALLLOG"
if [[ "$(basename "$0")" == "${TOOL_FAIL:-}" ]]; then echo "$(basename "$0"): the stub refuses" >&2; exit 1; fi
"""
FAKE_RUNUSER = """#!/usr/bin/env bash
while [[ $1 != -- ]]; do shift; done; shift; exec "$@"
"""
FAKE_SMEARSCOPE = """#!/usr/bin/env bash
printf 'smearscope %s\\n' "$*" >> "$CALLLOG"
if [[ "$1" == doctor && -n "${REAL_DOCTOR:-}" ]]; then exec "$REAL_DOCTOR" -m smearscope "$@"; fi
if [[ "$1" == "${SMEARSCOPE_FAIL:-}" ]]; then echo "FAIL  something the $1 stub reports"; exit 1; fi
"""


def _finish(tmp_path: Path, backend: str = "tensorrt", precision: str = "fp16", station: str | None = None,
            **env: str):
    """check_and_enable with stubs; with `station` (a config) the real `smearscope doctor` checks it."""
    conf = _config(tmp_path)
    text = conf.read_text().replace('engine_backend = "onnxruntime"', f'engine_backend = "{backend}"', 1)
    conf.write_text(text.replace('tensorrt_precision = "fp16"', f'tensorrt_precision = "{precision}"', 1))
    if station is not None:
        conf.write_text(station)
        env["REAL_DOCTOR"] = sys.executable
    tools = tmp_path / "tools"
    tools.mkdir()
    for name, body in (("systemctl", FAKE_TOOL), ("systemd-analyze", FAKE_TOOL), ("runuser", FAKE_RUNUSER)):
        (tools / name).write_text(body)
        (tools / name).chmod(0o755)
    prefix = _prefix(tmp_path)
    (prefix / "venv" / "bin" / "smearscope").write_text(FAKE_SMEARSCOPE)
    (prefix / "venv" / "bin" / "smearscope").chmod(0o755)
    calls = tmp_path / "calls.log"
    proc = _run(tmp_path, f"check_and_enable {tmp_path / 'models'}", CALLLOG=str(calls),
                PATH=f"{tools}:{os.environ['PATH']}", **env)
    return proc, calls.read_text().splitlines() if calls.exists() else []


def _steps(calls: list[str]) -> list[str]:
    """The smearscope subcommands and the enable/restart calls, in the order they ran."""
    return [c.split()[1] if c.startswith("smearscope ") else c for c in calls
            if c.startswith(("smearscope ", "systemctl enable", "systemctl restart"))]


def test_engines_then_doctor_then_enable(tmp_path: Path) -> None:
    """validate-config, build-engines for the config's precision and lanes, doctor, and only then
    enable: the script enabled the unit before doctor ran and never built the engines."""
    proc, calls = _finish(tmp_path, START="1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert _steps(calls) == ["validate-config", "build-engines", "doctor", "systemctl enable smearscope.service",
                             "systemctl restart smearscope.service"], calls
    build = next(c for c in calls if "build-engines" in c)
    assert build.endswith(f"--models {tmp_path / 'models'} --precision fp16 --lanes 2"), build


def test_a_failing_doctor_stops_the_install_before_enabling(tmp_path: Path) -> None:
    proc, calls = _finish(tmp_path, SMEARSCOPE_FAIL="doctor", START="1")
    assert proc.returncode == 1
    assert _steps(calls) == ["validate-config", "build-engines", "doctor"], calls
    assert "smearscope doctor failed" in proc.stderr and "not enabled" in proc.stderr, proc.stderr


def _station(tmp_path: Path, camera: str, models: Path) -> str:
    """A camera station's config: no broker answers (port 1: a WARN, the outbox keeps reports)."""
    from test_daemon import to_toml

    return to_toml({"station_id": "inst-1", "source": {"kind": "camera", "device": camera},
                    "analysis": {"models_dir": str(models), "engine_backend": "onnxruntime"},
                    "mqtt": {"host": "127.0.0.1", "port": 1,
                             "outbox": {"path": str(tmp_path / "state" / "outbox.sqlite3")}}}) + "\n"


def _missing_camera() -> str:
    number = 97
    while Path(f"/dev/video{number}").exists():
        number += 1
    return f"/dev/video{number}"


def test_a_camera_unplugged_at_install_still_enables_the_service_with_a_warning(tmp_path: Path) -> None:
    """The real doctor's only FAIL is the camera (the station waits for one): exit 3, and the unit is
    enabled and started, the camera said as a warning with what to do; the daemon opens it when it comes."""
    from smearscope.service.analysis.pipeline import DEFAULT_MODELS_DIR

    camera = _missing_camera()
    proc, calls = _finish(tmp_path, station=_station(tmp_path, camera, DEFAULT_MODELS_DIR), START="1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert _steps(calls) == ["validate-config", "doctor", "systemctl enable smearscope.service",
                             "systemctl restart smearscope.service"], calls
    assert f"FAIL  camera             {camera} does not exist" in proc.stdout, proc.stdout
    assert "1 failed (only ones the running station recovers from: camera)" in proc.stdout, proc.stdout
    assert "warning: smearscope doctor: only checks the running station recovers from failed" in proc.stdout
    assert "waits for the camera" in proc.stdout and "v4l2-ctl --list-devices" in proc.stdout


def test_a_camera_unplugged_beside_a_model_missing_stops_the_install(tmp_path: Path) -> None:
    """Any other FAIL (here the models: no station start gets past them) still stops it before enabling."""
    models = tmp_path / "models"
    models.mkdir()
    proc, calls = _finish(tmp_path, station=_station(tmp_path, _missing_camera(), models), START="1")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert _steps(calls) == ["validate-config", "doctor"], calls
    assert "FAIL  model segmentation" in proc.stdout and "FAIL  camera" in proc.stdout, proc.stdout
    assert "smearscope doctor failed" in proc.stderr and "not enabled" in proc.stderr, proc.stderr
    assert "warning: smearscope doctor" not in proc.stdout


def test_a_failing_engine_build_or_config_stops_before_doctor_and_enable(tmp_path: Path) -> None:
    proc, calls = _finish(tmp_path, precision="int8", SMEARSCOPE_FAIL="build-engines")
    assert proc.returncode == 1 and _steps(calls) == ["validate-config", "build-engines"], calls
    assert "build-engines failed" in proc.stderr and "CALIBRATION_DIR" in proc.stderr, proc.stderr
    again = tmp_path / "again"
    again.mkdir()
    proc, calls = _finish(again, SMEARSCOPE_FAIL="validate-config")
    assert proc.returncode == 1 and _steps(calls) == ["validate-config"], calls
    assert "does not validate" in proc.stderr and "not enabled" in proc.stderr


def test_int8_passes_calibration_dir_and_onnxruntime_builds_no_engines(tmp_path: Path) -> None:
    proc, calls = _finish(tmp_path, precision="int8", CALIBRATION_DIR="/srv/calib")
    assert proc.returncode == 0, proc.stderr
    assert any(c.endswith("--precision int8 --lanes 2 --calibration /srv/calib") for c in calls), calls
    other = tmp_path / "ort"
    other.mkdir()
    proc, calls = _finish(other, backend="onnxruntime")
    assert proc.returncode == 0, proc.stderr
    assert _steps(calls) == ["validate-config", "doctor", "systemctl enable smearscope.service"], calls
    assert "no TensorRT engines to build" in proc.stdout


def test_the_main_steps_install_models_before_the_final_checks() -> None:
    body = INSTALL.read_text().split("# Checks, then the steps")[-1]
    assert body.index("install_packages") < body.index("install-models") < body.index("check_and_enable")
    assert "systemctl enable" not in body  # only check_and_enable enables, after doctor


def test_a_unit_file_systemd_analyze_refuses_stops_the_install_saying_so(tmp_path: Path) -> None:
    """`systemd-analyze verify` failing ended the script through set -e without a line naming the
    step; it now says which step refused, and nothing after it runs."""
    proc, calls = _finish(tmp_path, TOOL_FAIL="systemd-analyze", START="1")
    assert proc.returncode == 1 and _steps(calls) == [], calls
    assert "systemd-analyze verify refuses" in proc.stderr and "not enabled" in proc.stderr, proc.stderr


# Step 1 with the real shadow tools writing a copy of /etc (useradd/groupadd/usermod --prefix);
# getent and id read that copy. The tools need root even with --prefix.
SHADOW_PREFIX = """
useradd() { command useradd --prefix "$ETC_ROOT" "$@"; }
groupadd() { command groupadd --prefix "$ETC_ROOT" "$@"; }
usermod() { command usermod --prefix "$ETC_ROOT" "$@"; }
getent() { grep "^$2:" "$ETC_ROOT/etc/$1"; }
id() { grep -q "^${!#}:" "$ETC_ROOT/etc/passwd"; }
"""


def _etc_copy(tmp_path: Path, groups: str) -> Path:
    """A root with a minimal /etc: root and a few groups, login.defs for the system id ranges."""
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    (root / "etc" / "shadow").write_text("root:*:19000:0:99999:7:::\n")
    (root / "etc" / "group").write_text(groups)
    (root / "etc" / "gshadow").write_text("".join(f"{line.split(':')[0]}:*::\n" for line in groups.splitlines()))
    (root / "etc" / "login.defs").write_text(Path("/etc/login.defs").read_text())
    return root


def _members(root: Path) -> dict[str, set[str]]:
    lines = (root / "etc" / "group").read_text().splitlines()
    return {f[0]: set(filter(None, f[3].split(","))) for f in (line.split(":") for line in lines)}


@pytest.mark.skipif(os.geteuid() != 0 or not Path("/etc/login.defs").exists(),
                    reason="useradd, groupadd and usermod need root, even with --prefix")
def test_the_service_user_is_a_member_of_the_groups_its_unit_names(tmp_path: Path) -> None:
    """Doctor runs as the user through runuser, which gives it the groups /etc/group lists, not the
    unit's SupplementaryGroups=: the user was never made a member, so a camera node root:video 0660
    failed doctor's `camera access` and stopped every install with the camera plugged in. A second
    run (the script is idempotent) keeps one membership each; an existing jtop group is joined."""
    unit = (REPO / "systemd" / "smearscope.service").read_text()
    wanted = {g for line in unit.splitlines() if line.startswith("SupplementaryGroups=")
              for g in line.split("=", 1)[1].split()}
    assert wanted == {"video", "render"}
    root = _etc_copy(tmp_path, "root:x:0:\nvideo:x:44:\njtop:x:990:\n")  # no render group yet
    for _ in range(2):
        proc = _run(tmp_path, f"{SHADOW_PREFIX}\nservice_user", ETC_ROOT=str(root))
        assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "smearscope:" in (root / "etc" / "passwd").read_text()
    members = _members(root)
    assert {g for g, who in members.items() if "smearscope" in who} == wanted | {"jtop"}, members
    assert (root / "etc" / "group").read_text().count("smearscope") == 4  # its own group and three joined


FAKE_VENV_PYTHON = """#!/usr/bin/env bash
# `python3 -m venv DIR` as Debian's python3 does it without python3-venv: DIR/bin/python is made,
# then ensurepip is missing: no pip, exit 1. With NO_ENSUREPIP unset, pip is made too.
printf '%s\\n' "$*" >> "$VENVLOG"
[[ "$1 $2" == "-m venv" ]] || exit 2
dir="${@: -1}"
mkdir -p "$dir/bin" && cp "$VENV_PYTHON_STUB" "$dir/bin/python"
if [[ -n "${NO_ENSUREPIP:-}" ]]; then
  echo "The virtual environment was not created successfully because ensurepip is not available." >&2
  exit 1
fi
cp "$VENV_PIP_STUB" "$dir/bin/pip"
"""


def test_a_venv_left_without_pip_by_a_missing_python3_venv_is_made_again(tmp_path: Path) -> None:
    """On a JetPack without python3-venv, `python3 -m venv` leaves the venv's python and no pip:
    the install stops saying which package to install, and once it is installed, the rerun makes
    the venv again rather than taking the half-made one (whose missing pip would stop it in a
    bash error naming no step)."""
    prefix = _prefix(tmp_path)
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    for name in ("pip", "python"):
        (prefix / "venv" / "bin" / name).rename(stubs / name)
    fake = tmp_path / "python3"
    fake.write_text(FAKE_VENV_PYTHON)
    fake.chmod(0o755)
    env = {"PYTHON": str(fake), "VENVLOG": str(tmp_path / "venv.log"), "EXTRAS": "",
           "VENV_PYTHON_STUB": str(stubs / "python"), "VENV_PIP_STUB": str(stubs / "pip")}
    proc = _run(tmp_path, "install_packages", NO_ENSUREPIP="1", **env)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "sudo apt install python3-venv, then run this again" in proc.stderr
    assert (prefix / "venv" / "bin" / "python").exists() and not (prefix / "venv" / "bin" / "pip").exists()
    proc = _run(tmp_path, "install_packages", **env)  # python3-venv installed since
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "venv.log").read_text().splitlines() == [f"-m venv --system-site-packages {prefix / 'venv'}"] * 2
    assert _pip_calls(tmp_path)[-1] == f"install --quiet --constraint {CONSTRAINTS} {REPO}"


@pytest.mark.broker
def test_the_install_checks_the_login_and_the_acl_with_the_units_credential(tmp_path: Path) -> None:
    """doctor run by the install as the station's user had no $CREDENTIALS_DIRECTORY: its login check
    was a WARN, 'not checked', so a second station whose broker account has no ACL block (every report
    refused) was enabled. The install hands doctor a copy of the credential as the unit would, removed
    after: the ACL's FAIL stops it before the unit is enabled; with the block it is enabled."""
    from broker import MosquittoBroker
    from test_daemon import to_toml

    from smearscope.service.analysis.pipeline import DEFAULT_MODELS_DIR

    acl = (REPO / "config" / "mosquitto.acl.example").read_text()
    broker = MosquittoBroker(tmp_path / "broker", {"station-lab-8": "s8-secret"}, acl=acl)
    broker.start()
    try:
        for ids, enabled in ((acl, False), (acl.replace("lab-7", "lab-8"), True)):
            (broker.workdir / "acl").write_text(ids)
            broker.restart()
            work = tmp_path / ("enabled" if enabled else "refused")
            work.mkdir()
            (work / "etc").mkdir()
            (work / "etc" / "mqtt-password").write_text("s8-secret\n")
            station = to_toml({"station_id": "lab-8", "source": {"kind": "simulated"},
                               "analysis": {"models_dir": str(DEFAULT_MODELS_DIR), "engine_backend": "onnxruntime"},
                               "mqtt": {"host": "127.0.0.1", "port": broker.port, "username": "station-lab-8",
                                        "password_credential": "mqtt-password",
                                        "outbox": {"path": str(work / "state" / "outbox.sqlite3")}}}) + "\n"
            (work / "tmp").mkdir()
            proc, calls = _finish(work, station=station, START="1", TMPDIR=str(work / "tmp"))
            out = proc.stdout + proc.stderr
            assert f"OK    broker login       127.0.0.1:{broker.port} accepts user 'station-lab-8'" in out, out
            left = [p for p in (work / "tmp").rglob("*") if p.is_dir() or b"s8-secret" in p.read_bytes()]
            assert not left, left  # the credential's copy and its folder removed
            if enabled:
                assert proc.returncode == 0, out
                assert "OK    broker ACL" in out and "systemctl enable smearscope.service" in calls, out
            else:
                assert proc.returncode == 1, out
                assert "FAIL  broker ACL" in out and "station-lab-7 block, lab-7 replaced by lab-8" in out, out
                assert "smearscope doctor failed" in out and not any("systemctl enable" in c for c in calls), calls
    finally:
        broker.stop()
