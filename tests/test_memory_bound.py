"""The station's predicted peak memory against the limit it runs under: the cgroup reader (v2, v1,
hybrid) on directory trees laid out as the kernel presents them, and the WARNING doctor and the station's
start give when the frame limit and concurrent_fields predict a peak above it."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import cv2
import pytest
from broker import free_port
from test_daemon import pool_factory, write_station

from smearscope.cli import main
from smearscope.device import memory_limit
from smearscope.device.memory_limit import CgroupBound, read_memory_limits
from smearscope.device.synthetic import render_field
from smearscope.service.analysis.pipeline import DEFAULT_MODELS_DIR
from smearscope.service.config import load_config
from smearscope.service.station.daemon import run_daemon
from smearscope.service.station.memory_bound import (
    ANALYSIS_PEAKS_MIB,
    memory_verdict,
    predicted_peak_mib,
)

GIB = 1024 ** 3
SERVICE = "/system.slice/smearscope.service"
#: The lines of a Jetson's (JetPack 6, cgroup v2 only) /proc/self/mountinfo around the cgroup2 mount.
MOUNTINFO = ("22 28 0:20 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw\n"
             "26 22 0:23 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 "
             "rw,nsdelegate,memory_recursiveprot\n")
MEMINFO = "MemTotal:        7620056 kB\nMemFree:          301232 kB\nMemAvailable:    5120000 kB\n"


def cgroup_tree(root: Path, limits: dict[str, dict[str, str]], *, cgroup: str = SERVICE,
                mountinfo: str = MOUNTINFO, meminfo: str = MEMINFO, mount: str = "sys/fs/cgroup") -> Path:
    """A root laid out as the kernel presents a process in `cgroup`: proc/self/{cgroup,mountinfo},
    proc/meminfo, and `limits` ({cgroup path: {file: text}}) written under the cgroup2 mount."""
    (root / "proc" / "self").mkdir(parents=True)
    (root / "proc" / "self" / "cgroup").write_text(f"0::{cgroup}\n")
    (root / "proc" / "self" / "mountinfo").write_text(mountinfo)
    (root / "proc" / "meminfo").write_text(meminfo)
    (root / mount / cgroup.lstrip("/")).mkdir(parents=True, exist_ok=True)
    for path, files in limits.items():
        folder = root / mount / path.lstrip("/")
        folder.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (folder / name).write_text(text)
    return root


def unit_limits() -> dict[str, dict[str, str]]:
    """systemd/smearscope.service's MemoryHigh=2560M and MemoryMax=3G as the kernel shows them."""
    return {"/system.slice": {"memory.max": "max\n", "memory.high": "max\n"},
            SERVICE: {"memory.max": f"{3 * GIB}\n", "memory.high": f"{2560 * 1024 ** 2}\n"}}


def test_the_cgroup_reader_takes_the_tightest_limit_from_the_process_cgroup_up(tmp_path: Path) -> None:
    root = cgroup_tree(tmp_path / "jetson", unit_limits())
    limits = read_memory_limits(root)
    assert limits.cgroup == SERVICE
    assert limits.max == CgroupBound(3 * GIB, SERVICE) and limits.high == CgroupBound(2560 * 1024 ** 2, SERVICE, "memory.high")
    assert limits.total == 7620056 * 1024 and limits.available == 5120000 * 1024
    # a slice's limit bounds every service in it
    (root / "sys/fs/cgroup/system.slice/memory.max").write_text(f"{2 * GIB}\n")
    assert read_memory_limits(root).max == CgroupBound(2 * GIB, "/system.slice")


def test_the_cgroup_reader_on_this_machines_own_files_reads_no_limit_where_max_is_set(tmp_path: Path) -> None:
    """This machine's /proc/self/cgroup and mountinfo (wherever its cgroup2 is mounted), its cgroup
    saying 'max': no cgroup limit, so the machine's memory bounds the station."""
    cgroup = next(line[3:] for line in Path("/proc/self/cgroup").read_text().splitlines() if line.startswith("0::"))
    mountinfo = Path("/proc/self/mountinfo").read_text()
    mount = next(line.partition(" - ")[0].split()[4] for line in mountinfo.splitlines()
                 if line.partition(" - ")[2].startswith("cgroup2 "))
    root = cgroup_tree(tmp_path / "here", {cgroup: {"memory.max": "max\n", "memory.high": "max\n"}}, cgroup=cgroup,
                       mountinfo=mountinfo, meminfo=Path("/proc/meminfo").read_text(), mount=mount.lstrip("/"))
    limits = read_memory_limits(root)
    assert limits.cgroup == cgroup and limits.max is None and limits.high is None
    assert limits.total is not None and limits.available is not None
    (root / mount.lstrip("/") / cgroup.lstrip("/") / "memory.max").write_text(f"{GIB}\n")
    assert read_memory_limits(root).max == CgroupBound(GIB, "/" + cgroup.strip("/") if cgroup.strip("/") else "/")
    # the system's own files: MemTotal as /proc/meminfo says it
    total_kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                    if line.startswith("MemTotal:"))
    assert read_memory_limits().total == total_kb * 1024


