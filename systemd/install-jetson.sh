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
#   2. venv in /opt/smearscope/venv with the `jetson` extra, using JetPack's system packages
#      (TensorRT bindings, OpenCV built with GStreamer for the CSI camera)
#   3. /etc/smearscope/station.toml from the example, if there is none yet (never overwritten), and
#      the models (carried by the package) installed where its analysis.models_dir points, sha256
#      checked
#   4. the MQTT password as a root-only file, handed to the service by LoadCredential=
#   5. the unit, plus a drop-in allowing the GPU device nodes this board actually has
#   6. validate the config, daemon-reload, enable; `smearscope doctor` says what is still missing
# Environment knobs: PREFIX, CONF_DIR, PYTHON, EXTRAS, MQTT_PASSWORD_FILE, START.
set -euo pipefail

SRC="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PREFIX="${PREFIX:-/opt/smearscope}"
CONF_DIR="${CONF_DIR:-/etc/smearscope}"
PYTHON="${PYTHON:-python3}"
EXTRAS="${EXTRAS:-jetson}"
SERVICE_USER=smearscope
UNIT_DIR=/etc/systemd/system
DROPIN_DIR="$UNIT_DIR/smearscope.service.d"

log() { printf '==> %s\n' "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

[[ $EUID -eq 0 ]] || die "run as root (sudo $0)"
[[ -f "$SRC/pyproject.toml" ]] || die "run from a smearscope checkout ($SRC has no pyproject.toml)"
[[ -f /etc/nv_tegra_release ]] || log "warning: /etc/nv_tegra_release missing; not a Jetson?"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
  || die "$PYTHON is older than 3.10 (JetPack 5?): smearscope needs JetPack 6 (Python 3.10)"

# 1. user and groups --------------------------------------------------------------------------
if ! id -u "$SERVICE_USER" >/dev/null 2>&1; then
  log "creating system user $SERVICE_USER"
  useradd --system --user-group --home-dir /var/lib/smearscope --no-create-home \
          --shell /usr/sbin/nologin "$SERVICE_USER"
fi
# The unit names video and render in SupplementaryGroups=; a missing group would stop it starting.
for group in video render; do
  getent group "$group" >/dev/null || { log "creating group $group"; groupadd --system "$group"; }
done
# jetson-stats' socket /run/jtop.sock is group jtop; telemetry falls back to sysfs without it.
if getent group jtop >/dev/null; then usermod -aG jtop "$SERVICE_USER"; fi

# 2. virtual environment ----------------------------------------------------------------------
log "installing smearscope[$EXTRAS] into $PREFIX/venv"
install -d -m 0755 "$PREFIX" "$PREFIX/docs"
[[ -x "$PREFIX/venv/bin/python" ]] || "$PYTHON" -m venv --system-site-packages "$PREFIX/venv"
"$PREFIX/venv/bin/pip" install --quiet --upgrade pip
"$PREFIX/venv/bin/pip" install --quiet "$SRC[$EXTRAS]"
# pip's opencv-python-headless has no GStreamer, so it cannot open nvarguscamerasrc pipelines.
# Prefer JetPack's OpenCV when the system one has GStreamer.
HAS_GST='import cv2, re, sys; sys.exit(not re.search(r"GStreamer:\s+YES", cv2.getBuildInformation()))'
if ! "$PREFIX/venv/bin/python" -c "$HAS_GST" 2>/dev/null && /usr/bin/python3 -c "$HAS_GST" 2>/dev/null; then
  log "using JetPack's OpenCV (with GStreamer) instead of opencv-python-headless"
  "$PREFIX/venv/bin/pip" uninstall --quiet --yes opencv-python-headless
fi
install -m 0644 "$SRC/docs/STATION.md" "$PREFIX/docs/STATION.md"

# 3. configuration ----------------------------------------------------------------------------
install -d -m 0750 -o root -g "$SERVICE_USER" "$CONF_DIR"
if [[ ! -f "$CONF_DIR/station.toml" ]]; then
  log "installing example config to $CONF_DIR/station.toml: edit station_id, source and mqtt"
  install -m 0640 -o root -g "$SERVICE_USER" "$SRC/config/station.example.toml" "$CONF_DIR/station.toml"
fi
# The models travel in the package; put them where the config looks, hashes checked.
MODELS_DIR="$("$PREFIX/venv/bin/python" -c 'import sys
from smearscope.service.config import load_config
print(load_config(sys.argv[1]).analysis.models_dir)' "$CONF_DIR/station.toml")" \
  || die "cannot read analysis.models_dir from $CONF_DIR/station.toml"
log "installing the models into $MODELS_DIR"
install -d -m 0755 -o "$SERVICE_USER" -g "$SERVICE_USER" "$MODELS_DIR"
runuser -u "$SERVICE_USER" -- "$PREFIX/venv/bin/smearscope" install-models "$MODELS_DIR"

# 4. MQTT password credential (read by systemd as root, never by the config loader) ------------
PASSWORD_PATH="$CONF_DIR/mqtt-password"
if [[ -n "${MQTT_PASSWORD_FILE:-}" ]]; then
  install -m 0600 -o root -g root "$MQTT_PASSWORD_FILE" "$PASSWORD_PATH"
elif [[ ! -f "$PASSWORD_PATH" ]]; then
  if [[ -t 0 ]]; then
    read -rsp "MQTT password (empty for none): " password; echo
    (umask 077; printf '%s' "$password" > "$PASSWORD_PATH")
  else
    (umask 077; : > "$PASSWORD_PATH")
    log "warning: $PASSWORD_PATH is empty; put the broker password there (mode 0600, root)"
  fi
fi
chown root:root "$PASSWORD_PATH"; chmod 0600 "$PASSWORD_PATH"

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

# 6. check and enable -------------------------------------------------------------------------
systemctl daemon-reload
systemd-analyze verify "$UNIT_DIR/smearscope.service"
if ! runuser -u "$SERVICE_USER" -- "$PREFIX/venv/bin/smearscope" validate-config "$CONF_DIR/station.toml"; then
  log "fix $CONF_DIR/station.toml, then: sudo systemctl start smearscope"
  systemctl enable smearscope.service
  exit 1
fi
systemctl enable smearscope.service
runuser -u "$SERVICE_USER" -- "$PREFIX/venv/bin/smearscope" doctor --config "$CONF_DIR/station.toml" \
  || log "smearscope doctor found problems (above); fix them before starting"
if [[ "${START:-0}" == 1 ]]; then
  systemctl restart smearscope.service
  log "started; follow it with: journalctl -u smearscope -f"
else
  log "installed; start with: sudo systemctl start smearscope && journalctl -u smearscope -f"
fi
