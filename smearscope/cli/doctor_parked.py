"""`smearscope doctor`'s look at what a running station holds back: the outbox messages it parked
(refused by the broker as too large, or held back; service.mqtt.parked), reports the clinic has not
received. The count lives in the running station's memory: doctor reads it from the station's
telemetry, which the station's own account may read (config/mosquitto.acl.example), waiting for one
sample (said before the wait; `--no-wait` skips it); where it cannot, it says where to look (smearscope.cli.doctor runs it after the broker's)."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from typing import Any

#: smearscope.cli.doctor's (status, what, detail).
Check = tuple[str, str, str]
#: The longest doctor waits for the station's next telemetry sample (s).
WAIT_CAP_S = 65.0


def parked_checks(config: Any, announce: Callable[[str], None] | None, *, station_runs: bool) -> list[Check]:
    """The running station's parked messages, from its next telemetry sample, said with `announce`
    before waiting for it; with `announce` None (doctor --no-wait) not waited for: where to see them
    instead. [] when the station does not run (`station_runs`: a station holds the outbox file, as
    doctor's one open of it found: smearscope.cli.doctor_outbox)."""
    from smearscope.service.mqtt.credentials import CredentialError, read_password

    mqtt = config.mqtt
    if not station_runs:
        return []  # parked messages are counted by a running station (each is tried again at its start)
    topic = f"{mqtt.topic_prefix}/{config.station_id}/telemetry"
    wait = min(mqtt.telemetry_interval_s + 5.0, WAIT_CAP_S)
    elsewhere = (f"see it in `systemctl status smearscope` (its Status line: 'N messages parked'), the dashboard's "
                 f"card, or one telemetry sample's `parked`: mosquitto_sub -C 1 -t {topic}")
    if announce is None:
        return [("INFO", "parked", f"not waited for (--no-wait): the messages the running station holds back; {elsewhere}")]
    try:
        password = read_password(mqtt)
    except CredentialError:
        return [("WARN", "parked", f"not read: the broker password cannot be read here; {elsewhere}")]
    announce(f"waiting up to {wait:.0f} s for station {config.station_id}'s next telemetry sample (its parked "
             f"reports) on {topic}; smearscope doctor --no-wait skips it")
    try:
        sample = _next_sample(mqtt, password, topic, wait)
    except (OSError, ValueError) as exc:
        return [("WARN", "parked", f"not read ({type(exc).__name__}: {exc}); {elsewhere}")]
    if sample is None:
        acl = f"its account may not read it: the ACL's 'topic read {topic}'"
        why = (f"the station sends one every {mqtt.telemetry_interval_s:g} s (mqtt.telemetry_interval_s), longer "
               f"than doctor waits; or {acl}" if mqtt.telemetry_interval_s + 5.0 > wait else acl)
        return [("WARN", "parked", (f"not read: no telemetry from the running station on {topic} within {wait:.0f} s "
                 f"({why}); {elsewhere}"))]
    from smearscope.service.station.calibration_watch import telemetry_checks

    held = [*held_runs_line(sample, f"{mqtt.topic_prefix}/{config.station_id}/run"), *telemetry_checks(sample)]
    parked = sample.get("parked")
    if not isinstance(parked, dict) or not isinstance(parked.get("messages"), int):
        return [("OK", "parked", "not said: the running station's telemetry has no `parked` (an older version)"), *held]
    return [parked_line(parked, str(sample.get("host", "?"))), *held]


#: Held runs the running station's sample names in doctor's line; any more are counted.
HELD_NAMED = 5


def held_runs_line(sample: dict[str, Any], run_topic: str) -> list[Check]:
    """The runs a running station holds (its sample's `held_runs`: service.mqtt.run_watch), one INFO
    line naming them and what releases them; none where it holds none or has not decided yet. Since
    when is in the outbox file, which the running station holds: its journal said it at its start."""
    runs = sample.get("held_runs")
    if not isinstance(runs, list) or not runs:
        return []
    named = ", ".join(str(r) for r in runs[:HELD_NAMED]) + (f" and {len(runs) - HELD_NAMED} more"
                                                          if len(runs) > HELD_NAMED else "")
    return [("INFO", "held run", (
        f"the running station (host {sample.get('host', '?')}) holds run{'' if len(runs) == 1 else 's'} {named}: "
        "their run states, specimen reports and FHIR Bundles stay in the outbox, the broker showed them further "
        "along (since when: its journal's WARNING at its start, '... are held in the outbox since ...'). They are "
        f"sent once a start finds no retained run state on the broker (mosquitto_pub -r -n -t {run_topic}, then "
        "start the station again; docs/STATION.md)"))]


def parked_line(parked: dict[str, Any], host: str) -> Check:
    """One doctor line for a telemetry sample's `parked` object."""
    n, large = parked["messages"], parked.get("too_large") or 0
    if n == 0:
        return ("OK", "parked", f"none: the running station (host {host}) holds no message back from the broker")
    oldest = parked.get("oldest") or {}
    age = oldest.get("age_s")
    since = f", waiting {age / 60:.0f} min" if isinstance(age, (int, float)) else ""
    named = f" (oldest: {oldest.get('kind')} {oldest.get('report_id')}{since})" if oldest else ""
    what = ("report" if parked.get("reports") == n else "message") + ("" if n == 1 else "s")
    why = []
    size = (f" above {oldest['bytes']} bytes" if oldest.get("reason") not in (None, "held")
            and isinstance(oldest.get("bytes"), int) else "")
    if large and oldest.get("reason") == "over_packet_limit":
        limit = f" of {oldest['limit']} bytes" if isinstance(oldest.get("limit"), int) else ""
        why.append(f"{large} over the packet limit{limit} (the broker's max_packet_size, or mqtt.max_packet_size "
                   f"if lower): raise it{size}; the station tries them again once it reconnects")
    elif large:
        why.append(f"{large} refused by the broker as too large: raise message_size_limit (or max_packet_size) "
                   f"in the broker's configuration{size} and restart it; the station sends them once it reconnects")
    if n - large:
        why.append(f"{n - large} held back (the station's journal says why)")
    return ("WARN", "parked", f"{n} {what} held at the station (host {host}), not delivered{named}: {'; '.join(why)}")


def _next_sample(mqtt: Any, password: str | None, topic: str, wait: float) -> dict[str, Any] | None:
    """The next telemetry sample on `topic` (a JSON object), or None within `wait` seconds. Logs in
    as the station does (its protocol; no Last Will: the station's status is not touched)."""
    from paho.mqtt.enums import MQTTProtocolVersion

    from smearscope.service.mqtt.paho_client import configured_client

    v5 = mqtt.protocol != "3.1.1"
    protocol = MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311
    client = configured_client(mqtt, f"smearscope-doctor-parked-{os.getpid()}", protocol, password, None)
    got: list[dict[str, Any]] = []
    heard = threading.Event()

    def on_message(c: Any, userdata: Any, message: Any) -> None:
        try:
            body = json.loads(message.payload)
        except ValueError:
            return
        if isinstance(body, dict) and not heard.is_set():
            got.append(body)
            heard.set()

    client.on_connect = lambda c, userdata, flags, code, props: (
        None if code.is_failure else c.subscribe(topic, qos=0))
    client.on_message = on_message
    try:
        client.connect(mqtt.host, mqtt.port, keepalive=max(10, int(wait)))
        client.loop_start()
        heard.wait(wait)
    finally:
        client.disconnect()
        client.loop_stop()
    return got[0] if got else None