def test_names_that_are_no_utf8_in_the_kernel_files_are_read_not_a_crash(tmp_path: Path) -> None:
    """The kernel shows mount points and cgroup names byte for byte: a USB stick mounted under a
    Latin-1 name before the cgroup2 line of mountinfo, and the station's cgroup named so too. Read
    as the same paths (the cgroup's memory.max found), where decoding them as UTF-8 stopped the start."""
    root = cgroup_tree(tmp_path / "latin1", unit_limits())
    (root / "proc/self/mountinfo").write_bytes(b"31 22 8:17 / /media/caf\xe9 rw,relatime shared:40 - vfat /dev/sdb1 rw\n"
                                               + MOUNTINFO.encode())
    cgroup = b"/system.slice/caf\xe9.service"
    (root / "proc/self/cgroup").write_bytes(b"0::" + cgroup + b"\n")
    folder = root / "sys/fs/cgroup" / os.fsdecode(cgroup.lstrip(b"/"))
    folder.mkdir(parents=True)
    (folder / "memory.max").write_text(f"{GIB}\n")
    limits = read_memory_limits(root)
    assert limits.max is not None and limits.max.bytes == GIB and os.fsencode(limits.max.cgroup) == cgroup
    assert limits.total == 7620056 * 1024
    # said in words doctor can print (a name it cannot encode stopped it there instead)
    text = memory_verdict(load_config(_folder_station(tmp_path, 4)), limits).text
    assert "memory.max of /system.slice/caf\\xe9.service, 1024 MiB" in text and text.encode(), text


def test_the_limit_reader_and_the_telemetry_read_one_meminfo_alike_each_in_its_units(tmp_path: Path) -> None:
    """One /proc/meminfo parser (device.meminfo) for both: the memory limit in bytes, the telemetry
    in MiB, from the same file; a byte that is no UTF-8 in it (an odd field name) stops neither."""
    from smearscope.device import telemetry

    root = cgroup_tree(tmp_path / "odd", unit_limits())
    meminfo = root / "proc/meminfo"
    meminfo.write_bytes(MEMINFO.encode() + b"Caf\xe9Pages:      12 kB\nHugePages_Total:       7\n")
    limits = read_memory_limits(root)
    assert limits.total == 7620056 * 1024 and limits.available == 5120000 * 1024
    figures = telemetry._proc_meminfo(meminfo)
    assert figures["memory_total_mb"] * 2 ** 20 == limits.total
    assert figures["memory_used_mb"] * 2 ** 20 == limits.total - limits.available
    assert figures["memory_percent"] == pytest.approx(100.0 * (7620056 - 5120000) / 7620056)


def test_the_prediction_holds_the_measured_peaks() -> None:
    """At or above every measured peak (docs/RESULTS.md): one analysis by frame size, and the
    station with 64 MP frames (1665 MiB with one field at once, 1906 with two) and 12 MP (987)."""
    assert all(predicted_peak_mib(mp, 1) >= peak for mp, peak in ANALYSIS_PEAKS_MIB)
    # 64 MP with one field is the station overhead's anchor (1665 MiB by construction): not checked here
    assert predicted_peak_mib(64, 2) >= 1906 and predicted_peak_mib(12, 2) >= 987
    # the unit's MemoryHigh=2560M holds two 64 MP fields at once, not three; MemoryMax=3G not four
    assert predicted_peak_mib(64, 2) < 2560 < predicted_peak_mib(64, 3) < 3072 < predicted_peak_mib(64, 4)


def _folder_station(tmp_path: Path, concurrent_fields: int) -> Path:
    inbox = tmp_path / "inbox"
    inbox.mkdir(exist_ok=True)
    return write_station(tmp_path, free_port(), credentials=False,
                         source={"kind": "folder", "path": str(inbox), "poll_interval_s": 0.05, "settle_s": 0.0,
                                 "microns_per_pixel": 0.2},
                         analysis={"concurrent_fields": concurrent_fields, "models_dir": str(DEFAULT_MODELS_DIR)})


