"""A station started on a damaged outbox file: one page of it unreadable, as an SD card leaves it
after a power cut mid-write or as it wears out. A real station process, mosquitto and SQLite."""

from __future__ import annotations

import os
import pickle
import re
import signal
import sqlite3
from collections.abc import Callable
from contextlib import closing
from pathlib import Path

import pytest
from broker import MosquittoBroker, Subscriber, free_port, wait_until
from smallfs import fill, small_tmpfs
from test_daemon import BASE, oracle_pool, write_station
from test_daemon_faults import DaemonProcess, received_ids

pytestmark = [pytest.mark.faults, pytest.mark.broker]


def rows_by_leaf(path: Path) -> list[tuple[int, list[tuple[int, str, str]]]]:
    """The outbox table's leaf pages in key order, each (page number, its rows (seq, report_id,
    topic)): SQLite's dbstat gives each leaf's cell count, the leaves in the order of their paths."""
    with closing(sqlite3.connect(path)) as conn:
        leaves = conn.execute("SELECT pageno, ncell FROM dbstat WHERE name = 'outbox' AND pagetype = 'leaf' "
                              "ORDER BY path").fetchall()
        rows = conn.execute("SELECT seq, report_id, topic FROM outbox ORDER BY seq").fetchall()
    out, at = [], 0
    for page, cells in leaves:
        out.append((page, rows[at:at + cells]))
        at += cells
    assert at == len(rows)
    return out


