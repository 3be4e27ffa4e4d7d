"""ACKs as real interface engines send them, each from a real TCP listener (tests/mllp_lis.py): split
into many TCP segments, with ERR and Z segments, other encoding characters, CR LF line ends, bytes
outside the MLLP frame (a keep-alive before it, a line end after it), text that is no UTF-8, and an
enhanced-mode commit ACK (CA) before the application ACK. Each is an ACK of the message and accepted:
none may be taken for 'not an ACK', which the archive gives up on after its error hold."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from mllp_lis import CONTROL_ID, MESSAGE, Behaviour, RawLis, in_pieces, msh10

from smearscope.service.hl7 import mllp

MSH = b"MSH|^~\\&|LIS|LAB|smearscope|lab-7|20261130091500||ACK^R01^ACK|A1|P|2.5.1"
ACK = MSH + b"\rMSA|AA|{id}\r"
VT, FS_CR = mllp.START, mllp.END


@pytest.mark.parametrize("pieces", [
    pytest.param([VT + ACK + FS_CR], id="whole"),
    pytest.param([VT + ACK + b"\x1c", b"\r"], id="end-block-split"),
    pytest.param([VT + MSH + b"\rMSA|AA|{id}|ok\rERR|||207^Application internal error^HL70357|W\r"
                  b"ZAK|1|custom\rZZ1|x\r" + FS_CR], id="err-and-z-segments"),
    pytest.param([VT + ACK.replace(b"\r", b"\r\n") + FS_CR], id="crlf-segment-ends"),
    pytest.param([VT + ACK.replace(b"^~\\&", b"^~\\&#") + FS_CR], id="msh2-v2.7-truncation"),
    pytest.param([VT + ACK.replace(b"|", b"#") + FS_CR], id="field-separator-#"),
    pytest.param([VT + MSH.replace(b"|", b"#").replace(b"^", b"$") + b"\rMSA#AE#{id}\rERR###207$Locked$HL70357\r"
                  + FS_CR], id="separators-#-$-error"),
    pytest.param([VT + MSH + b"|||||UNICODE UTF-8\rMSA|AA|{id}|\xc3\xbcbernommen\r" + FS_CR], id="utf-8"),
    pytest.param([VT + MSH + b"|||||8859/1\rMSA|AA|{id}|\xfcbernommen\r" + FS_CR], id="latin-1"),
    pytest.param([VT + ACK + FS_CR + b"\n"], id="line-end-after-frame"),
    pytest.param([VT + ACK + b"\x1c"], id="fs-alone-then-closed"),
    pytest.param([VT + ACK + b"\x1c\n"], id="fs-lf-then-closed"),
    pytest.param([VT + ACK + FS_CR, b"\r\n"], id="crlf-after-frame-apart"),
    pytest.param([b"\n" + VT + ACK + FS_CR], id="line-end-before-frame"),
    pytest.param([b"\x00\x00", VT + ACK + FS_CR], id="keep-alive-bytes-before-frame"),
    pytest.param([VT + FS_CR, VT + ACK + FS_CR], id="empty-keep-alive-frame-first"),
    pytest.param([VT + ACK.replace(b"AA", b"CA") + FS_CR, VT + ACK + FS_CR], id="commit-then-application-ack"),
    pytest.param([VT + ACK.replace(b"AA", b"CA") + FS_CR + VT + ACK + FS_CR], id="commit-and-application-ack-at-once"),
])
def test_an_ack_as_interface_engines_send_it_is_accepted(lis: Callable[[Behaviour], RawLis],
                                                         pieces: list[bytes]) -> None:
    server = lis(in_pieces(*pieces))
    if b"MSA#AE#" in pieces[0]:  # an AE: an ACK of this message, its ERR text read with the ACK's own separators
        with pytest.raises(mllp.NotAcknowledged) as caught:
            mllp.send(("127.0.0.1", server.port), MESSAGE, CONTROL_ID, 10)
        assert (caught.value.kind, caught.value.lis_text) == ("AE", "Locked")
    else:
        assert mllp.send(("127.0.0.1", server.port), MESSAGE, CONTROL_ID, 10) in mllp.ACCEPTED
    assert len(server.received) == 1


def test_an_ack_sent_a_byte_a_segment_is_accepted(lis: Callable[[Behaviour], RawLis]) -> None:
    server = lis(in_pieces(VT + ACK.replace(b"\r", b"\r\n") + FS_CR + b"\r\n", a_byte_each=True))
    assert mllp.send(("127.0.0.1", server.port), MESSAGE, CONTROL_ID, 10) == "AA"


@pytest.mark.parametrize(("echo", "accepted"), [
    pytest.param(str.upper, True, id="upper-cased"),
    pytest.param(lambda cid: cid + "   ", True, id="space-padded"),
    pytest.param(lambda cid: " " + cid, True, id="space-before"),
    pytest.param(lambda cid: cid[:-1], False, id="a-digit-short"),
    pytest.param(lambda cid: cid[:-1] + ("0" if cid[-1] != "0" else "1"), False, id="another-id"),
])
def test_msa_2_is_the_control_id_whatever_the_case_or_padding_an_interface_engine_gives_it(
        lis: Callable[[Behaviour], RawLis], echo: Callable[[str], str], accepted: bool) -> None:
    """A LIS whose interface engine upper-cases the control id it echoes (the id is hex: its case carries
    nothing) or pads it to a fixed width acknowledges this message; it was taken for 'not an ACK', retried
    and held as not accepted. An id that differs in anything else is still another message's ACK."""
    def behaviour(conn, data: bytes) -> None:
        conn.sendall(VT + ACK.replace(b"{id}", echo(msh10(data)).encode()) + FS_CR)

    server = lis(behaviour)
    if accepted:
        assert mllp.send(("127.0.0.1", server.port), MESSAGE, CONTROL_ID, 10) == "AA"
    else:
        with pytest.raises(mllp.NotAcknowledged) as caught:
            mllp.send(("127.0.0.1", server.port), MESSAGE, CONTROL_ID, 10)
        assert caught.value.kind == mllp.NOT_ACK
