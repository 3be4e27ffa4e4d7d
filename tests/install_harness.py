"""One clinic server under tmp_path for systemd/install-archive.sh and install-dashboard.sh (and
install-common.sh, which both source), with their functions sourced and every path moved there:
useradd, getent, runuser and systemctl are stubs that log what they are asked, `install -o/-g` and
`chown` drop the ownership (the log keeps it), python3 makes a stub venv whose pip logs its calls and
whose `smearscope` is this checkout's. What the real pip, useradd and systemd do is not run here."""

from __future__ import annotations

import os
import shlex
import stat
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SMEARSCOPE = Path(sys.executable).with_name("smearscope")

FAKE_PIP = f"""#!/usr/bin/env bash
printf '%s\\n' "$*" >> "$PIPLOG"
if [[ "$1" == install && "${{@: -1}}" != pip ]]; then
  rm -f "$(dirname "$0")/smearscope"  # never written through a link to a real one
  printf '#!/usr/bin/env bash\\nexec {shlex.quote(str(SMEARSCOPE))} "$@"\\n' > "$(dirname "$0")/smearscope"
  chmod 755 "$(dirname "$0")/smearscope"
fi
"""

# python3 as found on the server: `-m venv DIR` makes the stub venv; FAKE_PY_OLD makes it a 3.8.
FAKE_PYTHON = f"""#!/usr/bin/env bash
if [[ -n "${{FAKE_PY_OLD:-}}" && "$*" == *version_info* ]]; then
  [[ "$*" == *print* ]] && {{ echo 3.8; exit 0; }}
  exit 1
fi
if [[ "$1 $2" == "-m venv" ]]; then
  printf 'venv %s\\n' "$3" >> "$PIPLOG"
  mkdir -p "$3/bin"
  printf '#!/usr/bin/env bash\\nexec {shlex.quote(sys.executable)} "$@"\\n' > "$3/bin/python"
  chmod 755 "$3/bin/python"
  if [[ -n "${{FAKE_NO_ENSUREPIP:-}}" ]]; then  # Debian's python3 without python3-venv: no pip, exit 1
    echo "The virtual environment was not created successfully because ensurepip is not available." >&2
    exit 1
  fi
  cp "$FAKE_PIP" "$3/bin/pip"
  chmod 755 "$3/bin/pip"
  exit 0
fi
exec {shlex.quote(sys.executable)} "$@"
"""

STUBS = """
is_root() { :; }
install() { local a=(); while (($#)); do case $1 in -o|-g) printf 'owner %s %s\\n' "$1" "$2" >> "$INSTALLLOG"; shift 2;;
  *) a+=("$1"); shift;; esac; done; printf 'install %s\\n' "${a[*]}" >> "$INSTALLLOG"; command install "${a[@]}"; }
chown() { printf 'chown %s\\n' "$*" >> "$INSTALLLOG"; }
id() { [[ "$1" == -u ]] && grep -qx "$2" "$FAKE_USERS" 2>/dev/null; }
useradd() { printf 'useradd %s\\n' "$*" >> "$SYSLOG"; echo "${@: -1}" >> "$FAKE_USERS"; }
getent() { [[ "$1" == group ]] && grep -qx "$2" "$FAKE_GROUPS" 2>/dev/null; }
runuser() { printf 'runuser %s\\n' "$*" >> "$SYSLOG"; shift 3; "$@"; }
systemctl() { printf 'systemctl %s\\n' "$*" >> "$SYSLOG"; }
"""


class InstallServer:
    """One clinic server under tmp_path: the script's paths, its stubs and their logs."""

    script: Path  # the install script the subclass runs
    knobs: tuple[str, ...] = ("START",)  # empty unless a run sets them

    def __init__(self, tmp_path: Path) -> None:
        self.root = tmp_path
        self.prefix = tmp_path / "opt" / "smearscope"
        self.etc = tmp_path / "etc" / "smearscope"
        self.units = tmp_path / "etc" / "systemd" / "system"
        self.units.mkdir(parents=True)
        (tmp_path / "run-systemd").mkdir()
        stubs = tmp_path / "stubs"
        stubs.mkdir()
        (stubs / "pip").write_text(FAKE_PIP)
        (stubs / "python3").write_text(FAKE_PYTHON)
        (stubs / "python3").chmod(0o755)

    def paths(self) -> dict[str, str]:
        """The script's environment that moves what it touches under tmp_path."""
        t = self.root
        return {"PREFIX": str(self.prefix), "CONF_DIR": str(self.etc), "UNIT_DIR": str(self.units),
                "SYSTEMD_RUN_DIR": str(t / "run-systemd"), "PYTHON": str(t / "stubs" / "python3"),
                "FAKE_PIP": str(t / "stubs" / "pip"), "PIPLOG": str(t / "pip.log"),
                "INSTALLLOG": str(t / "install.log"), "SYSLOG": str(t / "sys.log"),
                "FAKE_USERS": str(t / "users"), "FAKE_GROUPS": str(t / "groups")}

    def run(self, call: str = "main", **env: str) -> subprocess.CompletedProcess:
        full_env = {**os.environ, **self.paths(), **dict.fromkeys(self.knobs, ""), **env}
        script = f"source {shlex.quote(str(self.script))}\n{STUBS}\n{call}\n"
        return subprocess.run(["bash", "-c", script], env=full_env, stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=120, check=False)

    def log(self, name: str) -> list[str]:
        path = self.root / name
        return path.read_text().splitlines() if path.exists() else []

    def clear_logs(self) -> None:
        for name in ("pip.log", "install.log", "sys.log"):
            (self.root / name).unlink(missing_ok=True)


def file_mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)
