#!/usr/bin/env bash
# Install the smearscope report archive (docs/ARCHIVE.md) as a systemd service, idempotently, on a
# clinic server or a station. Needs systemd and Python 3.10 or newer.
#
#   sudo ./systemd/install-archive.sh                  # from a checkout of the repository
#   sudo HL7_GROUP=mirth ./systemd/install-archive.sh  # also the HL7 folder, for the engine's group
#   sudo START=1 ./systemd/install-archive.sh          # also (re)start the archive at the end
#
# Steps:
#   1. system user `smearscope-archive` (no login, no home)
#   2. the venv /opt/smearscope/venv with the checkout installed (pip); a venv already there that
#      neither this script nor install-dashboard.sh made (a station's, install-jetson.sh) is used as
#      it is, not touched
#   3. /var/lib/smearscope-archive (0750, the archive's user); /etc/smearscope/archive.env from
#      config/archive.env.example and an empty root-only (0600) password file
#      /etc/smearscope/archive-mqtt-password, each only where there is none (never overwritten)
#   4. with HL7=1 or HL7_GROUP=GROUP: /var/spool/smearscope-hl7 for --hl7-dir (docs/HL7.md), the
#      archive user's, 0750; with HL7_GROUP 2770 and that group (setgid: the interface engine's user
#      reads and removes the files through it). A folder already there is left as it is without
#      HL7_GROUP.
#   5. the unit and the docs its Documentation= names; daemon-reload, enable (START=1: restart)
#   6. what is left to do: archive.env and the password checked, `smearscope archive find` run as
#      the archive's user when the archive holds an index
# Environment knobs: PYTHON, HL7, HL7_GROUP, START. PREFIX, CONF_DIR, STATE_DIR, HL7_DIR, UNIT_DIR and
# SYSTEMD_RUN_DIR move what the steps touch (tests/test_install_archive.py); the unit names the
# defaults, so elsewhere it needs a drop-in (systemctl edit smearscope-archive).
set -euo pipefail

SRC="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PREFIX="${PREFIX:-/opt/smearscope}"
CONF_DIR="${CONF_DIR:-/etc/smearscope}"
STATE_DIR="${STATE_DIR:-/var/lib/smearscope-archive}"
HL7_DIR="${HL7_DIR:-/var/spool/smearscope-hl7}"
UNIT_DIR="${UNIT_DIR:-/etc/systemd/system}"
SYSTEMD_RUN_DIR="${SYSTEMD_RUN_DIR:-/run/systemd/system}"  # present only when systemd is running
PYTHON="${PYTHON:-python3}"
HL7_GROUP="${HL7_GROUP:-}"
HL7="${HL7:-0}"
if [[ -n "$HL7_GROUP" ]]; then HL7=1; fi
SERVICE_USER=smearscope-archive
UNIT=smearscope-archive.service
VENV="$PREFIX/venv"
ENV_FILE="$CONF_DIR/archive.env"
PASSWORD_PATH="$CONF_DIR/archive-mqtt-password"
# Marks the venv as this script's: it upgrades that one, and leaves any other (a station's) alone.
VENV_MARK=".installed-by-install-archive"

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
    die "this machine does not run systemd (no $SYSTEMD_RUN_DIR or no systemctl): the archive's unit needs it. Without systemd run \`smearscope archive --broker ... --dir DIR --password-file FILE\` under the machine's own service manager (docs/ARCHIVE.md)"
  fi
  local python="$PYTHON" version
  [[ -x "$VENV/bin/python" ]] && python="$VENV/bin/python"
  version="$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)" \
    || die "no Python found ($python): smearscope needs Python 3.10 or newer (e.g. apt install python3 python3-venv)"
  "$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
    || die "$python is Python $version: smearscope needs Python 3.10 or newer"
  if [[ -n "$HL7_GROUP" ]] && ! getent group "$HL7_GROUP" >/dev/null; then
    die "HL7_GROUP=$HL7_GROUP: no such group on this machine (the group of the interface engine's user, e.g. mirth)"
  fi
}

# 1. user --------------------------------------------------------------------------------------------
service_user() {
  if ! id -u "$SERVICE_USER" >/dev/null 2>&1; then
    log "creating system user $SERVICE_USER"
    useradd --system --user-group --home-dir "$STATE_DIR" --no-create-home --shell /usr/sbin/nologin \
            "$SERVICE_USER"
  fi
}

