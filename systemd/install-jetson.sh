#!/usr/bin/env bash
# Install the smearscope station daemon on an NVIDIA Jetson, idempotently.
# Supported: JetPack 6 (Ubuntu 22.04, Python 3.10). JetPack 5 (Python 3.8) is not: smearscope needs
# Python 3.10 or newer. The TensorRT backend needs TensorRT 10 (JetPack 6.1+); on JetPack 6.0
# (TensorRT 8.6) use engine_backend "onnxruntime". Not yet run on a Jetson (docs/RESULTS.md).
#
#   sudo ./systemd/install-jetson.sh            # from a checkout of the repository
#   sudo MQTT_PASSWORD_FILE=/root/pw ./systemd/install-jetson.sh
#   sudo START=1 ./systemd/install-jetson.sh    # also (re)start the service at the end
#
# Steps:
#   1. system user `smearscope` (no login, no home) in the video, render (and jtop) groups
#   2. venv in /opt/smearscope/venv (--system-site-packages) with the `jetson` extra installed the
#      JetPack 6 way: tensorrt from JetPack itself (apt package python3-libnvinfer, seen through
#      the system site packages), onnxruntime-gpu (and pycuda, when it has a wheel there) from
#      NVIDIA's Jetson AI Lab index (JETSON_INDEX) in place of the CPU onnxruntime, jetson-stats
#      from PyPI; numpy kept below 2 (systemd/jetpack-constraints.txt) for JetPack's OpenCV (built
#      with GStreamer for the CSI camera); ends by importing cv2, numpy and onnxruntime
#   3. /var/lib/smearscope owned by the service user; /etc/smearscope/station.toml from the
#      example, if there is none yet (never overwritten), and the models (carried by the package)
#      installed where its analysis.models_dir points, sha256 checked
#   4. the MQTT password as a root-only file, handed to the service by LoadCredential=; with no
#      password the new config names no password credential (the daemon refuses an empty one)
#   5. the unit, plus a drop-in allowing the GPU device nodes this board actually has
#   6. daemon-reload, validate the config; with engine_backend "tensorrt" build the engines its
#      tensorrt_precision and tensorrt_lanes name (`smearscope build-engines`; int8 needs
#      CALIBRATION_DIR unless a former build saved its calibration caches); `smearscope doctor`
#      (with a copy of the MQTT password as the unit hands it over: the login and the ACL checked),
#      which must pass, or fail only checks the running station recovers from (exit 3: a camera
#      not there; said as a warning); only then enable the unit (and with START=1 start it). A failed
#      step stops the script (exit 1) before the unit is enabled, saying which step failed.
# Environment knobs: PREFIX, CONF_DIR, PYTHON, EXTRAS (jetson; "" for JetPack 6.0's ONNX Runtime
# on the CPU; a comma-separated list), JETSON_INDEX, MQTT_PASSWORD_FILE, CALIBRATION_DIR, START.
set -euo pipefail

SRC="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PREFIX="${PREFIX:-/opt/smearscope}"
CONF_DIR="${CONF_DIR:-/etc/smearscope}"
PYTHON="${PYTHON:-python3}"
EXTRAS="${EXTRAS-jetson}"   # set but empty: no extra (JetPack 6.0: engine_backend "onnxruntime")
# NVIDIA's Jetson AI Lab index for JetPack 6.1/6.2 (CUDA 12.6); JetPack 6.0 (CUDA 12.2): jp6/cu122.
JETSON_INDEX="${JETSON_INDEX:-https://pypi.jetson-ai-lab.io/jp6/cu126/+simple/}"
CONSTRAINTS="$SRC/systemd/jetpack-constraints.txt"
SERVICE_USER=smearscope
STATE_DIR=/var/lib/smearscope
UNIT_DIR=/etc/systemd/system
DROPIN_DIR="$UNIT_DIR/smearscope.service.d"