def test_doctor_warns_when_frames_and_concurrent_fields_predict_a_peak_above_the_cgroup_limit(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Under the unit's MemoryMax=3G a watched folder (frames up to 64 MP) with four fields at once
    is predicted at 3544 MiB: doctor warns, naming the settings, the figures and the cgroup."""
    monkeypatch.setattr(memory_limit, "SYSTEM_ROOT", cgroup_tree(tmp_path / "jetson", unit_limits()))
    main(["doctor", "--config", str(_folder_station(tmp_path, 4))])
    (line,) = [ln for ln in capsys.readouterr().out.splitlines() if ln.split()[1:2] == ["memory"]]
    assert line.startswith("WARN  memory") and "predicted peak 3544 MiB with frames up to 64 MP" in line, line
    assert "analysis.concurrent_fields = 4" in line and f"memory.max of {SERVICE}, 3072 MiB" in line, line
    assert "OOM-kills" in line, line
    main(["doctor", "--config", str(_folder_station(tmp_path, 3))])  # above MemoryHigh only
    (line,) = [ln for ln in capsys.readouterr().out.splitlines() if ln.split()[1:2] == ["memory"]]
    assert line.startswith("WARN  memory") and f"memory.high of {SERVICE}, 2560 MiB" in line, line
    main(["doctor", "--config", str(_folder_station(tmp_path, 2))])
    (line,) = [ln for ln in capsys.readouterr().out.splitlines() if ln.split()[1:2] == ["memory"]]
    assert line.startswith("OK    memory") and "2291 MiB" in line and "fits" in line, line


def test_the_station_warns_at_its_start_when_the_predicted_peak_is_above_the_cgroup_limit(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """The station starts (and analyses its file) under a cgroup whose memory.max its frame limit
    and concurrent_fields = 4 exceed, and says so at WARNING; at 2 it says the peak fits, at INFO."""
    monkeypatch.setattr(memory_limit, "SYSTEM_ROOT", cgroup_tree(tmp_path / "jetson", unit_limits()))
    said = {}
    for fields in (4, 2):
        run = tmp_path / f"fields-{fields}"
        run.mkdir()
        config = _folder_station(run, fields)
        cv2.imwrite(str(run / "inbox" / "field.png"), render_field(3, width=320, height=240).frame.pixels)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="smearscope.service.station.memory_bound"):
            assert run_daemon(config, 1, analyzer_factory=pool_factory(), environ={}) == 0
        (said[fields],) = [(r.levelno, r.getMessage()) for r in caplog.records if r.name.endswith("memory_bound")]
        assert (run / "inbox" / "done" / "field.png").exists()  # it started and analysed the file
    level, text = said[4]
    assert level == logging.WARNING and text.startswith("memory: predicted peak 3544 MiB with frames up to 64 MP"), text
    assert "analysis.concurrent_fields = 4" in text and f"memory.max of {SERVICE}, 3072 MiB" in text, text
    assert said[2][0] == logging.INFO and "2291 MiB" in said[2][1] and "fits" in said[2][1], said[2]


def test_with_no_cgroup_limit_the_machines_memory_bounds_the_prediction(tmp_path: Path) -> None:
    """No cgroup limit ('max' up to the root): the predicted peak is held to MemAvailable, and to
    MemTotal where the machine's RAM itself is too small."""
    config = load_config(_folder_station(tmp_path, 2))  # 2291 MiB predicted
    free = {"/system.slice": {"memory.max": "max\n"}, SERVICE: {"memory.max": "max\n", "memory.high": "max\n"}}
    roomy = read_memory_limits(cgroup_tree(tmp_path / "roomy", free))
    assert memory_verdict(config, roomy).fits
    busy = read_memory_limits(cgroup_tree(tmp_path / "busy", free, meminfo=MEMINFO.replace("5120000", "2000000")))
    verdict = memory_verdict(config, busy)
    assert not verdict.fits and "above the memory free now (MemAvailable), 1953 MiB" in verdict.text, verdict.text
    small = read_memory_limits(cgroup_tree(tmp_path / "small", free, meminfo="MemTotal: 2000000 kB\n"))
    verdict = memory_verdict(config, small)
    assert not verdict.fits and "above the machine's RAM (MemTotal), 1953 MiB" in verdict.text, verdict.text


#: An older JetPack's (cgroup v1 only) /proc/self/mountinfo: each controller a `cgroup` mount, its
#: super options naming it; systemd's own hierarchy as name=systemd.
MOUNTINFO_V1 = ("22 28 0:20 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw\n"
                "25 22 0:22 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:8 - tmpfs tmpfs ro,mode=755\n"
                "27 25 0:24 / /sys/fs/cgroup/systemd rw,nosuid,nodev,noexec,relatime shared:9 - cgroup cgroup "
                "rw,xattr,name=systemd\n"
                "31 25 0:28 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid,nodev,noexec,relatime shared:13 - cgroup cgroup "
                "rw,cpu,cpuacct\n"
                "33 25 0:30 / /sys/fs/cgroup/memory rw,nosuid,nodev,noexec,relatime shared:15 - cgroup cgroup "
                "rw,memory\n")
#: A hybrid host's (Ubuntu 20.04's default): the v1 controllers and an empty cgroup2 at unified/.
MOUNTINFO_HYBRID = MOUNTINFO_V1 + ("26 25 0:23 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 "
                                   "- cgroup2 cgroup2 rw,nsdelegate\n")
#: memory.limit_in_bytes where nothing is set: the kernel's PAGE_COUNTER_MAX pages of 4 KiB.
V1_UNLIMITED = "9223372036854771712\n"


def v1_tree(root: Path, limits: dict[str, str], *, hybrid: bool = False, cgroup: str = SERVICE) -> Path:
    """A root laid out as a cgroup v1 (or hybrid) host presents a process in `cgroup`: its
    /proc/self/cgroup lines and `limits` ({cgroup path: memory.limit_in_bytes text}) under the v1
    memory mount; the hybrid's cgroup2 (unified/) holds no memory files (the controller is on v1)."""
    (root / "proc" / "self").mkdir(parents=True)
    lines = [f"11:memory:{cgroup}", "3:cpu,cpuacct:/", f"1:name=systemd:{cgroup}"] + ([f"0::{cgroup}"] if hybrid else [])
    (root / "proc" / "self" / "cgroup").write_text("\n".join(lines) + "\n")
    (root / "proc" / "self" / "mountinfo").write_text(MOUNTINFO_HYBRID if hybrid else MOUNTINFO_V1)
    (root / "proc" / "meminfo").write_text(MEMINFO)
    for mount in ("sys/fs/cgroup/systemd", "sys/fs/cgroup/unified")[:2 if hybrid else 1]:
        (root / mount / cgroup.lstrip("/")).mkdir(parents=True)
    for path, text in limits.items():
        folder = root / "sys/fs/cgroup/memory" / path.lstrip("/")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "memory.limit_in_bytes").write_text(text)
    return root


