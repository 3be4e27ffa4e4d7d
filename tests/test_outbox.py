"""The durable outbox: order, acknowledgement, bound policy, thread safety, crash survival."""

from __future__ import annotations

import linecache
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from broker import wait_until

from smearscope.service.config import MqttConfig
from smearscope.service.mqtt.outbox import MessageKind, NewMessage, Outbox, OutboxLockedError
from smearscope.service.mqtt.publisher import MqttPublisher
from smearscope.service.mqtt.wall_clock import RELEASED, WallSteps


def put(outbox: Outbox, kind: MessageKind, n: int, size: int = 10) -> int:
    return outbox.put(
        kind, f"t/{kind}", bytes([n % 256]) * size, report_id=f"r{n}", schema_version="1"
    )


def test_messages_come_back_in_insertion_order_until_acked(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db") as outbox:
        seqs = [put(outbox, "field" if i % 2 else "report", i) for i in range(6)]
        assert seqs == sorted(seqs)
        pending = outbox.pending(limit=100)
        assert [m.seq for m in pending] == seqs
        assert pending[0].kind == "report" and pending[0].report_id == "r0"
        assert pending[1].payload == b"\x01" * 10 and pending[1].qos == 1 and not pending[1].retain
        assert pending[0].content_type == "application/json" and pending[0].attempts == 0

        assert [m.seq for m in outbox.pending(limit=2, after_seq=seqs[1])] == seqs[2:4]
        assert outbox.ack(seqs[2]) is True
        assert outbox.ack(seqs[2]) is False
        assert outbox.ack_many([seqs[0], seqs[5], 999]) == 2
        assert [m.seq for m in outbox.pending()] == [seqs[1], seqs[3], seqs[4]]
        counts = outbox.counts()
        assert (counts.messages, counts.reports, counts.fields, counts.bytes) == (3, 1, 2, 30)

        outbox.mark_attempted([seqs[1], seqs[1], seqs[3]])
        assert [m.attempts for m in outbox.pending()] == [2, 1, 0]


def test_sequence_numbers_are_never_reused(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db") as outbox:
        last = put(outbox, "report", 1)
        outbox.ack(last)
        assert put(outbox, "report", 2) > last


def test_file_is_wal_with_full_sync_and_owned_by_one_process(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    with Outbox(path) as outbox:
        assert outbox._conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert outbox._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        with pytest.raises(OutboxLockedError):
            Outbox(path, lock_timeout_s=0.1)
    check = sqlite3.connect(path)
    assert check.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    check.close()


def test_over_message_bound_evicts_oldest_fields_and_never_reports(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with Outbox(tmp_path / "o.db", max_messages=4) as outbox:
        kinds: list[MessageKind] = ["field", "report", "field", "field", "report", "field"]
        seqs = [put(outbox, k, i) for i, k in enumerate(kinds)]
        remaining = [(m.seq, m.kind) for m in outbox.pending()]
        # The two oldest fields made room; both reports stay.
        assert remaining == [
            (seqs[1], "report"),
            (seqs[3], "field"),
            (seqs[4], "report"),
            (seqs[5], "field"),
        ]
        assert outbox.counts().evicted_fields == 2

        with caplog.at_level(logging.ERROR, logger="smearscope.service.mqtt.outbox"):
            extra = [put(outbox, "report", 10 + i) for i in range(4)]
        kept = outbox.pending()
        assert [m.kind for m in kept] == ["report"] * 6, "fields go first, reports never"
        assert [m.seq for m in kept][-4:] == extra
        counts = outbox.counts()
        assert counts.over_bound and counts.messages == 6 and counts.evicted_fields == 4
        assert any("reports are never evicted" in r.getMessage() for r in caplog.records)


def test_the_evicted_sequence_numbers_remembered_are_the_newest_and_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Weeks offline evict millions of field messages: the outbox remembers only the newest (those
    the end-of-run ledger can name), not every one since it opened."""
    from smearscope.service.mqtt import outbox as outbox_module

    monkeypatch.setattr(outbox_module, "EVICTED_KEPT", 40)
    with Outbox(tmp_path / "o.db", max_messages=1) as outbox:
        seqs = [put(outbox, "field", i) for i in range(100)]
        assert outbox.counts().evicted_fields == 99
        assert len(outbox.evicted_seqs) <= 40
        assert seqs[-2] in outbox.evicted_seqs and seqs[-1] not in outbox.evicted_seqs


def test_the_wal_is_cut_back_after_a_large_delete(tmp_path: Path) -> None:
    """Deleting many messages at once (the broker's acknowledgements after an outage, expired
    fields, an old run's cells) writes every freed page to the WAL where SQLite deletes securely, as
    Debian's and Ubuntu's do; the WAL file is then cut back at the next write, not kept at that size
    for as long as the station runs."""
    from smearscope.service.mqtt.outbox import WAL_LIMIT_BYTES

    path = tmp_path / "o.db"
    with Outbox(path) as outbox:
        seqs = [outbox.put("field", "t", bytes([i]) * 100_000, report_id=str(i), schema_version="1")
                for i in range(100)]
        assert outbox.ack_many(seqs) == 100
        outbox.put("field", "t", b"{}", report_id="next", schema_version="1")
        assert Path(f"{path}-wal").stat().st_size <= WAL_LIMIT_BYTES + 64 * 1024


def test_a_report_and_its_bundle_over_the_bound_say_so_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A specimen report and its FHIR Bundle, stored in one transaction over the bound: one error
    line for the report (both are kept), not one per message."""
    with Outbox(tmp_path / "o.db", max_messages=1) as outbox:
        put(outbox, "report", 0)
        with caplog.at_level(logging.ERROR, logger="smearscope.service.mqtt.outbox"):
            outbox.put_many([NewMessage("report", "s/report", b"{}", "rep-1", "1"),
                             NewMessage("report", "s/fhir", b"{}", "rep-1", "1")])
        lines = [r.getMessage() for r in caplog.records if "reports are never evicted" in r.getMessage()]
        assert len(lines) == 1 and "report rep-1 kept" in lines[0], lines
        assert outbox.counts().messages == 3


def test_over_byte_bound_evicts_fields_by_size(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db", max_bytes=1000) as outbox:
        put(outbox, "field", 0, size=400)
        put(outbox, "field", 1, size=400)
        report = put(outbox, "report", 2, size=300)
        assert [m.seq for m in outbox.pending()] == [2, report]
        assert outbox.counts().bytes == 700


def test_expire_fields_keeps_reports(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db") as outbox:
        old_field = outbox.put(
            "field", "t", b"{}", report_id="a", schema_version="1", created_at=time.time() - 3600
        )
        old_report = outbox.put(
            "report", "t", b"{}", report_id="a", schema_version="1", created_at=time.time() - 3600
        )
        new_field = put(outbox, "field", 1)
        assert outbox.expire_fields(time.time() - 60) == 1
        assert [m.seq for m in outbox.pending()] == [old_report, new_field]
        assert old_field not in [m.seq for m in outbox.pending()]


def test_concurrent_puts_and_acks_from_threads(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db") as outbox:
        produced: list[int] = []
        lock = threading.Lock()

        def producer(worker: int) -> None:
            for i in range(40):
                seq = put(outbox, "report", worker * 100 + i)
                with lock:
                    produced.append(seq)

        def acker() -> None:
            acked = 0
            while acked < 60:
                batch = outbox.pending(limit=min(5, 60 - acked))
                acked += outbox.ack_many(m.seq for m in batch)

        threads = [threading.Thread(target=producer, args=(w,)) for w in range(4)]
        threads.append(threading.Thread(target=acker))
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert len(set(produced)) == 160
        assert outbox.counts().messages == 100
        assert len(outbox.pending(limit=1000)) == 100


_CHILD = textwrap.dedent(
    """
    import sys
    from smearscope.service.mqtt.outbox import Outbox
    outbox = Outbox(sys.argv[1])
    i = 0
    while True:  # until SIGKILLed
        seq = outbox.put("report", "t/report", b'{"n": %d}' % i, report_id=f"r{i}",
                         schema_version="1")
        if i % 3 == 0:
            outbox.ack(seq)  # acked messages must stay gone
        print(seq, i, flush=True)
        i += 1
    """
)


def test_reopen_after_sigkill_returns_every_unacked_message_in_order(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(path)], stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None
    confirmed: list[tuple[int, int]] = []
    try:
        while len(confirmed) < 60:
            line = child.stdout.readline()
            assert line, "child died before it was killed"
            seq, i = map(int, line.split())
            confirmed.append((seq, i))
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
    assert child.returncode == -signal.SIGKILL
    # what it printed before the kill and was not read yet (a loaded machine lets it run ahead)
    confirmed += [tuple(map(int, line.split())) for line in child.stdout.read().splitlines() if len(line.split()) == 2]

    with Outbox(path) as outbox:
        pending = outbox.pending(limit=10_000)
        seqs = [m.seq for m in pending]
        assert seqs == sorted(seqs)
        by_seq = {m.seq: m for m in pending}
        for seq, i in confirmed:  # every put() that returned survived, acks too
            if i % 3 == 0:
                assert seq not in by_seq
            else:
                assert by_seq[seq].payload == b'{"n": %d}' % i
        # Anything beyond the confirmed ones was committed but not yet printed when killed.
        assert len(pending) - sum(1 for _, i in confirmed if i % 3) <= 2
        assert put(outbox, "report", 0) > max(s for s, _ in confirmed)


def test_a_full_disk_raises_sqlite_full_and_clears_when_space_returns(tmp_path: Path) -> None:
    """Issue 18, item 1: on a real full file system the caller sees SQLite's own SQLITE_FULL
    (no "cannot rollback - no transaction is active" in its place) and the outbox says so."""
    from smallfs import fill, small_tmpfs

    with small_tmpfs(tmp_path / "small", 256) as small, Outbox(small / "o.db") as outbox:
        put(outbox, "report", 0)
        filler = fill(small)
        with pytest.raises(sqlite3.OperationalError) as exc:
            for i in range(1, 200):
                put(outbox, "report", i, size=4000)
        assert "database or disk is full" in str(exc.value), exc.value
        assert outbox.disk_full and outbox.counts().disk_full
        stored = outbox.counts().messages
        assert [m.seq for m in outbox.pending(limit=1000)][-1] > 0  # still readable
        filler.unlink()
        put(outbox, "report", 999, size=4000)
        assert not outbox.disk_full and outbox.counts().messages == stored + 1


def test_a_quota_reached_is_a_full_disk_too(tmp_path: Path) -> None:
    """A user or project quota refuses writes with EDQUOT where a full file system says ENOSPC: the
    station must pause as for a full disk (and say so), not retry it as some other error."""
    import errno

    from smearscope.service.mqtt.outbox import is_disk_full

    quota = OSError(errno.EDQUOT, os.strerror(errno.EDQUOT), str(tmp_path / "o.db-wal"))
    assert is_disk_full(quota) and is_disk_full(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    assert not is_disk_full(OSError(errno.EACCES, os.strerror(errno.EACCES)))
    with Outbox(tmp_path / "o.db") as outbox:
        with pytest.raises(sqlite3.OperationalError) as other:
            outbox.write(lambda conn: conn.execute("INSERT INTO no_such_table VALUES (1)"))
        assert not is_disk_full(other.value) and not outbox.disk_full

        def over_quota(conn: sqlite3.Connection) -> None:
            raise quota

        with pytest.raises(OSError):
            outbox.write(over_quota)
        assert outbox.disk_full and outbox.counts().disk_full
        put(outbox, "report", 1)  # room again: no longer full
        assert not outbox.disk_full


def test_on_a_full_disk_acknowledged_messages_are_still_deleted_and_the_wal_gives_its_room_back(
    tmp_path: Path,
) -> None:
    """A disk that filled while the broker was away: the acknowledgements that arrive when it is
    back must leave the outbox, or every reconnect sends them again. The reserve beside the outbox
    is given up for those deletes, the WAL is emptied after them, and here (a WAL that held the
    sixty messages' frames) a few new messages fit on the disk still full."""
    from smallfs import fill, small_tmpfs

    from smearscope.service.mqtt.reserve import RESERVE_BYTES

    with small_tmpfs(tmp_path / "small", 8192) as small, Outbox(small / "o.db") as outbox:
        reserve = small / "o.db.reserve"
        assert reserve.stat().st_size == RESERVE_BYTES and reserve.stat().st_blocks * 512 >= RESERVE_BYTES
        for i in range(60):
            put(outbox, "field", i, size=4000)
        fill(small)
        with pytest.raises(sqlite3.OperationalError, match="database or disk is full"):
            for i in range(60, 400):
                put(outbox, "field", i, size=4000)
        assert outbox.disk_full
        seqs = [m.seq for m in outbox.pending(limit=1000)]
        assert outbox.ack_many(seqs) == len(seqs) and not reserve.exists()  # the disk is still full
        assert (small / "o.db-wal").stat().st_size == 0  # the WAL's room given back to the disk
        for i in range(400, 420):
            put(outbox, "field", i, size=4000)
        assert not outbox.disk_full and outbox.counts().messages == 20


def test_an_outbox_reopens_on_a_full_disk_and_its_expired_fields_wait_for_room(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """A station restarted on the disk its outage filled must open its outbox, or the reports in it
    (whose delivery would free the disk) never leave: opening writes nothing (it did: the
    incremental vacuum pragma rewrote the header of a file that already had it, SQLITE_FULL).
    Expired fields that cannot be deleted there stay (said once) until there is room."""
    from smallfs import fill, small_tmpfs

    with small_tmpfs(tmp_path / "small", 16384) as small:
        with Outbox(small / "o.db") as outbox:  # 3 MB of fields: their delete needs more than the reserve
            report = put(outbox, "report", 0)
            for i in range(1, 200):
                outbox.put("field", "t/field", os.urandom(16_000), report_id=f"f{i}", schema_version="1",
                           created_at=time.time() - 3600)
        filler = fill(small)
        with Outbox(small / "o.db") as outbox:
            assert outbox.read(lambda conn: conn.execute("PRAGMA auto_vacuum").fetchone()[0]) == 2
            assert [m.seq for m in outbox.pending(1)] == [report]
            with caplog.at_level(logging.WARNING, logger="smearscope.service.mqtt.outbox"):
                assert outbox.expire_fields(time.time() - 60) == 0  # the reserve is spent on the first try
                assert outbox.expire_fields(time.time() - 60) == 0
            assert sum("expired field messages kept" in r.getMessage() for r in caplog.records) == 1
            assert outbox.counts().messages == 200
            filler.unlink()
            assert outbox.expire_fields(time.time() - 60) == 199
            assert [m.seq for m in outbox.pending(10)] == [report]


def test_a_reserve_a_crash_cut_short_is_made_whole_again(tmp_path: Path) -> None:
    from smearscope.service.mqtt.reserve import RESERVE_BYTES

    with Outbox(tmp_path / "o.db"):
        pass
    reserve = tmp_path / "o.db.reserve"
    assert reserve.stat().st_size == RESERVE_BYTES
    reserve.write_bytes(b"")  # a crash between its creation and its allocation
    with Outbox(tmp_path / "o.db"):
        assert reserve.stat().st_size == RESERVE_BYTES and reserve.stat().st_blocks * 512 >= RESERVE_BYTES


def _old_format_outbox(path: Path) -> Path:
    """An empty outbox file as the version before incremental vacuum left it (schema 2)."""
    from smearscope.service.mqtt import outbox as outbox_module

    with sqlite3.connect(path) as conn:
        conn.executescript(outbox_module._SCHEMA + "PRAGMA user_version=2;")
    return path


def _fill_drain_and_keep_five_reports(outbox: Outbox, path: Path) -> tuple[int, dict[int, bytes]]:
    """An outage's backlog (1 200 reports of 16 KB, 19 MB), delivered in batches of 40 but for
    five reports, with new field messages stored while it drains and space given back meanwhile;
    returns the file's peak size and the reports kept."""
    seqs = [outbox.put("report", "t/report", os.urandom(16_000), report_id=f"r{i}", schema_version="1")
            for i in range(1200)]
    peak = path.stat().st_size + Path(f"{path}-wal").stat().st_size
    kept = {s: m.payload for s in seqs[::240] for m in outbox.pending(1, after_seq=s - 1)}
    delivered = [s for s in seqs if s not in kept]
    for i in range(0, len(delivered), 40):
        assert outbox.ack_many(delivered[i:i + 40]) == len(delivered[i:i + 40])
        field = put(outbox, "field", i, size=2000)
        assert outbox.ack(field)
        if i % 200 == 0:  # the publisher's 10 s tick, while the backlog drains
            outbox.give_back_space()
    for _ in range(10):  # and after
        outbox.give_back_space()
    return peak, kept


def test_a_drained_outbox_gives_its_pages_back_to_the_disk_and_keeps_what_waits(tmp_path: Path) -> None:
    """After an outage's backlog is delivered, the file shrinks to what it still holds (it kept
    its peak size before, up to max_bytes); the reports still waiting are all there, byte for
    byte, also after a reopen."""
    path = tmp_path / "o.db"
    with Outbox(path) as outbox:  # a new file vacuums incrementally: no VACUUM holding the lock
        assert outbox.read(lambda conn: conn.execute("PRAGMA auto_vacuum").fetchone()[0]) == 2
        peak, kept = _fill_drain_and_keep_five_reports(outbox, path)
        assert peak > 19_000_000
        assert path.stat().st_size < 1_000_000, path.stat().st_size
    with Outbox(path) as outbox:
        assert {m.seq: m.payload for m in outbox.pending(100)} == kept


def test_an_outbox_file_made_without_incremental_vacuum_is_compacted_once_drained(tmp_path: Path) -> None:
    """A file made by a version without incremental vacuum: one VACUUM once it has drained, which
    switches incremental vacuum on; nothing waiting is lost."""
    path = _old_format_outbox(tmp_path / "o.db")
    with Outbox(path) as outbox:
        assert outbox.read(lambda conn: conn.execute("PRAGMA auto_vacuum").fetchone()[0]) == 0
        peak, kept = _fill_drain_and_keep_five_reports(outbox, path)
        assert peak > 19_000_000
        assert path.stat().st_size < 1_000_000, path.stat().st_size
        assert outbox.read(lambda conn: conn.execute("PRAGMA auto_vacuum").fetchone()[0]) == 2
    with Outbox(path) as outbox:
        assert {m.seq: m.payload for m in outbox.pending(100)} == kept


def test_an_old_outbox_file_is_compacted_only_when_the_disk_has_room_for_the_copy(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """The VACUUM that compacts a file made without incremental vacuum writes the file's content
    again (its WAL): on a disk without that room it waits (said once), and runs once there is."""
    from smallfs import fill, small_tmpfs

    with small_tmpfs(tmp_path / "small", 40 * 1024) as small:
        path = _old_format_outbox(small / "o.db")
        with Outbox(path) as outbox:
            seqs = [outbox.put("report", "t/report", os.urandom(16_000), report_id=f"r{i}", schema_version="1")
                    for i in range(1000)]
            kept = {m.seq: m.payload for m in outbox.pending(1000) if m.seq in seqs[::200]}
            delivered = [s for s in seqs if s not in kept]
            for i in range(0, len(delivered), 50):
                outbox.ack_many(delivered[i:i + 50])
            assert outbox.counts().messages == 5
            size = path.stat().st_size
            filler = fill(small, leave_bytes=1_000_000)
            with caplog.at_level(logging.INFO, logger="smearscope.service.mqtt.vacuum"):
                outbox.give_back_space()
                outbox.give_back_space()
            assert path.stat().st_size == size > 15_000_000
            assert sum("kept until" in r.getMessage() for r in caplog.records) == 1
            filler.unlink()
            outbox.give_back_space()
            assert path.stat().st_size < 1_000_000
            assert {m.seq: m.payload for m in outbox.pending(100)} == kept


_SHORT_MEMORY_CHILD = """
import logging, sys
from smearscope.service.mqtt import vacuum
from smearscope.service.mqtt.outbox import Outbox
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stdout)
vacuum.RETRY_S = 0.0  # tried again at once: what the second try says is looked at
with Outbox(sys.argv[1]) as outbox:
    outbox.read(lambda conn: conn.execute("PRAGMA hard_heap_limit=4000000"))  # SQLite's heap: 4 MB
    for _ in range(2):
        outbox.give_back_space()
        print("returned", flush=True)
"""


def test_a_compaction_that_fails_for_memory_neither_raises_nor_loses_a_message(tmp_path: Path) -> None:
    """The VACUUM that compacts an old-format file copies it in memory; on a short memory SQLite
    fails (SQLITE_NOMEM), which Python raises as MemoryError, not sqlite3.Error: it escaped
    give_back_space into the publisher's loop, and the VACUUM was tried again at every call. Now
    the try is given up (said once while it fails so) and every message is there; with memory the
    file is compacted. In a child: SQLite's heap limit can only be lowered."""
    path = _old_format_outbox(tmp_path / "o.db")
    with Outbox(path) as outbox:
        seqs = [outbox.put("report", "t/report", os.urandom(16_000), report_id=f"r{i}", schema_version="1")
                for i in range(1200)]
        delivered = [s for s in seqs if s % 3]
        assert outbox.ack_many(delivered) == 800  # 6 MB waiting, 13 MB free in the file
        kept = {m.seq: m.payload for m in outbox.pending(1000)}
    size = path.stat().st_size
    child = subprocess.run([sys.executable, "-c", _SHORT_MEMORY_CHILD, str(path)], capture_output=True, text=True,
                           timeout=120, check=False)
    assert child.returncode == 0 and child.stdout.count("returned") == 2, child.stdout + child.stderr
    assert child.stdout.count("WARNING") == 1 and "MemoryError" in child.stdout, child.stdout
    assert "given back" not in child.stdout, child.stdout
    with Outbox(path) as outbox:
        assert path.stat().st_size == size
        assert {m.seq: m.payload for m in outbox.pending(1000)} == kept
        assert outbox.read(lambda conn: conn.execute("PRAGMA integrity_check").fetchone()[0]) == "ok"
        outbox.give_back_space()
        assert path.stat().st_size < size * 0.6
        assert {m.seq: m.payload for m in outbox.pending(1000)} == kept


def test_a_wal_that_cannot_be_emptied_is_said_with_its_real_cause(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The checkpoint after a delete on a full disk, or after a vacuum step that failed (for memory,
    say), may itself fail for another cause: the warning names SQLite's. It said "on a full disk"
    whatever the cause. Here a read still open on the outbox's connection (SQLITE_LOCKED)."""
    from smearscope.service.mqtt.reserve import shrink_wal

    def open_read_then_shrink(conn: sqlite3.Connection) -> None:
        reading = conn.execute("SELECT seq FROM outbox")
        reading.fetchone()  # the statement not yet finished
        shrink_wal(conn, tmp_path / "o.db")
        reading.close()

    with Outbox(tmp_path / "o.db") as outbox:
        for i in range(3):
            put(outbox, "report", i)
        with caplog.at_level(logging.WARNING, logger="smearscope.service.mqtt.reserve"):
            outbox.read(open_read_then_shrink)
    [warning] = [r.getMessage() for r in caplog.records]
    assert "SQLITE_LOCKED" in warning and "full" not in warning, warning


class _Clocks:
    """A station's wall and monotonic clocks, moved by hand (the wall one may step)."""

    def __init__(self, wall: float) -> None:
        self.wall, self.mono = wall, 1000.0

    def run(self, seconds: float) -> None:
        self.wall += seconds
        self.mono += seconds

    def steps(self) -> WallSteps:
        return WallSteps(lambda: self.wall, lambda: self.mono)


def _fields(outbox: Outbox, n: int, tag: str) -> list[int]:
    return [outbox.put("field", "t", b"{}", report_id=f"{tag}{k}", schema_version="1") for k in range(n)]


def test_field_messages_keep_their_true_age_when_the_wall_clock_steps(tmp_path: Path) -> None:
    """A Jetson without a clock battery boots in 1970 and stores its fields offline; network time
    then steps the clock forward 56 years. With field_message_expiry_s (an hour here) the fields,
    a minute old, were all dropped at once, as 56 years old, before the broker got them; set back
    by a year by hand, fields stored before were kept for a year. Their ages now follow the step
    (real SQLite file, the outbox's clocks moved by hand); reports never expire."""
    hour = 3600
    clocks = _Clocks(wall=86_400.0)  # 1970-01-02
    with Outbox(tmp_path / "o.db", clock=clocks.steps()) as outbox:
        booted = _fields(outbox, 3, "boot")
        report = outbox.put("report", "t", b"{}", report_id="r", schema_version="1")
        clocks.run(60)
        clocks.wall = RELEASED + 30 * 86_400  # network time arrives
        clocks.run(1)
        assert outbox.expire_fields(clocks.wall - hour) == 0
        later = _fields(outbox, 2, "later")
        clocks.run(hour - 120)
        assert outbox.expire_fields(clocks.wall - hour) == 0
        clocks.run(120)
        assert outbox.expire_fields(clocks.wall - hour) == 3  # the booted ones, an hour old
        assert [m.seq for m in outbox.pending()] == [report, *later]
        clocks.wall -= 365 * 86_400  # set back by hand
        clocks.run(hour)
        assert outbox.expire_fields(clocks.wall - hour) == 2
        assert [m.seq for m in outbox.pending()] == [report]
        assert not set(booted) & {m.seq for m in outbox.pending()}


def _waiting_for_the_outbox(thread: threading.Thread) -> bool:
    """Whether `thread` waits for the outbox's lock in `put_many` (what it stamped outside is stamped)."""
    frame = sys._current_frames().get(thread.ident or -1)
    return (frame is not None and frame.f_code.co_name == "put_many"
            and "with self._lock" in linecache.getline(frame.f_code.co_filename, frame.f_lineno))


@pytest.mark.parametrize("stored_by", ["outbox", "publisher"])
def test_a_field_message_stored_as_the_wall_clock_steps_forward_keeps_its_true_age(
    tmp_path: Path, stored_by: str,
) -> None:
    """Network time steps the clock forward 56 years while a field message waits for the outbox (a
    delete, a space give-back or another put holds it): the message was stamped on the clock before
    the step and stored after the step was followed, so it kept 1970's stamp and the next expiry
    dropped it as 56 years old, unsent (seen once in a station under faketime stepped +10 years).
    Stamped under the outbox's lock, it is a minute old (a real SQLite file; the outbox's clocks
    moved by hand; the publisher's message as the station stores it, through `publish_many`)."""
    hour = 3600
    clocks = _Clocks(wall=86_400.0 if stored_by == "outbox" else time.time())
    gate, holding = threading.Event(), threading.Event()

    def hold(conn: sqlite3.Connection) -> None:
        holding.set()
        gate.wait(30)

    with Outbox(tmp_path / "o.db", clock=clocks.steps()) as outbox:
        publisher = MqttPublisher(MqttConfig(), "bench-1", outbox)
        store = (lambda: outbox.put("field", "t", b"{}", report_id="f", schema_version="1")) if stored_by == "outbox" \
            else (lambda: publisher.publish_many([("field", "f", b"{}", "1")]))
        holder = threading.Thread(target=outbox.read, args=(hold,))
        holder.start()
        assert holding.wait(10)
        storer = threading.Thread(target=store)
        storer.start()
        try:
            assert wait_until(lambda: _waiting_for_the_outbox(storer), 10)
            clocks.wall += 56 * 365 * 86_400  # network time arrives
        finally:
            gate.set()
            holder.join(10)
            storer.join(10)
        clocks.run(60)
        assert outbox.expire_fields(clocks.wall - hour) == 0
        assert [m.report_id for m in outbox.pending()] == ["f"]
        clocks.run(hour)
        assert outbox.expire_fields(clocks.wall - hour) == 1


def test_field_messages_stamped_on_a_wrong_clock_before_a_restart_are_not_expired_by_it(tmp_path: Path) -> None:
    """Stored in 1970 by a process that never saw network time (restarted since, the outbox file
    kept): their age cannot be known, so an expiry does not drop them as 56 years old; they wait to
    be sent like any message, within the outbox's bounds. Those stored on a right clock expire."""
    clocks = _Clocks(wall=86_400.0)
    with Outbox(tmp_path / "o.db", clock=clocks.steps()) as outbox:
        kept = _fields(outbox, 3, "1970-")
    now = RELEASED + 30 * 86_400
    clocks = _Clocks(wall=now)
    with Outbox(tmp_path / "o.db", clock=clocks.steps()) as outbox:
        old = outbox.put("field", "t", b"{}", report_id="old", schema_version="1", created_at=now - 7200)
        assert outbox.expire_fields(now - 3600) == 1
        assert [m.seq for m in outbox.pending()] == kept and old not in kept


#: The outbox table as the versions before `cells` messages created it (schema 1), verbatim.
_SCHEMA_1 = """
CREATE TABLE IF NOT EXISTS outbox (
    seq            INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused, so order is stable
    kind           TEXT    NOT NULL CHECK (kind IN ('field', 'report')),
    topic          TEXT    NOT NULL,
    payload        BLOB    NOT NULL,
    size           INTEGER NOT NULL,
    qos            INTEGER NOT NULL CHECK (qos IN (0, 1, 2)),
    retain         INTEGER NOT NULL,
    report_id      TEXT    NOT NULL,
    message_id     TEXT    NOT NULL UNIQUE,
    content_type   TEXT    NOT NULL,
    schema_version TEXT    NOT NULL,
    created_at     REAL    NOT NULL,
    attempts       INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS outbox_kind_seq ON outbox (kind, seq);
"""


def test_an_outbox_of_schema_1_keeps_its_backlog_and_sequence_and_takes_cells(tmp_path: Path) -> None:
    """Upgrade from a version before `cells` messages: its backlog is sent under the same
    sequence numbers and message ids, a new message's number follows the last one ever given (the
    two acknowledged ones are not reused), and cells messages can be stored."""
    path = tmp_path / "outbox.sqlite3"
    with sqlite3.connect(path) as conn:
        conn.executescript(_SCHEMA_1 + "PRAGMA user_version=1;")
        conn.executemany(
            "INSERT INTO outbox (kind, topic, payload, size, qos, retain, report_id, message_id, content_type, "
            "schema_version, created_at) VALUES (?, 't', ?, 3, 1, 0, ?, ?, 'application/json', '1.0', 1.0)",
            [("report" if i % 2 else "field", b"m%d" % i, f"r{i}", f"m{i}") for i in range(5)])
        conn.execute("DELETE FROM outbox WHERE seq IN (4, 5)")  # delivered before the upgrade
    conn.close()
    with Outbox(path) as outbox:
        assert [(m.seq, m.kind, m.message_id, m.payload) for m in outbox.pending(10)] == [
            (1, "field", "m0", b"m0"), (2, "report", "m1", b"m1"), (3, "field", "m2", b"m2")]
        assert outbox.put("cells", "t/cells", b"c", report_id="r1", schema_version="1.1") == 6
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 2
    conn.close()


def test_an_outbox_of_a_newer_schema_is_refused_as_a_newer_versions_and_left_as_it_is(tmp_path: Path) -> None:
    """Downgrade: a file a later version made (schema 3) is not opened; the refusal says a newer
    version wrote it and what to do, and its messages and schema are untouched."""
    from smearscope.service.mqtt.outbox_schema import SCHEMA

    path = tmp_path / "outbox.sqlite3"
    with sqlite3.connect(path) as conn:
        conn.executescript(SCHEMA + "PRAGMA user_version=3;")
        conn.execute("INSERT INTO outbox (kind, topic, payload, size, qos, retain, report_id, message_id, "
                     "content_type, schema_version, created_at) VALUES "
                     "('report', 't', x'00', 1, 1, 0, 'r', 'm', 'application/json', '1.1', 1.0)")
    conn.close()
    with pytest.raises(RuntimeError, match=r"has schema 3, written by a newer version of smearscope .*move the file "
                                           r"aside once its messages are sent"):
        Outbox(path)
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 3
        assert conn.execute("SELECT message_id FROM outbox").fetchall() == [("m",)]
    conn.close()


def test_fields_stored_on_a_1970_clock_are_not_expired_when_a_full_disk_keeps_their_ages_from_following_the_step(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """The station's usual state after a long outage: booted in 1970, offline, the disk filled with
    the fields it stored. Network time then steps the clock forward 56 years; moving the stored
    fields' stamps by the step is a write the full disk refuses, while the expiry's delete makes
    room for itself (the WAL's and the reserve's): it dropped every field of this start as 56 years
    old, minutes after they were analysed. Until their ages follow the step, they are not expired
    (said once, not at every check); once there is room, they follow it and expire by their age.
    A real tmpfs filled to the last block."""
    from smallfs import fill, small_tmpfs

    hour = 3600
    clocks = _Clocks(wall=86_400.0)  # 1970-01-02
    with small_tmpfs(tmp_path / "small", 8192) as small, Outbox(small / "o.db", clock=clocks.steps()) as outbox:
        stored = [put(outbox, "field", i, size=4000) for i in range(60)]
        filler = fill(small)
        with pytest.raises(sqlite3.OperationalError, match="database or disk is full"):
            for i in range(60, 400):
                stored.append(put(outbox, "field", i, size=4000))
        clocks.run(60)
        clocks.wall = RELEASED + 30 * 86_400  # network time arrives
        clocks.run(1)
        with caplog.at_level(logging.WARNING):
            assert outbox.expire_fields(clocks.wall - hour) == 0
            clocks.run(10)
            assert outbox.expire_fields(clocks.wall - hour) == 0
        assert [m.seq for m in outbox.pending(limit=1000)] == stored
        said = [r.getMessage() for r in caplog.records if "stepped" in r.getMessage()]
        assert len(said) == 1 and "not expired" in said[0], said
        filler.unlink()  # room again: the ages follow the step, and the fields expire an hour after they were stored
        clocks.run(hour - 200)
        assert outbox.expire_fields(clocks.wall - hour) == 0
        clocks.run(200)
        assert outbox.expire_fields(clocks.wall - hour) == len(stored)
