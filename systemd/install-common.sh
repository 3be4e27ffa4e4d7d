# shellcheck shell=bash disable=SC2153  # PYTHON and the rest: the sourcing script sets them
# The steps install-archive.sh and install-dashboard.sh share, sourced by both from beside them (run
# them from the checkout's systemd/ folder: this file travels with them). Each script sets, before it
# calls these: SRC, PREFIX, CONF_DIR, SYSTEMD_RUN_DIR, PYTHON, SERVICE_USER, SERVICE_HOME, SERVICE_NOUN
# (whose: "archive's"), UNIT, UNIT_DOCS (the docs its Documentation= names), VENV, VENV_MARK,
# OTHER_VENV_MARK (the other script's: a venv it made is upgraded too), ENV_FILE, ENV_EXAMPLE, ENV_HINT
# and PASSWORD_PATH. A script whose venv mark differs defines its own mark_venv after sourcing this.

log() { printf '==> %s\n' "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }
TODO=()
todo() { TODO+=("$*"); }

# Checks before anything is changed ---------------------------------------------------------------
is_root() { [[ $EUID -eq 0 ]]; }

# Root, a checkout, systemd running, Python 3.10 or newer; $1: what to run instead without systemd.
preflight_common() {
  is_root || die "run as root (sudo $0)"
  [[ -f "$SRC/pyproject.toml" ]] || die "run from a smearscope checkout ($SRC has no pyproject.toml)"
  if [[ ! -d "$SYSTEMD_RUN_DIR" ]] || ! command -v systemctl >/dev/null 2>&1; then
    die "this machine does not run systemd (no $SYSTEMD_RUN_DIR or no systemctl): the $SERVICE_NOUN unit needs it. $1"
  fi
  local python="$PYTHON" version
  [[ -x "$VENV/bin/python" ]] && python="$VENV/bin/python"
  version="$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)" \
    || die "no Python found ($python): smearscope needs Python 3.10 or newer (e.g. apt install python3 python3-venv)"
  "$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
    || die "$python is Python $version: smearscope needs Python 3.10 or newer"
}

# user -------------------------------------------------------------------------------------------------
service_user() {
  if ! id -u "$SERVICE_USER" >/dev/null 2>&1; then
    log "creating system user $SERVICE_USER"
    useradd --system --user-group --home-dir "$SERVICE_HOME" --no-create-home --shell /usr/sbin/nologin \
            "$SERVICE_USER"
  fi
}

# virtual environment ------------------------------------------------------------------------------------
mark_venv() { touch "$VENV/$VENV_MARK"; }

install_venv() {
  install -d -m 0755 "$PREFIX" "$PREFIX/docs"
  # the other script's venv is the same checkout's: upgraded too; any other (a station's) left alone
  if [[ -x "$VENV/bin/python" && ! -f "$VENV/$VENV_MARK" && ! -f "$VENV/$OTHER_VENV_MARK" ]]; then
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
  mark_venv
  log "installing smearscope from $SRC into $VENV"
  "$VENV/bin/pip" install --quiet --upgrade pip
  "$VENV/bin/pip" install --quiet "$SRC"
  [[ -x "$VENV/bin/smearscope" ]] || die "pip installed no $VENV/bin/smearscope"
}

# environment file, password -------------------------------------------------------------------------------
install_env() {
  # /etc/smearscope is a station's already (0750 root:smearscope): left as it is (systemd reads as root).
  [[ -d "$CONF_DIR" ]] || install -d -m 0755 -o root -g root "$CONF_DIR"
  if [[ -e "$ENV_FILE" ]]; then
    log "keeping $ENV_FILE (never overwritten)"
  else
    log "installing $ENV_FILE from ${ENV_EXAMPLE#"$SRC/"}: $ENV_HINT"
    install -m 0640 -o root -g root "$ENV_EXAMPLE" "$ENV_FILE"
  fi
}

# Read by systemd as root (LoadCredential=), never by the service's user.
install_password() {
  if [[ -e "$PASSWORD_PATH" ]]; then
    log "keeping $PASSWORD_PATH (never overwritten)"
  else
    log "creating $PASSWORD_PATH, empty: write the $SERVICE_NOUN broker password in it"
    (umask 077; : > "$PASSWORD_PATH")
  fi
  chown root:root "$PASSWORD_PATH"
  chmod 0600 "$PASSWORD_PATH"
}

# unit and docs ------------------------------------------------------------------------------------------
install_unit() {
  install -m 0644 "${UNIT_DOCS[@]/#/$SRC/docs/}" "$PREFIX/docs/"  # the unit's Documentation=
  install -m 0644 "$SRC/systemd/$UNIT" "$UNIT_DIR/$UNIT"
  systemctl daemon-reload
  systemctl enable "$UNIT"
}

# what is left to do ---------------------------------------------------------------------------------------
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

# What the password file holds: a file holding only a line ending ("echo > file"), after a byte order
# mark or not, holds nothing.
password_held() {
  tr -d '\r\n' < "$PASSWORD_PATH" | LC_ALL=C sed '1s/^\xef\xbb\xbf//'
}

# The list left to do, or the unit (re)started with START=1; $1: what to say once it is started.
finish() {
  local follow="journalctl -u ${UNIT%.service} -f"
  if [[ ${#TODO[@]} -gt 0 ]]; then
    log "left to do:"
    printf '    - %s\n' "${TODO[@]}"
    if [[ "${START:-0}" == 1 ]]; then
      log "not started (the above first); then: sudo systemctl restart $UNIT && $follow"
      exit 1
    fi
    log "then: sudo systemctl restart $UNIT && $follow"
    return 0
  fi
  if [[ "${START:-0}" == 1 ]]; then
    systemctl restart "$UNIT"
    log "$1"
  else
    log "installed; start with: sudo systemctl restart $UNIT && $follow"
  fi
}
