"""Free text a command takes reaches a printed report as it is read: a signer's name
(`verify_run`'s `verified_by`) and a specimen's identifier (`start_run`'s `specimen_id`) holding a
bidi control or another invisible character are refused over a real broker, the character named."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest
from broker import Subscriber, wait_until
from test_daemon import BASE, observed, pool_factory, write_station  # noqa: F401 (a fixture)

from smearscope.service.config import load_config
from smearscope.service.station.daemon import StationDaemon

#: Characters that show nothing, or not what they are, with where the test puts them.
UNSEEN = ["\u202a", "\u202b", "\u202c", "\u202d", "\u202e", "\u2066", "\u2067", "\u2068", "\u2069",
          "\u200e", "\u200f", "\u061c", "\u200b", "\ufeff", "\u00ad", "\u0085", "\u2028", "\ue000"]
#: The zero-width non-joiner and joiner: in a name between letters (Persian and Indic spelling), else refused.
JOINERS = ["\u200c", "\u200d"]



@pytest.mark.broker
def test_a_signers_name_or_specimen_id_holding_a_bidi_or_invisible_character_is_refused_naming_it(
    tmp_path: Path, broker: Any, credentials_dir: Path, observer: Subscriber,
) -> None:
    """'Dr A<U+202E>BC' would print as 'Dr ACB' on the signed report: verify_run answers bad_arguments
    naming U+202E and its place (character 5) before any run is looked up, for every bidi embedding,
    override, isolate and mark, the zero-width and other format characters, C1 controls, the line
    separator and private use; names in any script, spaces inside (an ideographic space too) go on
    to the run (unknown_run here). start_run's specimen_id names what it refuses the same way."""
    config = write_station(tmp_path, broker.port)
    daemon = StationDaemon(load_config(config), analyzer_factory=pool_factory(), config_path=config)
    runner = threading.Thread(target=daemon.run, daemon=True)
    runner.start()
    try:
        assert wait_until(lambda: any(m.payload == b"online" for m in observer.on_topic(f"{BASE}/status")), 15)

        def command(name: str, body: dict[str, Any]) -> dict[str, Any]:
            before = len(observer.on_topic(f"{BASE}/cmd_response/{name}"))
            observer.client.publish(f"{BASE}/cmd/{name}", json.dumps(body), qos=1)
            assert observer.wait_for(
                lambda ms: sum(m.topic == f"{BASE}/cmd_response/{name}" for m in ms) > before, 15)
            return json.loads(observer.on_topic(f"{BASE}/cmd_response/{name}")[-1].payload)

        for by in ("AB", "Dr. Ana María O'Neil-Lund", "Ђорђе Петровић", "מרים כהן", "山田\u3000太郎", "عائشة",
                   "زین\u200cالعابدین", "क्\u200dष गुप्ता"):
            assert command("verify_run", {"run_id": "nope", "verified_by": by})["error"] == "unknown_run", by
        for by in ("\u200cAB", "AB\u200d", "A \u200dB", "A\u200c\u200dB"):  # a joiner not between two letters
            refused = command("verify_run", {"run_id": "nope", "verified_by": by})
            assert refused["error"] == "bad_arguments" and "U+200" in refused["message"], (by, refused)
        for ch in UNSEEN:
            refused = command("verify_run", {"run_id": "nope", "verified_by": f"Dr A{ch}BC"})
            assert refused["error"] == "bad_arguments", (f"U+{ord(ch):04X}", refused)
            assert f"U+{ord(ch):04X}" in refused["message"] and "at character 5" in refused["message"], refused
        refused = command("verify_run", {"run_id": "nope", "verified_by": "Dr A\u202eBC"})
        assert refused["message"].startswith("verified_by holds U+202E (RIGHT-TO-LEFT OVERRIDE) at character 5"), refused

        for ch in UNSEEN + JOINERS:  # an identifier takes no joiner
            refused = command("start_run", {"specimen_id": f"H-1{ch}2"})
            assert refused["error"] == "bad_arguments", (f"U+{ord(ch):04X}", refused)
            assert f"U+{ord(ch):04X}" in refused["message"] and "at character 4" in refused["message"], refused
        run = command("status", {})["run"]  # the simulated source's own run, none for any of them
        assert run is None or run.get("specimen_id") is None, run
    finally:
        daemon.request_stop("test over")
        runner.join(30)
    assert not runner.is_alive()
