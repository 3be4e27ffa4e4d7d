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
# shellcheck disable=SC2034  # SERVICE_HOME, UNIT_DOCS, ENV_HINT ...: read by install-common.sh
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
SERVICE_HOME="$STATE_DIR"
SERVICE_NOUN="archive's"
UNIT=smearscope-archive.service
UNIT_DOCS=(ARCHIVE.md HL7.md)
VENV="$PREFIX/venv"
ENV_FILE="$CONF_DIR/archive.env"
ENV_EXAMPLE="$SRC/config/archive.env.example"
ENV_HINT="set the broker and the login there"
PASSWORD_PATH="$CONF_DIR/archive-mqtt-password"
# Marks the venv as this script's: it upgrades that one (and install-dashboard.sh's, the same
# checkout's), and leaves any other (a station's) alone.
VENV_MARK=".installed-by-install-archive"
OTHER_VENV_MARK=".installed-by-install-dashboard"

# Steps 1, 2, 3 (env and password files) and 5, and the checks shared with install-dashboard.sh.
if [[ ! -f "$SRC/systemd/install-common.sh" ]]; then  # a copy of this script alone, outside a checkout
  printf 'error: run from a smearscope checkout (%s has no systemd/install-common.sh)\n' "$SRC" >&2
  exit 1
fi
# shellcheck source=systemd/install-common.sh disable=SC1091
source "$SRC/systemd/install-common.sh"

preflight() {
  preflight_common "Without systemd run \`smearscope archive --broker ... --dir DIR --password-file FILE\` under the machine's own service manager (docs/ARCHIVE.md)"
  if [[ -n "$HL7_GROUP" ]] && ! getent group "$HL7_GROUP" >/dev/null; then
    die "HL7_GROUP=$HL7_GROUP: no such group on this machine (the group of the interface engine's user, e.g. mirth)"
  fi
}

# 3. state directory -----------------------------------------------------------------------------------
state_dir() {
  install -d -m 0750 -o "$SERVICE_USER" -g "$SERVICE_USER" "$STATE_DIR"
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

# 6. what is left to do ----------------------------------------------------------------------------------
check_env() {
  local broker options username="" ca="" password_file="" hl7="" opt value i
  local -a words
  if cmp -s "$ENV_EXAMPLE" "$ENV_FILE"; then
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
  local held
  held="$(password_held)"
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
  finish "started; follow it with: journalctl -u smearscope-archive -f"
}

# Sourced (tests/test_install_archive.py): the functions only.
[[ "${BASH_SOURCE[0]}" == "$0" ]] || return 0
main "$@"