# 2. virtual environment ------------------------------------------------------------------------------
install_venv() {
  install -d -m 0755 "$PREFIX" "$PREFIX/docs"
  # install-dashboard.sh's venv is the same checkout's: upgraded too
  if [[ -x "$VENV/bin/python" && ! -f "$VENV/$VENV_MARK" && ! -f "$VENV/.installed-by-install-dashboard" ]]; then
    local have
    have="$("$VENV/bin/python" -c 'from importlib.metadata import version; print(version("smearscope"))' 2>/dev/null)" \
      || die "$VENV exists but has no smearscope installed; install it there (or move that venv away and run this again)"
    log "using the venv already in $VENV (smearscope $have, a station's?): not changed; upgrade it the way it was installed (install-jetson.sh on a station)"
    return 0
  fi
  # marked before it is made: a venv a failed python3 -m venv left (no python3-venv: its python, no
  # pip) is this script's, made again on the rerun, not taken for a station's
  if [[ ! -x "$VENV/bin/python" || ! -x "$VENV/bin/pip" ]]; then
    log "creating the venv $VENV"
    install -d -m 0755 "$VENV"
    touch "$VENV/$VENV_MARK"
    "$PYTHON" -m venv "$VENV" || die "cannot make a venv with $PYTHON (Debian/Ubuntu: apt install python3-venv, then run this again)"
  fi
  touch "$VENV/$VENV_MARK"
  log "installing smearscope from $SRC into $VENV"
  "$VENV/bin/pip" install --quiet --upgrade pip
  "$VENV/bin/pip" install --quiet "$SRC"
  [[ -x "$VENV/bin/smearscope" ]] || die "pip installed no $VENV/bin/smearscope"
}

# 3. state directory, environment file, password ------------------------------------------------------
state_dir() {
  install -d -m 0750 -o "$SERVICE_USER" -g "$SERVICE_USER" "$STATE_DIR"
}

install_env() {
  # /etc/smearscope is a station's already (0750 root:smearscope): left as it is.
  [[ -d "$CONF_DIR" ]] || install -d -m 0755 -o root -g root "$CONF_DIR"
  if [[ -e "$ENV_FILE" ]]; then
    log "keeping $ENV_FILE (never overwritten)"
  else
    log "installing $ENV_FILE from config/archive.env.example: set the broker and the login there"
    install -m 0640 -o root -g root "$SRC/config/archive.env.example" "$ENV_FILE"
  fi
}

# Read by systemd as root (LoadCredential=), never by the archive's user.
install_password() {
  if [[ -e "$PASSWORD_PATH" ]]; then
    log "keeping $PASSWORD_PATH (never overwritten)"
  else
    log "creating $PASSWORD_PATH, empty: write the archive's broker password in it"
    (umask 077; : > "$PASSWORD_PATH")
  fi
  chown root:root "$PASSWORD_PATH"
  chmod 0600 "$PASSWORD_PATH"
}

# 4. HL7 folder ----------------------------------------------------------------------------------------
hl7_dir() {
  [[ "$HL7" == 1 ]] || return 0
  if [[ -n "$HL7_GROUP" ]]; then
    log "HL7 folder $HL7_DIR: $SERVICE_USER's, group $HL7_GROUP (2770: its members read and remove the files)"
    install -d -m 2770 -o "$SERVICE_USER" -g "$HL7_GROUP" "$HL7_DIR"
  elif [[ -d "$HL7_DIR" ]]; then
    log "keeping the HL7 folder $HL7_DIR as it is (HL7_GROUP=GROUP gives it to the interface engine's group)"
  else
    log "HL7 folder $HL7_DIR: $SERVICE_USER's, 0750 (HL7_GROUP=GROUP lets the interface engine's group in)"
    install -d -m 0750 -o "$SERVICE_USER" -g "$SERVICE_USER" "$HL7_DIR"
  fi
}

# 5. unit and docs ---------------------------------------------------------------------------------------
install_unit() {
  install -m 0644 "$SRC/docs/ARCHIVE.md" "$SRC/docs/HL7.md" "$PREFIX/docs/"  # the unit's Documentation=
  install -m 0644 "$SRC/systemd/$UNIT" "$UNIT_DIR/$UNIT"
  systemctl daemon-reload
  systemctl enable "$UNIT"
}

