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
set -euo pipefail

SRC="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PREFIX="${PREFIX:-/opt/smearscope}"
CONF_DIR="${CONF_DIR:-/etc/smearscope}"
UNIT_DIR="${UNIT_DIR:-/etc/systemd/system}"
SYSTEMD_RUN_DIR="${SYSTEMD_RUN_DIR:-/run/systemd/system}"  # present only when systemd is running
PYTHON="${PYTHON:-python3}"
SERVICE_USER=smearscope-dashboard
UNIT=smearscope-dashboard.service
VENV="$PREFIX/venv"
ENV_FILE="$CONF_DIR/dashboard.env"
PASSWORD_PATH="$CONF_DIR/dashboard-mqtt-password"
# Marks the venv as this script's; install-archive.sh's mark makes it one to upgrade too (same checkout).
VENV_MARK=".installed-by-install-dashboard"
ARCHIVE_VENV_MARK=".installed-by-install-archive"

log() { printf '==> %s\n' "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }
TODO=()
todo() { TODO+=("$*"); }

# Checks before anything is changed ---------------------------------------------------------------
is_root() { [[ $EUID -eq 0 ]]; }

preflight() {
  is_root || die "run as root (sudo $0)"
  [[ -f "$SRC/pyproject.toml" ]] || die "run from a smearscope checkout ($SRC has no pyproject.toml)"
  if [[ ! -d "$SYSTEMD_RUN_DIR" ]] || ! command -v systemctl >/dev/null 2>&1; then
    die "this machine does not run systemd (no $SYSTEMD_RUN_DIR or no systemctl): the dashboard's unit needs it. Without systemd run \`smearscope dashboard --broker ws://... --username ... --password-file FILE\` under the machine's own service manager (docs/MQTT.md)"
  fi
  local python="$PYTHON" version
  [[ -x "$VENV/bin/python" ]] && python="$VENV/bin/python"
  version="$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)" \
    || die "no Python found ($python): smearscope needs Python 3.10 or newer (e.g. apt install python3 python3-venv)"
  "$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
    || die "$python is Python $version: smearscope needs Python 3.10 or newer"
}

# 1. user --------------------------------------------------------------------------------------------
service_user() {
  if ! id -u "$SERVICE_USER" >/dev/null 2>&1; then
    log "creating system user $SERVICE_USER"
    useradd --system --user-group --home-dir /nonexistent --no-create-home --shell /usr/sbin/nologin \
            "$SERVICE_USER"
  fi
}

# 2. virtual environment ------------------------------------------------------------------------------
install_venv() {
  install -d -m 0755 "$PREFIX" "$PREFIX/docs"
  if [[ -x "$VENV/bin/python" && ! -f "$VENV/$VENV_MARK" && ! -f "$VENV/$ARCHIVE_VENV_MARK" ]]; then
    local have
    have="$("$VENV/bin/python" -c 'from importlib.metadata import version; print(version("smearscope"))' 2>/dev/null)" \
      || die "$VENV exists but has no smearscope installed; install it there (or move that venv away and run this again)"
    log "using the venv already in $VENV (smearscope $have, a station's?): not changed; upgrade it the way it was installed (install-jetson.sh on a station)"
    return 0
  fi
  # marked before it is made: a venv a failed python3 -m venv left (no pip) is this script's, made again
  if [[ ! -x "$VENV/bin/python" || ! -x "$VENV/bin/pip" ]]; then
    log "creating the venv $VENV"
    install -d -m 0755 "$VENV"
    touch "$VENV/$VENV_MARK"
    "$PYTHON" -m venv "$VENV" || die "cannot make a venv with $PYTHON (Debian/Ubuntu: apt install python3-venv, then run this again)"
  fi
  [[ -f "$VENV/$ARCHIVE_VENV_MARK" ]] || touch "$VENV/$VENV_MARK"
  log "installing smearscope from $SRC into $VENV"
  "$VENV/bin/pip" install --quiet --upgrade pip
  "$VENV/bin/pip" install --quiet "$SRC"
  [[ -x "$VENV/bin/smearscope" ]] || die "pip installed no $VENV/bin/smearscope"
}

# 3. environment file, password ---------------------------------------------------------------------
install_env() {
  # /etc/smearscope is a station's already (0750 root:smearscope): left as it is (systemd reads as root).
  [[ -d "$CONF_DIR" ]] || install -d -m 0755 -o root -g root "$CONF_DIR"
  if [[ -e "$ENV_FILE" ]]; then
    log "keeping $ENV_FILE (never overwritten)"
  else
    log "installing $ENV_FILE from config/dashboard.env.example: set the broker, the account and --bind there"
    install -m 0640 -o root -g root "$SRC/config/dashboard.env.example" "$ENV_FILE"
  fi
}

# Read by systemd as root (LoadCredential=), never by the dashboard's user.
install_password() {
  if [[ -e "$PASSWORD_PATH" ]]; then
    log "keeping $PASSWORD_PATH (never overwritten)"
  else
    log "creating $PASSWORD_PATH, empty: write the dashboard's broker password in it"
    (umask 077; : > "$PASSWORD_PATH")
  fi
  chown root:root "$PASSWORD_PATH"
  chmod 0600 "$PASSWORD_PATH"
}

# 4. unit and doc -------------------------------------------------------------------------------------
install_unit() {
  install -m 0644 "$SRC/docs/MQTT.md" "$PREFIX/docs/"  # the unit's Documentation=
  install -m 0644 "$SRC/systemd/$UNIT" "$UNIT_DIR/$UNIT"
  systemctl daemon-reload
  systemctl enable "$UNIT"
}

# 5. what is left to do -------------------------------------------------------------------------------
env_value() {  # the last KEY=VALUE of the env file, quotes taken off, as systemd reads a plain one
  local line
  line="$(grep -E "^[[:space:]]*$1=" "$ENV_FILE" | tail -n 1)" || return 0
  line="${line#*=}"
  line="${line%"${line##*[![:space:]]}"}"
  if [[ ${#line} -ge 2 && ( ( "${line:0:1}" == '"' && "${line: -1}" == '"' ) || ( "${line:0:1}" == "'" && "${line: -1}" == "'" ) ) ]]; then
    line="${line:1:${#line}-2}"
  fi
  printf '%s' "$line"
}

check_env() {
  local broker options username="" password_file="" bind="127.0.0.1" opt value i held
  local -a words
  if cmp -s "$SRC/config/dashboard.env.example" "$ENV_FILE"; then
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
  # A file holding only a line ending ("echo > file"), after a byte order mark or not, is empty.
  held="$(tr -d '\r\n' < "$PASSWORD_PATH" | LC_ALL=C sed '1s/^\xef\xbb\xbf//')"
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
  if [[ ${#TODO[@]} -gt 0 ]]; then
    log "left to do:"
    printf '    - %s\n' "${TODO[@]}"
    if [[ "${START:-0}" == 1 ]]; then
      log "not started (the above first); then: sudo systemctl restart $UNIT && journalctl -u smearscope-dashboard -f"
      exit 1
    fi
    log "then: sudo systemctl restart $UNIT && journalctl -u smearscope-dashboard -f"
    return 0
  fi
  if [[ "${START:-0}" == 1 ]]; then
    systemctl restart "$UNIT"
    log "started; the address to open is in: journalctl -u smearscope-dashboard"
  else
    log "installed; start with: sudo systemctl restart $UNIT && journalctl -u smearscope-dashboard -f"
  fi
}

# Sourced (tests/test_install_dashboard.py): the functions only.
[[ "${BASH_SOURCE[0]}" == "$0" ]] || return 0
main "$@"