log() { printf '==> %s\n' "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# 1. user and groups --------------------------------------------------------------------------
# The unit names video and render in SupplementaryGroups=, but doctor (step 6) runs as the user
# through runuser, which gives it only the groups /etc/group lists: the user is made a member, or
# a camera node root:video 0660 fails doctor's `camera access` and stops the install.
service_user() {
  if ! id -u "$SERVICE_USER" >/dev/null 2>&1; then
    log "creating system user $SERVICE_USER"
    useradd --system --user-group --home-dir /var/lib/smearscope --no-create-home \
            --shell /usr/sbin/nologin "$SERVICE_USER"
  fi
  local group
  for group in video render; do  # a group the unit names that is missing would stop it starting
    getent group "$group" >/dev/null || { log "creating group $group"; groupadd --system "$group"; }
  done
  usermod -aG video,render "$SERVICE_USER"
  # jetson-stats' socket /run/jtop.sock is group jtop; telemetry falls back to sysfs without it.
  if getent group jtop >/dev/null; then usermod -aG jtop "$SERVICE_USER"; fi
}

# 2. virtual environment ----------------------------------------------------------------------
# The `jetson` extra the JetPack 6 way. PyPI has no onnxruntime-gpu wheel for Python 3.10 on
# aarch64 and its tensorrt is NVIDIA's server build, not JetPack's, so `pip install .[jetson]`
# cannot work on a Jetson: tensorrt must come from JetPack (python3-libnvinfer), onnxruntime-gpu
# from the Jetson AI Lab index, and the CPU onnxruntime (a base dependency) must go first: both
# wheels install the same `onnxruntime` module, so uninstalling one after the other would delete
# the other's files. The members are read from the package's own metadata (pyproject's extra).
install_jetson_extra() {
  local venv="$PREFIX/venv" req others=() ort_gpu=""
  local -a pip=("$venv/bin/pip" install --quiet --constraint "$CONSTRAINTS")
  local -a reqs
  mapfile -t reqs < <("$venv/bin/python" -c 'from importlib.metadata import requires
for r in requires("smearscope") or []:
    req, _, marker = r.partition(";")
    if "extra" in marker and "\"jetson\"" in marker:
        print(req.strip())')
  [[ ${#reqs[@]} -gt 0 ]] || die "the installed smearscope declares no jetson extra"
  for req in "${reqs[@]}"; do
    case "$req" in
      tensorrt*)
        "$venv/bin/python" -c 'import sys, tensorrt
sys.exit(int(tensorrt.__version__.split(".")[0]) < 10)' 2>/dev/null \
          || die "$req is needed from JetPack, not pip: sudo apt install python3-libnvinfer (TensorRT 10 is JetPack 6.1+; on JetPack 6.0 install with EXTRAS=\"\" and set engine_backend = \"onnxruntime\")"
        log "tensorrt $("$venv/bin/python" -c 'import tensorrt; print(tensorrt.__version__)') from JetPack" ;;
      onnxruntime-gpu*) ort_gpu="$req" ;;
      *) others+=("$req") ;;
    esac
  done
  if "$venv/bin/pip" show --quiet onnxruntime >/dev/null 2>&1; then
    log "removing the CPU onnxruntime: onnxruntime-gpu replaces it"
    "$venv/bin/pip" uninstall --quiet --yes onnxruntime
  fi
  # --prefer-binary: the Jetson index's wheel (built for JetPack's CUDA) over a newer PyPI sdist;
  # pycuda without a wheel there is built against /usr/local/cuda (nvcc, python3-dev needed).
  log "installing ${ort_gpu:-} ${others[*]} (Jetson AI Lab index $JETSON_INDEX, then PyPI)"
  PATH="/usr/local/cuda/bin:$PATH" CUDA_ROOT=/usr/local/cuda "${pip[@]}" --prefer-binary \
    --extra-index-url "$JETSON_INDEX" ${ort_gpu:+"$ort_gpu"} "${others[@]}"
  if [[ -n "$ort_gpu" ]]; then  # a re-run's base install put the CPU wheel's files over it
    "${pip[@]}" --prefer-binary --extra-index-url "$JETSON_INDEX" --force-reinstall --no-deps "$ort_gpu"
  fi
}

install_packages() {
  local venv="$PREFIX/venv" part jetson=0 spec="$SRC"
  local -a parts extras=()
  IFS=',' read -ra parts <<< "${EXTRAS// /}"
  for part in "${parts[@]}"; do
    case "$part" in
      "") ;;
      jetson) jetson=1 ;;
      *) extras+=("$part") ;;
    esac
  done
  if [[ ${#extras[@]} -gt 0 ]]; then spec="${SRC}[$(IFS=,; echo "${extras[*]}")]"; fi
  log "installing smearscope${EXTRAS:+[$EXTRAS]} into $venv"
  install -d -m 0755 "$PREFIX" "$PREFIX/docs"
  # a venv whose ensurepip failed (no python3-venv) has its python but no pip: make it again
  if [[ ! -x "$venv/bin/python" || ! -x "$venv/bin/pip" ]]; then
    "$PYTHON" -m venv --system-site-packages "$venv" \
      || die "cannot make a venv with $PYTHON in $venv (JetPack/Ubuntu: sudo apt install python3-venv, then run this again)"
  fi
  "$venv/bin/pip" install --quiet --upgrade pip
  # numpy < 2 (the constraints file): JetPack's OpenCV, used below, is built for numpy 1.x.
  "$venv/bin/pip" install --quiet --constraint "$CONSTRAINTS" "$spec"
  if [[ $jetson == 1 ]]; then install_jetson_extra; fi
  # pip's opencv-python-headless has no GStreamer, so it cannot open nvarguscamerasrc pipelines.
  # Prefer JetPack's OpenCV when the system one has GStreamer.
  local has_gst='import cv2, re, sys; sys.exit(not re.search(r"GStreamer:\s+YES", cv2.getBuildInformation()))'
  if ! "$venv/bin/python" -c "$has_gst" 2>/dev/null && /usr/bin/python3 -c "$has_gst" 2>/dev/null; then
    log "using JetPack's OpenCV (with GStreamer) instead of opencv-python-headless"
    "$venv/bin/pip" uninstall --quiet --yes opencv-python-headless
  fi
  local out
  if ! out="$("$venv/bin/python" -c 'import cv2, numpy, onnxruntime
print(f"cv2 {cv2.__version__} ({cv2.__file__}), numpy {numpy.__version__}, onnxruntime "
      f"{onnxruntime.__version__}, providers {onnxruntime.get_available_providers()}")' 2>&1)"; then
    die "the venv cannot import cv2, numpy and onnxruntime together:
$out
(JetPack's OpenCV needs numpy < 2: $venv/bin/pip install --constraint $CONSTRAINTS 'numpy<2'; onnxruntime-gpu from $JETSON_INDEX)"
  fi
  log "$out"
}

# 3. state directory and configuration --------------------------------------------------------
config_value() {  # a dotted field of $CONF_DIR/station.toml as the daemon reads it ("" for None)
  "$PREFIX/venv/bin/python" -c 'import sys
from smearscope.service.config import load_config
value = load_config(sys.argv[1])
for name in sys.argv[2].split("."):
    value = getattr(value, name)
print("" if value is None else value)' "$CONF_DIR/station.toml" "$1"
}

# The unit's StateDirectory= would chown /var/lib/smearscope at the first start, but the doctor run
# below comes first: a root-owned state directory made the outbox check fail on a sound install.
state_dir() {
  install -d -m 0750 -o "$SERVICE_USER" -g "$SERVICE_USER" "$STATE_DIR"
}

# 4. MQTT password credential (read by systemd as root, never by the config loader) ------------
# The daemon refuses an empty credential (exit 78, which the unit does not restart), so a config
# must not name one the installer left empty. The file itself always exists: the unit's
# LoadCredential= names it. $1: 1 when step 3 installed the example config just now.
mqtt_password() {
  local fresh="$1" conf="$CONF_DIR/station.toml" named password=""
  PASSWORD_PATH="$CONF_DIR/mqtt-password"
  if [[ -n "${MQTT_PASSWORD_FILE:-}" ]]; then
    install -m 0600 -o root -g root "$MQTT_PASSWORD_FILE" "$PASSWORD_PATH"
  elif [[ ! -f "$PASSWORD_PATH" ]]; then
    if [[ -t 0 ]]; then read -rsp "MQTT password (empty for none): " password || password=""; echo; fi
    (umask 077; printf '%s' "$password" > "$PASSWORD_PATH")
  fi
  chown root:root "$PASSWORD_PATH"; chmod 0600 "$PASSWORD_PATH"
  named="$(config_value mqtt.password_credential)" \
    || die "cannot read mqtt.password_credential from $conf"
  if [[ -n "$named" && "$named" != mqtt-password ]]; then
    log "warning: $conf names the password credential '$named'; the unit loads only 'mqtt-password' (add LoadCredential=$named:... in a drop-in: systemctl edit smearscope)"
  fi
  # A file holding only a line ending ("echo > file"), after a byte order mark or not, is as empty
  # to the daemon as no file.
  if [[ -n "$(tr -d '\r\n' < "$PASSWORD_PATH" | LC_ALL=C sed '1s/^\xef\xbb\xbf//')" ]]; then
    [[ -n "$named" ]] || log "note: $PASSWORD_PATH holds a password but $conf names no [mqtt] password_credential, so the station logs in without it; to use it: password_credential = \"mqtt-password\""
    return 0
  fi
  if [[ -z "$named" ]]; then
    log "no MQTT password ($PASSWORD_PATH is empty or only a line ending) and $conf names none: the station logs in without one"
  elif [[ "$fresh" == 1 ]]; then
    sed -i 's/^\(password_credential[[:space:]]*=\)/# \1/' "$conf"
    named="$(config_value mqtt.password_credential)" || die "cannot read $conf after editing it"
    [[ -z "$named" ]] || die "could not comment out password_credential in $conf"
    log "no MQTT password given: $conf names no password credential (password_credential commented out in [mqtt]), so the station logs in without a password. To add one: write it to $PASSWORD_PATH (root, mode 0600), uncomment password_credential, sudo systemctl restart smearscope"
  else
    log "warning: $conf names the password credential '$named' but $PASSWORD_PATH is empty (or only a line ending): the station would refuse to start (exit 78, and systemd does not restart it). Put the broker password in $PASSWORD_PATH (root, mode 0600), or remove password_credential from [mqtt] for a broker without passwords"
    PASSWORD_PROBLEM=1
  fi
}

# The example config where there is none (never overwritten). CONFIG_FRESH=1 when the config is the
# example as this script installs it, now or by a run that stopped after copying it: ours to edit.
install_config() {
  CONFIG_FRESH=0
  if [[ ! -f "$CONF_DIR/station.toml" ]]; then
    log "installing example config to $CONF_DIR/station.toml: edit station_id, source and mqtt"
    install -m 0640 -o root -g "$SERVICE_USER" "$SRC/config/station.example.toml" "$CONF_DIR/station.toml"
    CONFIG_FRESH=1
  elif cmp -s "$SRC/config/station.example.toml" "$CONF_DIR/station.toml"; then
    CONFIG_FRESH=1
  fi
}

# 6. engines, doctor, and only then enable -----------------------------------------------------
# The TensorRT engines the config's engine_backend, tensorrt_precision and tensorrt_lanes name, in
# MODELS/engines where the station looks. $1: the models folder (analysis.models_dir).
build_engines() {
  local models="$1" backend precision lanes
  backend="$(config_value analysis.engine_backend)" || die "cannot read analysis.engine_backend from $CONF_DIR/station.toml"
  if [[ "$backend" != tensorrt ]]; then
    log "engine_backend $backend: no TensorRT engines to build"
    return 0
  fi
  precision="$(config_value analysis.tensorrt_precision)" || die "cannot read analysis.tensorrt_precision"
  lanes="$(config_value analysis.tensorrt_lanes)" || die "cannot read analysis.tensorrt_lanes"
  local -a cmd=("$PREFIX/venv/bin/smearscope" build-engines --models "$models" --precision "$precision" --lanes "$lanes")
  if [[ -n "${CALIBRATION_DIR:-}" ]]; then cmd+=(--calibration "$CALIBRATION_DIR"); fi
  log "building the TensorRT engines ($precision, $lanes lanes) into $models/engines (minutes per model)"
  runuser -u "$SERVICE_USER" -- "${cmd[@]}" \
    || die "smearscope build-engines failed (above); the service is not enabled. Fix it (int8: CALIBRATION_DIR=a folder of canonical tiles/crops, one subfolder per model), then run this script again"
}

# The broker login and its ACL are checked by doctor only with the password the unit hands over: a
# copy of the credential for the service user, as LoadCredential= gives it, in a folder of its own
# that check_and_enable removes after doctor. Prints the folder ("" where the config names no
# password credential, the unit's is not the one it names, or the file is empty).
doctor_credentials() {
  local named folder
  named="$(config_value mqtt.password_credential)" || return 0
  [[ "$named" == mqtt-password && -n "$(tr -d '\r\n' < "$CONF_DIR/mqtt-password" 2>/dev/null)" ]] || return 0
  folder="$(mktemp -d)"
  install -m 0400 -o "$SERVICE_USER" -g "$SERVICE_USER" "$CONF_DIR/mqtt-password" "$folder/$named"
  chown "$SERVICE_USER:$SERVICE_USER" "$folder"
  chmod 0500 "$folder"
  printf '%s' "$folder"
}

# Doctor must pass before the unit is enabled: an enabled unit that cannot run fails at every boot.
# $1: the models folder.
check_and_enable() {
  local conf="$CONF_DIR/station.toml"
  systemctl daemon-reload
  systemd-analyze verify "$UNIT_DIR/smearscope.service" \
    || die "systemd-analyze verify refuses $UNIT_DIR/smearscope.service (above); the service is not enabled"
  runuser -u "$SERVICE_USER" -- "$PREFIX/venv/bin/smearscope" validate-config "$conf" \
    || die "$conf does not validate (above); the service is not enabled. Fix it, then run this script again"
  build_engines "$1"
  # doctor's exit 3: its only FAILs are ones the running station recovers from (a camera not there
  # or not answering: the station waits for it), so a camera unplugged now does not block the unit
  local doctor=0
  DOCTOR_CREDS="$(doctor_credentials)"
  trap '[[ -z "${DOCTOR_CREDS:-}" ]] || rm -rf -- "$DOCTOR_CREDS"' EXIT  # the password's copy, whatever happens
  runuser -u "$SERVICE_USER" -- env ${DOCTOR_CREDS:+CREDENTIALS_DIRECTORY="$DOCTOR_CREDS"} \
    "$PREFIX/venv/bin/smearscope" doctor --config "$conf" || doctor=$?
  [[ -z "$DOCTOR_CREDS" ]] || rm -rf -- "$DOCTOR_CREDS"
  DOCTOR_CREDS=""
  if [[ $doctor == 3 ]]; then
    log "warning: smearscope doctor: only checks the running station recovers from failed (its FAIL lines above);" \
      "the service is enabled all the same: it waits for the camera and opens it when it comes." \
      "Plug the camera in, or set [source] device in $conf to the one 'v4l2-ctl --list-devices' shows" \
      "(then: sudo systemctl restart smearscope), and watch it with: journalctl -u smearscope -f"
  elif [[ $doctor != 0 ]]; then
    die "smearscope doctor failed (its FAIL lines above); the service is not enabled. Fix them, then run this script again"
  fi
  if [[ ${PASSWORD_PROBLEM:-0} == 1 ]]; then
    die "the MQTT password credential is empty (step 4 above); the service is not enabled. Fix it, then run this script again"
  fi
  systemctl enable smearscope.service
  if [[ "${START:-0}" == 1 ]]; then
    systemctl restart smearscope.service
    log "enabled and started; follow it with: journalctl -u smearscope -f"
  else
    log "enabled; start with: sudo systemctl start smearscope && journalctl -u smearscope -f"
  fi
}

# Sourced (tests/test_install_script.py): the functions only.
[[ "${BASH_SOURCE[0]}" == "$0" ]] || return 0

# Checks, then the steps ---------------------------------------------------------------------
[[ $EUID -eq 0 ]] || die "run as root (sudo $0)"
[[ -f "$SRC/pyproject.toml" ]] || die "run from a smearscope checkout ($SRC has no pyproject.toml)"
[[ -f /etc/nv_tegra_release ]] || log "warning: /etc/nv_tegra_release missing; not a Jetson?"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
  || die "$PYTHON is older than 3.10 (JetPack 5?): smearscope needs JetPack 6 (Python 3.10)"

# 1. user and groups --------------------------------------------------------------------------
service_user
# 2. virtual environment ----------------------------------------------------------------------
install_packages
install -m 0644 "$SRC/docs/STATION.md" "$PREFIX/docs/STATION.md"

# 3. state directory and configuration --------------------------------------------------------
state_dir
install -d -m 0750 -o root -g "$SERVICE_USER" "$CONF_DIR"
install_config
# The models travel in the package; put them where the config looks, hashes checked.
MODELS_DIR="$(config_value analysis.models_dir)" \
  || die "cannot read analysis.models_dir from $CONF_DIR/station.toml"
log "installing the models into $MODELS_DIR"
install -d -m 0755 -o "$SERVICE_USER" -g "$SERVICE_USER" "$MODELS_DIR"
runuser -u "$SERVICE_USER" -- "$PREFIX/venv/bin/smearscope" install-models "$MODELS_DIR"

# 4. MQTT password credential -----------------------------------------------------------------
PASSWORD_PROBLEM=0
mqtt_password "$CONFIG_FRESH"

# 5. unit and device drop-in ------------------------------------------------------------------
install -m 0644 "$SRC/systemd/smearscope.service" "$UNIT_DIR/smearscope.service"
install -d -m 0755 "$DROPIN_DIR"
{
  echo "# Generated by install-jetson.sh: the GPU/codec device nodes found on this board."
  echo "[Service]"
  for node in /dev/nvmap /dev/nvhost-* /dev/nvgpu/*/* /dev/host1x-fence /dev/nvidia* \
              /dev/dri/* /dev/video*; do
    if [[ -c "$node" ]]; then echo "DeviceAllow=$node rw"; fi
  done
} > "$DROPIN_DIR/10-jetson-devices.conf"
chmod 0644 "$DROPIN_DIR/10-jetson-devices.conf"

# 6. engines, doctor, and only then enable -----------------------------------------------------
check_and_enable "$MODELS_DIR"