def damaged_outbox(tmp_path: Path, port: int, state: Path | None = None,
                   table: str = "outbox") -> tuple[Path, Path, list, list]:
    """A station's outbox file, written by a real station with no broker (about 40 messages kept),
    one leaf page in the middle of `table` then scrambled: (config, pool file, the outbox's rows on
    the damaged page, the field and report rows on the others)."""
    pool_file = tmp_path / "pool.pkl"
    pool_file.write_bytes(pickle.dumps(list(oracle_pool())))
    outbox = (state or tmp_path / "state") / "outbox.sqlite3"
    config = write_station(tmp_path, port, target_wbc=10, mqtt={"outbox": {"path": str(outbox)}})
    first = DaemonProcess(config, pool_file)  # no broker yet: everything stays in the outbox
    try:
        assert wait_until(lambda: len(first.stored()) >= 40, 60), first.lines[-20:]
        first.signal(signal.SIGTERM)
        assert first.wait(60) == 0, first.lines[-20:]
    finally:
        first.signal(signal.SIGKILL)
    with closing(sqlite3.connect(outbox)) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    leaves = rows_by_leaf(outbox)
    middle = len(leaves) // 2
    page, lost = leaves[middle]
    if table != "outbox":  # a page of the station's own tables: every message stays readable
        with closing(sqlite3.connect(outbox)) as conn:
            pages = conn.execute("SELECT pageno FROM dbstat WHERE name = ? AND pagetype = 'leaf' ORDER BY path",
                                 (table,)).fetchall()
        (page,), middle, lost = pages[len(pages) // 2], -1, []
    with outbox.open("r+b") as fh:  # the page's header and cell pointers scrambled
        fh.seek((page - 1) * 4096)
        fh.write(os.urandom(64))
    readable = [r for i, (_, leaf) in enumerate(leaves) if i != middle for r in leaf
                if r[2] in (f"{BASE}/field", f"{BASE}/report")]
    assert (bool(lost) == (table == "outbox")) and len(readable) >= 30
    return config, pool_file, lost, readable


def assert_readable_delivered_while_running(sub: Subscriber, station: DaemonProcess,
                                            readable: list[tuple[int, str, str]]) -> None:
    """Every message the damaged outbox still held readable reaches the broker, the station running throughout."""
    wanted = {report_id for _, report_id, _ in readable}
    assert sub.wait_for(lambda ms: station.proc.poll() is not None or wanted <= {r for _, r in received_ids(sub)},
                        60) and station.proc.poll() is None, (station.proc.poll(), station.lines[-20:])
    assert wanted <= {r for _, r in received_ids(sub)}


def test_a_station_started_on_an_outbox_with_a_damaged_page_sends_every_message_it_can_still_read(
    tmp_path: Path, credentials_dir: Path, broker_with: Callable[..., MosquittoBroker],
    observer_on: Callable[..., Subscriber], daemons: Callable[..., DaemonProcess],
) -> None:
    """SQLite refuses the whole file ('database disk image is malformed') for one bad page: the
    station exited 78 (not restarted by systemd), the reports in the good pages were never sent and
    nothing more was analysed. Now the file is kept aside, said at ERROR with the sequence numbers it
    could not read, and every message of the other pages is delivered; the station goes on."""
    port = free_port()
    config, pool_file, lost, readable = damaged_outbox(tmp_path, port)
    outbox = tmp_path / "state" / "outbox.sqlite3"

    sub = observer_on(broker_with(port=port).port, [f"{BASE}/#"])
    second = daemons(config, pool_file)
    assert_readable_delivered_while_running(sub, second, readable)
    assert wait_until(lambda: len(second.stored()) >= 3, 30), second.lines[-20:]  # it analyses on
    second.signal(signal.SIGTERM)
    assert second.wait(60) == 0, second.lines[-20:]
    new = {r for _, r, _ in second.stored()}
    assert sub.wait_for(lambda ms: new <= {r for _, r in received_ids(sub)}, 15)
    [said] = [ln for ln in second.lines if " ERROR " in ln and "is damaged" in ln]
    kept = re.search(r"kept as (\S+);", said)
    assert kept and Path(kept[1]).exists() and Path(kept[1]).parent == outbox.parent, said
    ranges = [(int(a), int(b or a)) for a, b in re.findall(r"(\d+)(?:-(\d+))?", said.split("sequence numbers ")[1].split(" could not")[0])]
    assert all(any(a <= seq <= b for a, b in ranges) for seq, _, _ in lost), (said, [s for s, _, _ in lost])


def test_a_file_that_is_no_sqlite_file_at_the_outboxs_path_is_refused_and_left_where_it_is(tmp_path: Path) -> None:
    """A path that names another kind of file (a configuration mistake: the station's config file)
    is not taken for a damaged outbox: it is neither moved nor replaced, and the start is refused
    as before (exit 78, mqtt.outbox.path)."""
    from smearscope.service.mqtt.outbox import Outbox
    from smearscope.service.mqtt.salvage import open_salvaging

    path = tmp_path / "station.toml"
    text = 'station_id = "bench-1"\n' * 200
    path.write_text(text)
    with pytest.raises(sqlite3.DatabaseError, match="not a database"):
        open_salvaging(lambda: Outbox(path), path)
    assert path.read_text() == text and sorted(p.name for p in tmp_path.iterdir()) == ["station.toml"]


def test_a_damaged_outbox_that_a_full_disk_keeps_from_being_salvaged_stays_as_it_was_for_the_next_start(
    tmp_path: Path, credentials_dir: Path, broker_with: Callable[..., MosquittoBroker],
    observer_on: Callable[..., Subscriber], daemons: Callable[..., DaemonProcess],
) -> None:
    """The copy of what can be read needs room: on a full disk (a real tmpfs) the start fails (exit
    1: systemd starts it again) and leaves the damaged file where it was, whole, with no copy or half
    copy beside it; once there is room the next start salvages it and delivers what it read."""
    state = tmp_path / "state"
    with small_tmpfs(state, 8192):
        port = free_port()
        config, pool_file, _, readable = damaged_outbox(tmp_path, port, state)
        outbox = state / "outbox.sqlite3"
        before = outbox.read_bytes()
        filler = fill(state, leave_bytes=len(before) // 2)
        full = daemons(config, pool_file)
        assert full.wait(60) == 1, full.lines[-20:]
        assert outbox.read_bytes() == before
        assert not [p.name for p in state.iterdir() if "damaged" in p.name or "salvage" in p.name]
        filler.unlink()
        sub = observer_on(broker_with(port=port).port, [f"{BASE}/#"])
        again = daemons(config, pool_file)
        wanted = {report_id for _, report_id, _ in readable}
        assert sub.wait_for(lambda ms: wanted <= {r for _, r in received_ids(sub)}, 60), again.lines[-20:]
        again.signal(signal.SIGTERM)
        assert again.wait(60) == 0, again.lines[-20:]


@pytest.mark.parametrize("folder", ["state", "lab #2 ?ward=3"])
def test_a_salvage_says_each_sequence_number_it_could_not_read_once_and_no_empty_range(
    tmp_path: Path, folder: str,
) -> None:
    """200 stored reports of 5 kB (each beside its overflow page), a leaf in the middle scrambled:
    every report is either in the new file, with its payload, or among the sequence numbers said
    not read, and no range is said that holds none (a scan that failed past a row a lookup then
    read was said as '100-99'). In a folder whose name holds '#' and '?' too (the damaged file is
    read through an SQLite URI: they were taken for its fragment and query)."""
    import random

    from smearscope.service.mqtt.outbox import NewMessage, Outbox
    from smearscope.service.mqtt.salvage import salvage

    path = tmp_path / folder / "outbox.sqlite3"
    with Outbox(path) as box:
        box.put_many([NewMessage("report", "t/report", str(i).encode() * (5000 // len(str(i))), f"r{i}", "1")
                      for i in range(1, 201)])
    with closing(sqlite3.connect(path)) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    leaves = rows_by_leaf(path)
    page, lost = leaves[len(leaves) // 2]
    with path.open("r+b") as fh:
        fh.seek((page - 1) * 4096)
        fh.write(random.Random(7).randbytes(64))
    said = salvage(path, "database disk image is malformed")
    with Outbox(path) as box:
        kept = {m.seq: m for m in box.pending(limit=1000)}
    assert all(kept[s].payload == str(s).encode() * (5000 // len(str(s))) for s in kept)
    unread = [s for a, b in said.unread for s in range(a, b + 1)]
    assert all(a <= b for a, b in said.unread), said.unread
    assert sorted([*kept, *unread]) == list(range(1, 201)), said.unread
    assert {s for s, _, _ in lost} <= set(unread) and said.messages == len(kept) == 200 - len(unread)


def test_a_bad_page_among_the_stations_own_rows_is_salvaged_too_and_every_message_is_sent(
    tmp_path: Path, credentials_dir: Path, broker_with: Callable[..., MosquittoBroker],
    observer_on: Callable[..., Subscriber], daemons: Callable[..., DaemonProcess],
) -> None:
    """A damaged page of the open run's cells (specimen_fields), not of the messages: the outbox
    opened (it reads only its messages), the start then failed reading the runs (exit 1) at every
    restart, and nothing was delivered. The file is checked whole at the start (quick_check),
    salvaged, and every message in it is delivered."""
    port = free_port()
    config, pool_file, _, readable = damaged_outbox(tmp_path, port, table="specimen_fields")
    sub = observer_on(broker_with(port=port).port, [f"{BASE}/#"])
    station = daemons(config, pool_file)
    assert_readable_delivered_while_running(sub, station, readable)
    station.signal(signal.SIGTERM)
    assert station.wait(60) == 0, station.lines[-20:]
    [said] = [ln for ln in station.lines if " ERROR " in ln and "is damaged" in ln]
    assert "every message of it was read" in said and "some rows of specimen_fields could not be read" in said, said
