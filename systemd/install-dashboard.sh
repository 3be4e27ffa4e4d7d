#!/usr/bin/env bash
# Install the smearscope clinic dashboard (docs/MQTT.md, "Dashboards") as a systemd service,
# idempotently, on a clinic server or a station. Needs systemd and Python 3.10 or newer.
#
#   sudo ./systemd/install-dashboard.sh          # from a checkout of the repository
#   sudo START=1 ./systemd/install-dashboard.sh  # also (re)start the dashboard at the end
#
# Steps:
#   1. system user `smearscope-dashboard` (no login, no home)
#   2. the venv /opt/smearscope/venv with the checkout installed (pip); one install-archive.sh made is
#      upgraded the same way; one neither script made (a station's, install-jetson.sh) is used as it
#      is, not touched
#   3. /etc/smearscope/dashboard.env from config/dashboard.env.example and an empty root-only (0600)
#      password file /etc/smearscope/dashboard-mqtt-password, each only where there is none (never
#      overwritten)
#   4. the unit and the doc its Documentation= names; daemon-reload, enable (START=1: restart)
#   5. what is left to do: dashboard.env and the password checked
# Environment knobs: PYTHON, START. PREFIX, CONF_DIR, UNIT_DIR and SYSTEMD_RUN_DIR move what the steps
# touch (tests/test_install_dashboard.py); the unit names the defaults, so elsewhere it needs a drop-in
# (systemctl edit smearscope-dashboard).
# shellcheck disable=SC2034  # SERVICE_HOME, UNIT_DOCS, ENV_HINT ...: read by install-common.sh
set -euo pipefail

SRC="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PREFIX="${PREFIX:-/opt/smearscope}"
CONF_DIR="${CONF_DIR:-/etc/smearscope}"
UNIT_DIR="${UNIT_DIR:-/etc/systemd/system}"
SYSTEMD_RUN_DIR="${SYSTEMD_RUN_DIR:-/run/systemd/system}"  # present only when systemd is running
PYTHON="${PYTHON:-python3}"
SERVICE_USER=smearscope-dashboard
SERVICE_HOME=/nonexistent
SERVICE_NOUN="dashboard's"
UNIT=smearscope-dashboard.service
UNIT_DOCS=(MQTT.md)
VENV="$PREFIX/venv"
ENV_FILE="$CONF_DIR/dashboard.env"
ENV_EXAMPLE="$SRC/config/dashboard.env.example"
ENV_HINT="set the broker, the account and --bind there"
PASSWORD_PATH="$CONF_DIR/dashboard-mqtt-password"
# Marks the venv as this script's; install-archive.sh's mark makes it one to upgrade too (same checkout).
VENV_MARK=".installed-by-install-dashboard"
OTHER_VENV_MARK=".installed-by-install-archive"

# Steps 1-4 and the checks shared with install-archive.sh: user, venv, never-overwritten env and
# password files, unit.
if [[ ! -f "$SRC/systemd/install-common.sh" ]]; then  # a copy of this script alone, outside a checkout
  printf 'error: run from a smearscope checkout (%s has no systemd/install-common.sh)\n' "$SRC" >&2
  exit 1
fi
# shellcheck source=systemd/install-common.sh disable=SC1091
source "$SRC/systemd/install-common.sh"

# install-archive.sh's venv keeps only its mark: one it made and this script upgraded stays its.
mark_venv() { [[ -f "$VENV/$OTHER_VENV_MARK" ]] || touch "$VENV/$VENV_MARK"; }

preflight() {
  preflight_common "Without systemd run \`smearscope dashboard --broker ws://... --username ... --password-file FILE\` under the machine's own service manager (docs/MQTT.md)"
}

# 5. what is left to do -------------------------------------------------------------------------------
check_env() {
  local broker options username="" password_file="" bind="127.0.0.1" opt value i held
  local -a words
  if cmp -s "$ENV_EXAMPLE" "$ENV_FILE"; then
    todo "$ENV_FILE is still the example: set DASHBOARD_BROKER to the broker's WebSockets listener as the browsers reach it, and DASHBOARD_OPTIONS (--username, --bind)"
  fi
  broker="$(env_value DASHBOARD_BROKER)"
  options="$(env_value DASHBOARD_OPTIONS)"
  read -ra words <<< "$options"
  for ((i = 0; i < ${#words[@]}; i++)); do
    opt="${words[i]}"
    case "$opt" in
      --username|--password-file|--bind) value="${words[i+1]:-}"; i=$((i + 1)) ;;
      --username=*|--password-file=*|--bind=*) value="${opt#*=}"; opt="${opt%%=*}" ;;
      *) continue ;;
    esac
    case "$opt" in
      --username) username="$value" ;;
      --password-file) password_file="$value" ;;
      --bind) bind="$value" ;;
    esac
  done
  case "$broker" in
    "") todo "$ENV_FILE sets no DASHBOARD_BROKER: the broker's WebSockets listener, wss://HOST:PORT (or ws://HOST:9001)" ;;
    ws://*|wss://*) ;;
    *) todo "DASHBOARD_BROKER=$broker is not ws://HOST:PORT or wss://HOST:PORT (the browsers reach the broker over WebSockets)" ;;
  esac
  held="$(password_held)"
  if [[ -n "$username" && -z "$password_file" && -z "$held" ]]; then
    todo "write the broker password of user '$username' into $PASSWORD_PATH (it stays root-only, 0600; systemd hands it to the dashboard): empty, the page asks each browser for it"
  elif [[ -z "$username" && -n "$held" ]]; then
    log "note: $PASSWORD_PATH holds a password but DASHBOARD_OPTIONS names no --username: the page logs in without one"
  fi
  case "$bind" in
    127.*|localhost|::1|"[::1]") log "note: --bind $bind serves this machine only; for the lab's browsers --bind this machine's address on the lab network (ip -brief address)" ;;
  esac
}

main() {
  preflight
  service_user
  install_venv
  install_env
  install_password
  install_unit
  check_env
  finish "started; the address to open is in: journalctl -u smearscope-dashboard"
}

# Sourced (tests/test_install_dashboard.py): the functions only.
[[ "${BASH_SOURCE[0]}" == "$0" ]] || return 0
main "$@"