@pytest.mark.parametrize("hybrid", [False, True], ids=["v1", "hybrid"])
def test_a_cgroup_v1_memory_limit_is_read_up_to_the_hierarchys_root(tmp_path: Path, hybrid: bool) -> None:
    """The unit's MemoryMax=3G as systemd writes it on a v1 memory controller (memory.limit_in_bytes;
    the slice and the root 'unlimited'): read, named by its file, and the verdict says it, where only
    cgroup v2's files were read and the machine's MemAvailable was taken for the bound."""
    unlimited = {"/": V1_UNLIMITED, "/system.slice": V1_UNLIMITED}
    root = v1_tree(tmp_path / "jetson", {**unlimited, SERVICE: f"{3 * GIB}\n"}, hybrid=hybrid)
    limits = read_memory_limits(root)
    assert limits.max == CgroupBound(3 * GIB, SERVICE, "memory.limit_in_bytes") and limits.high is None
    assert limits.cgroup == (SERVICE if hybrid else None) and memory_limit.systemd_cgroup(root) == SERVICE
    text = memory_verdict(load_config(_folder_station(tmp_path, 4)), limits).text
    assert "above the cgroup memory.limit_in_bytes of /system.slice/smearscope.service, 3072 MiB" in text, text
    # a slice's limit bounds every service in it, as on v2
    (root / "sys/fs/cgroup/memory/system.slice/memory.limit_in_bytes").write_text(f"{2 * GIB}\n")
    assert read_memory_limits(root).max == CgroupBound(2 * GIB, "/system.slice", "memory.limit_in_bytes")
    # 'unlimited' all the way up is no limit: the machine's memory bounds the station
    (root / "sys/fs/cgroup/memory/system.slice/memory.limit_in_bytes").write_text(V1_UNLIMITED)
    (root / "sys/fs/cgroup/memory" / SERVICE.lstrip("/") / "memory.limit_in_bytes").write_text(V1_UNLIMITED)
    assert read_memory_limits(root).max is None
    # 64 KiB pages give a smaller 'unlimited' (LONG_MAX rounded down to the page): no limit either
    (root / "sys/fs/cgroup/memory" / SERVICE.lstrip("/") / "memory.limit_in_bytes").write_text(
        f"{(2 ** 63 - 1) // 65536 * 65536}\n")
    assert read_memory_limits(root).max is None


