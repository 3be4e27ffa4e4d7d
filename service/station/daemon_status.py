"""What the station daemon says of itself: the `status` command's answer, systemd's STATUS= line
and the telemetry's pipeline figures. `DaemonStatus` is a part of `StationDaemon`
(service.station.daemon), which holds the parts it reads."""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Any

from smearscope.device.sources import FrameSource
from smearscope.device.telemetry import TelemetryReader
from smearscope.service.analysis.wording import counted
from smearscope.service.config import StationConfig
from smearscope.service.mqtt.outbox import Outbox
from smearscope.service.mqtt.publisher import MqttPublisher
from smearscope.service.station.calibration_watch import published
from smearscope.service.station.daemon_summary import Stats
from smearscope.service.station.notify import ProgressWatchdog
from smearscope.service.station.specimen import SpecimenTracker
from smearscope.service.station.workers import StationWorkers


class DaemonStatus:
    """The daemon's status, STATUS= line and telemetry, read from its parts."""

    config: StationConfig
    stats: Stats
    tracker: SpecimenTracker
    workers: StationWorkers
    watchdog: ProgressWatchdog
    outbox: Outbox | None
    publisher: MqttPublisher | None
    source: FrameSource | None
    _stop: threading.Event
    _started_at: float
    _telemetry_reader: TelemetryReader

    def status(self) -> dict[str, Any]:
        snap = self.stats.snapshot()
        progress = self.tracker.progress()
        out: dict[str, Any] = {
            "station_id": self.config.station_id,
            "state": "stopping" if self._stop.is_set() else
                     "paused: disk_full" if self.workers.disk_full else "running",
            "disk_full": self.workers.disk_full,
            "uptime_s": round(time.monotonic() - self._started_at, 1),
            "fields_analysed": snap["analysed"], "rejected": snap["rejected"], "failed": snap["failed"],
            "frames_dropped": self.workers.frames.dropped,
            "source_rejected_files": getattr(self.source, "rejected_count", 0),  # by its reason code:
            "source_rejected": dict(getattr(self.source, "rejected_reasons", {})),
            "reports_stored": snap["stored"],
            "reports_lost": snap["lost"], "reports_deferred": snap["deferred"],
            "run": progress.as_dict() if progress else None, "fields_outside_runs": self.tracker.fields_outside_runs,
            "stalled_work": self.watchdog.stalled_work(),
            # a camera now: 'opening', 'reading', 'reconnect_wait', 'idle', 'closed' (device.camera_reads)
            "source_state": getattr(self.source, "state", None),
        }
        if (camera := self._camera_hangs()) is not None:
            out["camera"] = camera
        if self.outbox is not None:
            out["outbox"] = dataclasses.asdict(self.outbox.counts())
        if self.publisher is not None:
            st = self.publisher.state
            out["broker"] = {"status": st.status, "last_error": st.last_error,
                             "delivered": st.delivered, "in_flight": st.in_flight,
                             "parked": st.parked, "max_packet_size": st.max_packet_size,
                             "parked_detail": self.publisher.parked()}
        return out

    def status_line(self) -> str:
        snap = self.stats.snapshot()
        rejected = sum(snap["rejected"].values()) + getattr(self.source, "rejected_count", 0)
        failed = sum(snap["failed"].values())
        parts = [f"{counted(snap['analysed'], 'field')} analysed, {rejected} rejected, {failed} failed"]
        if self.workers.disk_full:
            parts.insert(0, "PAUSED: outbox disk full")
        if (camera := getattr(self.source, "camera", None)) is not None and camera.recovering:  # said at ERROR
            parts.insert(0, f"CAMERA HUNG (no frame since): {getattr(self.source, 'state', None)}")
        progress = self.tracker.progress()
        if progress is not None:
            parts.append(f"run {progress.run_id[:8]} {progress.classified_wbc}/"
                         f"{progress.target_wbc} WBC")
        if self.outbox is not None:
            counts = self.outbox.counts()
            parts.append(f"outbox {counts.messages} ({counts.reports} reports)")
        if self.publisher is not None:
            st = self.publisher.state  # not connected: why, for `systemctl status`
            parts.append(f"broker {st.status}" + (f": {st.last_error}" if st.last_error and not st.connected else ""))
            if st.parked:  # reports that do not arrive (service.mqtt.parked), for `systemctl status`
                # read from the outbox when the parked set changed, else at most once a telemetry period
                held = self.publisher.parked(max_age_s=self.config.mqtt.telemetry_interval_s)
                parts.append(f"{held['messages']} message{'' if held['messages'] == 1 else 's'} parked "
                             f"({held['too_large']} too large for the broker"
                             f"{'; the outbox cannot be read: ' + held['read_error'] if held['read_error'] else ''})")
        return "; ".join(parts)

    def _telemetry(self) -> dict[str, Any]:
        snap = self.stats.snapshot()
        pipeline = {"fields_analysed": snap["analysed"],  # rejected: by the station and by its source
                    "rejected": sum(snap["rejected"].values()) + getattr(self.source, "rejected_count", 0),
                    "failed": sum(snap["failed"].values()),
                    "frames_dropped": self.workers.frames.dropped,
                    "disk_full": self.workers.disk_full, "source_state": getattr(self.source, "state", None),
                    "outbox_messages": self.outbox.counts().messages if self.outbox else None}
        # flat, as the dashboard lists a sample's pipeline: camera_hung_calls ... (None: not a camera)
        hangs = self._camera_hangs() or dict.fromkeys(("hung_calls", "stuck_threads", "last_hang_at", "recovering"))
        pipeline.update({f"camera_{k}": v for k, v in hangs.items()})
        return {**self._telemetry_reader.read(), "pipeline": pipeline, "calibration_watch": self._calibration_watch()}

    def _calibration_watch(self) -> dict[str, Any] | None:
        """The calibration watch's reading (service.station.calibration_watch); None when the station
        is uncalibrated or keeps no watch (`[specimen] calibration_watch_fields` 0)."""
        watch, spec = self.workers.calibration_watch, self.config.specimen
        if watch is None or self.config.microns_per_pixel is None or not spec.calibration_watch_fields:
            return None
        return published(watch.reading(spec.calibration_watch_fields, spec.calibration_watch_runs),
                         spec.calibration_watch_fields, spec.calibration_watch_runs)

    def _camera_hangs(self) -> dict[str, Any] | None:
        """A camera's hung calls (device.camera_reads); None for other sources."""
        if (camera := getattr(self.source, "camera", None)) is None:
            return None
        return {"hung_calls": camera.hung_calls, "stuck_threads": camera.stuck_threads,
                "last_hang_at": camera.last_hang_at, "recovering": camera.recovering}