# 6. what is left to do ----------------------------------------------------------------------------------
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
  local broker options username="" ca="" password_file="" hl7="" opt value i
  local -a words
  if cmp -s "$SRC/config/archive.env.example" "$ENV_FILE"; then
    todo "$ENV_FILE is still the example: set ARCHIVE_BROKER to your broker's address and ARCHIVE_OPTIONS (--ca-file, --username)"
  fi
  broker="$(env_value ARCHIVE_BROKER)"
  options="$(env_value ARCHIVE_OPTIONS)"
  read -ra words <<< "$options"
  for ((i = 0; i < ${#words[@]}; i++)); do
    opt="${words[i]}"
    case "$opt" in
      --username|--ca-file|--password-file|--hl7-dir) value="${words[i+1]:-}"; i=$((i + 1)) ;;
      --username=*|--ca-file=*|--password-file=*|--hl7-dir=*) value="${opt#*=}"; opt="${opt%%=*}" ;;
      *) continue ;;
    esac
    case "$opt" in
      --username) username="$value" ;;
      --ca-file) ca="$value" ;;
      --password-file) password_file="$value" ;;
      --hl7-dir) hl7="$value" ;;
    esac
  done
  case "$broker" in
    "") todo "$ENV_FILE sets no ARCHIVE_BROKER: the broker's address, mqtts://HOST:8883 (or mqtt://HOST:1883)" ;;
    mqtts://*) [[ -n "$ca" ]] || todo "ARCHIVE_BROKER is mqtts:// but ARCHIVE_OPTIONS names no --ca-file (the CA of the broker's certificate): the archive refuses to start" ;;
    mqtt://*) ;;
    *) todo "ARCHIVE_BROKER=$broker is not mqtt://HOST:PORT or mqtts://HOST:PORT" ;;
  esac
  if [[ -n "$ca" ]]; then
    if [[ ! -f "$ca" ]]; then
      todo "put the CA certificate of the broker's certificate at $ca (--ca-file in ARCHIVE_OPTIONS)"
    elif ! runuser -u "$SERVICE_USER" -- test -r "$ca"; then
      todo "$ca cannot be read by $SERVICE_USER (the archive reads it as that user): put it where that user can, e.g. /usr/local/share/ca-certificates/, and name it in ARCHIVE_OPTIONS"
    fi
  fi
  # A file holding only a line ending ("echo > file"), after a byte order mark or not, is empty.
  local held
  held="$(tr -d '\r\n' < "$PASSWORD_PATH" | LC_ALL=C sed '1s/^\xef\xbb\xbf//')"
  if [[ -n "$username" && -z "$password_file" && -z "$held" ]]; then
    todo "write the broker password of user '$username' into $PASSWORD_PATH (it stays root-only, 0600; systemd hands it to the archive): empty, the archive refuses to start"
  elif [[ -z "$username" && -n "$held" ]]; then
    log "note: $PASSWORD_PATH holds a password but ARCHIVE_OPTIONS names no --username: the archive logs in without one"
  fi
  if [[ "$HL7" == 1 && -z "$hl7" ]]; then
    todo "add --hl7-dir $HL7_DIR to ARCHIVE_OPTIONS in $ENV_FILE for the archive to write HL7 messages there (docs/HL7.md)"
  elif [[ -n "$hl7" && ! -d "$hl7" ]]; then
    todo "ARCHIVE_OPTIONS names --hl7-dir $hl7, which does not exist: HL7=1 (or HL7_GROUP=GROUP) makes $HL7_DIR; another folder also needs ReadWritePaths= in a drop-in (docs/HL7.md)"
  fi
}

archived() {  # what the archive holds, read as its user the way `find` is run
  if [[ ! -f "$STATE_DIR/index.sqlite" ]]; then
    log "no report archived yet in $STATE_DIR"
    return 0
  fi
  local out
  if out="$(runuser -u "$SERVICE_USER" -- "$VENV/bin/smearscope" archive find --dir "$STATE_DIR" --json 2>&1)"; then
    log "the archive in $STATE_DIR holds $(grep -c '^{' <<< "$out") report(s) (smearscope archive find --dir $STATE_DIR)"
  elif [[ -z "$out" || "$out" == *"no archived report matches"* ]]; then
    log "no report archived yet in $STATE_DIR"
  else
    todo "smearscope archive find --dir $STATE_DIR failed as $SERVICE_USER: $out"
  fi
}

main() {
  preflight
  service_user
  install_venv
  state_dir
  install_env
  install_password
  hl7_dir
  install_unit
  check_env
  archived
  if [[ ${#TODO[@]} -gt 0 ]]; then
    log "left to do:"
    printf '    - %s\n' "${TODO[@]}"
    if [[ "${START:-0}" == 1 ]]; then
      log "not started (the above first); then: sudo systemctl restart $UNIT && journalctl -u smearscope-archive -f"
      exit 1
    fi
    log "then: sudo systemctl restart $UNIT && journalctl -u smearscope-archive -f"
    return 0
  fi
  if [[ "${START:-0}" == 1 ]]; then
    systemctl restart "$UNIT"
    log "started; follow it with: journalctl -u smearscope-archive -f"
  else
    log "installed; start with: sudo systemctl restart $UNIT && journalctl -u smearscope-archive -f"
  fi
}

# Sourced (tests/test_install_archive.py): the functions only.
[[ "${BASH_SOURCE[0]}" == "$0" ]] || return 0
main "$@"