def test_a_hybrid_hosts_tighter_limit_binds_whichever_hierarchy_sets_it(tmp_path: Path) -> None:
    """v2's memory.max (a cgroup2 with the memory controller) and v1's memory.limit_in_bytes both
    read on a hybrid host: the tighter one bounds the station; memory.high comes from v2 only."""
    root = v1_tree(tmp_path / "hybrid", {"/": V1_UNLIMITED, SERVICE: f"{3 * GIB}\n"}, hybrid=True)
    unified = root / "sys/fs/cgroup/unified" / SERVICE.lstrip("/")
    (unified / "memory.max").write_text(f"{2 * GIB}\n")
    (unified / "memory.high").write_text(f"{GIB}\n")
    limits = read_memory_limits(root)
    assert limits.max == CgroupBound(2 * GIB, SERVICE, "memory.max")
    assert limits.high == CgroupBound(GIB, SERVICE, "memory.high")
    (unified / "memory.max").write_text("max\n")
    assert read_memory_limits(root).max == CgroupBound(3 * GIB, SERVICE, "memory.limit_in_bytes")


def test_a_containers_v1_memory_mount_shows_its_own_cgroup_at_the_mount_point(tmp_path: Path) -> None:
    """In a container the v1 memory mount's root (mountinfo's 4th field) is the container's cgroup,
    /proc/self/cgroup naming it in full: its memory.limit_in_bytes lies at the mount point itself, and
    a cgroup below it under the mount point less the mount's root."""
    root = v1_tree(tmp_path / "container", {}, cgroup="/docker/4f1c")
    (root / "proc/self/mountinfo").write_text(MOUNTINFO_V1.replace(" / /sys/fs/cgroup/memory ",
                                                                   " /docker/4f1c /sys/fs/cgroup/memory "))
    (root / "sys/fs/cgroup/memory").mkdir(parents=True)
    (root / "sys/fs/cgroup/memory/memory.limit_in_bytes").write_text(f"{GIB}\n")
    assert read_memory_limits(root).max == CgroupBound(GIB, "/docker/4f1c", "memory.limit_in_bytes")
    # the station in a cgroup of its own inside the container: found below the mount point, not beside it
    (root / "proc/self/cgroup").write_text("11:memory:/docker/4f1c/station\n")
    (root / "sys/fs/cgroup/memory/station").mkdir()
    (root / "sys/fs/cgroup/memory/station/memory.limit_in_bytes").write_text(f"{GIB // 2}\n")
    assert read_memory_limits(root).max == CgroupBound(GIB // 2, "/docker/4f1c/station", "memory.limit_in_bytes")


def test_the_v1_reader_on_this_machines_own_files(tmp_path: Path) -> None:
    """This machine's /proc/self/cgroup and mountinfo where its memory controller is a v1 hierarchy
    (a hybrid container host): 'unlimited' read as none, a limit written in its cgroup read."""
    lines = Path("/proc/self/cgroup").read_text().splitlines()
    memory = next((ln.split(":", 2)[2] for ln in lines if "memory" in ln.split(":", 2)[1].split(",")), None)
    mountinfo = Path("/proc/self/mountinfo").read_text()
    mount = next((ln.partition(" - ")[0].split() for ln in mountinfo.splitlines()
                  if ln.partition(" - ")[2].startswith("cgroup ") and "memory" in ln.split()[-1].split(",")), None)
    if memory is None or mount is None or mount[3] != "/":
        pytest.skip("this machine's memory controller is not a cgroup v1 hierarchy mounted from its root")
    root = tmp_path / "here"
    (root / "proc/self").mkdir(parents=True)
    (root / "proc/self/cgroup").write_text("\n".join(lines) + "\n")
    (root / "proc/self/mountinfo").write_text(mountinfo)
    (root / "proc/meminfo").write_text(MEMINFO)
    real = Path(mount[4], memory.lstrip("/"), "memory.limit_in_bytes")  # the kernel's own value for this cgroup
    folder = root / mount[4].lstrip("/") / memory.lstrip("/")
    folder.mkdir(parents=True)
    (folder / "memory.limit_in_bytes").write_text(real.read_text())
    value = int(real.read_text())
    assert read_memory_limits(root).max == (None if value >= memory_limit.V1_UNLIMITED_BYTES
                                            else CgroupBound(value, memory, "memory.limit_in_bytes"))
    (folder / "memory.limit_in_bytes").write_text(f"{GIB}\n")
    assert read_memory_limits(root).max == CgroupBound(GIB, memory, "memory.limit_in_bytes")
