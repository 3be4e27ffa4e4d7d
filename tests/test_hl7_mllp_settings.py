"""`--hl7-mllp HOST:PORT` and `--hl7-mllp-timeout SECONDS`, checked once, by the archive's config
(service.config.archive, with the parse_address the sender connects by): an address the archive
could not connect to (port 0, 65536, 99999, no port, no host, a bare IPv6 address) is refused when
the settings are made, exit 2 naming the option, before anything is opened; an IPv6 address in
brackets is taken and reached; the timeout, above 0 and at most 300, bounds each exchange."""

from __future__ import annotations

import shutil
import socket
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pydantic
import pytest
from broker import free_port
from mllp_lis import RawLis, accept
from test_archive_send_hl7 import VERSION_1

from smearscope.cli import build_parser, main
from smearscope.cli.archive import _config
from smearscope.service.config.archive import ArchiveConfig
from smearscope.service.config.mqtt import MqttConfig
from smearscope.service.hl7 import mllp

BAD = [
    ("lis:0", "the port 0 is not one of 1 to 65535"),
    ("lis:65536", "the port 65536 is not one of 1 to 65535"),
    ("lis:99999", "the port 99999 is not one of 1 to 65535"),
    ("lis.clinic.lan", "no :PORT"),
    ("lis.clinic.lan:", "no port after the ':'"),
    (":2575", "no host before the ':'"),
    ("[]:2575", "[] is not an IPv6 address in brackets"),
    ("fd00::5:2575", "an IPv6 address goes in brackets"),
]


def _archive_argv(tmp_path: Path, *options: str) -> list[str]:
    """The archive's command line; its folder under a file, so an archive that took the settings
    fails to open it (exit 1) rather than running."""
    (tmp_path / "a-file").touch()
    return ["archive", "--broker", f"mqtt://127.0.0.1:{free_port()}", "--dir", str(tmp_path / "a-file" / "archive"),
            *options]


@pytest.mark.parametrize(("address", "why"), BAD)
def test_an_address_the_archive_cannot_connect_to_is_refused_when_the_settings_are_made(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], address: str, why: str) -> None:
    with pytest.raises(pydantic.ValidationError) as caught:
        ArchiveConfig(mqtt=MqttConfig(host="broker"), directory=tmp_path, hl7_mllp=address)
    assert [e["loc"] for e in caught.value.errors()] == [("hl7_mllp",)]
    assert why in str(caught.value)
    # the archive and send-hl7: exit 2 (not 1: the archive's folder not opened), one line naming the option
    said = f"smearscope archive: --hl7-mllp: {address!r} is not HOST:PORT: "
    assert main(_archive_argv(tmp_path, "--hl7-mllp", address)) == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith(said) and why in line and "\n" not in line, line
    assert main(["archive", "send-hl7", "--all", "--dir", str(tmp_path / "archive"), "--hl7-mllp", address]) == 2
    assert capsys.readouterr().err.strip() == line


@pytest.mark.parametrize(("address", "host", "port"), [
    ("lis.clinic.lan:2575", "lis.clinic.lan", 2575), ("10.0.0.5:65535", "10.0.0.5", 65535),
    ("lis:1", "lis", 1), ("[fd00::5]:2575", "fd00::5", 2575), ("[::1]:2575", "::1", 2575)])
def test_a_host_and_port_the_archive_connects_to_are_taken(tmp_path: Path, address: str, host: str, port: int) -> None:
    config = ArchiveConfig(mqtt=MqttConfig(host="broker"), directory=tmp_path, hl7_mllp=address)
    assert config.mllp_address == (host, port)
    assert mllp.address_text((host, port)) == address  # as recorded in the index: the text given


@pytest.fixture
def archive(tmp_path: Path) -> Path:
    directory = tmp_path / "archive"
    shutil.copytree(VERSION_1, directory, ignore=shutil.ignore_patterns("README.md"))
    return directory


@pytest.fixture
def ipv6_lis() -> Iterator[RawLis]:
    """An MLLP listener on [::1] accepting each message (AA with its MSH-10)."""
    lis = RawLis(accept, host="::1")
    yield lis
    lis.close()


def test_an_ipv6_listener_in_brackets_is_sent_to_and_recorded_as_given(
        archive: Path, ipv6_lis: RawLis, capsys: pytest.CaptureFixture[str]) -> None:
    address = f"[::1]:{ipv6_lis.port}"
    assert main(["archive", "send-hl7", "--all", "--dir", str(archive), "--hl7-mllp", address]) == 0
    assert len(ipv6_lis.received) == 2
    db = sqlite3.connect(f"{(archive / 'index.sqlite').as_uri()}?mode=ro", uri=True)
    try:
        assert {d for (d,) in db.execute("SELECT destination FROM hl7_deliveries")} == {f"mllp:{address}"}
    finally:
        db.close()
    assert f"-> mllp:{address} (MSH-10" in capsys.readouterr().out


@pytest.mark.parametrize(("value", "why"), [
    ("0", "greater than 0"), ("-1", "greater than 0"), ("301", "less than or equal to 300"),
    ("nan", "finite number"), ("inf", "finite number")])
def test_a_timeout_out_of_bounds_is_refused_naming_the_option(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], value: str, why: str) -> None:
    argv = ["--hl7-mllp", "lis.clinic.lan:2575", "--hl7-mllp-timeout", value]
    assert main(_archive_argv(tmp_path, *argv)) == 2
    err = capsys.readouterr().err
    assert "smearscope archive: --hl7-mllp-timeout: " in err and why in err, err
    assert main(["archive", "send-hl7", "--all", "--dir", str(tmp_path / "archive"), *argv]) == 2
    err = capsys.readouterr().err
    assert "smearscope archive: --hl7-mllp-timeout: " in err and why in err, err


def test_the_archive_takes_the_timeout_given_and_ten_seconds_without(tmp_path: Path) -> None:
    parser = build_parser()
    given = _config(parser.parse_args(_archive_argv(tmp_path, "--hl7-mllp", "lis:2575", "--hl7-mllp-timeout", "2.5")))
    assert given.hl7_mllp_timeout_s == 2.5
    assert _config(parser.parse_args(_archive_argv(tmp_path, "--hl7-mllp", "lis:2575"))).hl7_mllp_timeout_s == 10


def test_send_hl7_gives_a_silent_listener_the_timeout_given(archive: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A listener that takes the connection and never answers: the send stops after the 0.5 s given
    (exit 1, the same command goes on from there), nothing recorded."""
    silent = socket.create_server(("127.0.0.1", 0))  # the kernel completes the connection; nobody reads
    try:
        port = silent.getsockname()[1]
        assert main(["archive", "send-hl7", "--all", "--dir", str(archive), "--hl7-mllp", f"127.0.0.1:{port}",
                     "--hl7-mllp-timeout", "0.5"]) == 1
    finally:
        silent.close()
    err = capsys.readouterr().err
    assert f"no ACK from 127.0.0.1:{port} (TimeoutError: no whole ACK within 0.5 s)" in err, err
    assert "0 delivered" in err
