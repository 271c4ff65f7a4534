"""The DICOM upper layer's PDUs and the C-STORE command sets, as bytes: a pure codec.

Nothing here reads a socket, a clock or pynetdicom's state: bytes in, bytes (or plain values)
out. The receiver's direct path (:mod:`..receive.intake`), the exporter's
(:mod:`..export.direct`) and pynetdicom's patched response path (:mod:`.fastnet`) all frame and
parse through it, and ``tests/unit/test_dicom_pdu.py`` checks every encoder byte for byte
against pynetdicom's own (``pynetdicom.pdu``, ``dimse_messages``).

- PDUs (PS3.8 9.3): the 6-byte header of any PDU; a P-DATA-TF's PDV items (a 4-byte length,
  the presentation context ID, the message control header: bit 0 command, bit 1 last
  fragment); A-RELEASE-RQ/RP and A-ABORT.
- Command sets (PS3.7 9.3.1, 9.3.2; always Implicit VR Little Endian, elements in tag order,
  group length first): C-STORE-RQ and C-STORE-RSP with the fields we use, and a parser.
- :class:`Status`: the C-STORE statuses we send or read (PS3.4 B.2.3, PS3.7 C.4.2), once.

Hot paths stay copy-free: a dataset fragment is never joined to its header here (callers
write :func:`pdata_header` and the fragment separately, or into one buffer they own), and
:func:`split_pdvs` returns memoryviews of the body it was given.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

__all__ = [
    "A_ABORT",
    "A_RELEASE_RP",
    "A_RELEASE_RQ",
    "COMMAND",
    "LAST",
    "PDU_HEADER",
    "PDV_HEADER",
    "P_DATA_TF",
    "Status",
    "a_abort",
    "a_release_rp",
    "a_release_rq",
    "c_store_rq",
    "c_store_rsp",
    "c_store_rsp_status",
    "command_ui",
    "command_us",
    "parse_command",
    "parse_pdu_header",
    "parse_pdv_header",
    "pdata",
    "pdata_header",
    "pdu_header",
    "pdv_header",
    "split_pdvs",
]

# PDU types (PS3.8 table 9-11)
A_ASSOCIATE_RQ, A_ASSOCIATE_AC, A_ASSOCIATE_RJ = 0x01, 0x02, 0x03
P_DATA_TF, A_RELEASE_RQ, A_RELEASE_RP, A_ABORT = 0x04, 0x05, 0x06, 0x07
PDU_TYPES = frozenset((0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07))
PDU_HEADER = 6  # type, reserved, length (big endian)
PDV_HEADER = 6  # item length, presentation context ID, message control header
COMMAND, LAST = 0x01, 0x02  # message control header bits (PS3.8 E.2)

# Command set elements (PS3.7 E.1) and values
GROUP_LENGTH = 0x00000000
AFFECTED_SOP_CLASS = 0x00000002
COMMAND_FIELD = 0x00000100
MESSAGE_ID = 0x00000110
MESSAGE_ID_RESPONDED = 0x00000120
PRIORITY = 0x00000700
DATASET_TYPE = 0x00000800
STATUS = 0x00000900
ERROR_COMMENT = 0x00000902
AFFECTED_SOP_INSTANCE = 0x00001000
C_STORE_RQ, C_STORE_RSP = 0x0001, 0x8001  # Command Field
DATASET, NO_DATASET = 0x0001, 0x0101  # Command Data Set Type (pynetdicom writes 0x0001)
MEDIUM, HIGH, LOW = 0x0000, 0x0001, 0x0002  # Priority


class Status:
    """The C-STORE statuses we answer or act on (PS3.4 B.2.3, PS3.7 C.4.2)."""

    SUCCESS = 0x0000
    OUT_OF_RESOURCES = 0xA700  # disk reserve reached, or the disk is full
    TOO_LARGE = 0xA701  # beyond max_instance_size (Out of Resources range)
    NOT_MATCHING = 0xA900  # UIDs missing, malformed, or not those of the request
    CANNOT_UNDERSTAND = 0xC000  # undecodable dataset
    DUPLICATE = 0x0111  # duplicate SOP instance
    PROCESSING_FAILURE = 0x0110  # anything unexpected


_PDU_HEADER = struct.Struct(">BBI")
_PDV_HEADER = struct.Struct(">IBB")
_PDATA_HEADER = struct.Struct(">BBIIBB")
_ELEMENT = struct.Struct("<HHI")
_US = struct.Struct("<H")


# -- PDUs -------------------------------------------------------------------------------------


def pdu_header(pdu_type: int, length: int) -> bytes:
    """A PDU's first 6 bytes: its type and the length of what follows."""
    return _PDU_HEADER.pack(pdu_type, 0, length)


def parse_pdu_header(header: bytes | memoryview) -> tuple[int, int]:
    """(PDU type, length of what follows) of a PDU's first 6 bytes."""
    pdu_type, _, length = _PDU_HEADER.unpack(header)
    return pdu_type, length


def pdv_header(length: int, context_id: int, control: int) -> bytes:
    """The 6 bytes before a PDV's ``length`` bytes of data (the item length counts the
    context ID and the control header too)."""
    return _PDV_HEADER.pack(length + 2, context_id, control)


def parse_pdv_header(head: bytes | memoryview) -> tuple[int, int, int]:
    """(item length, context ID, control header) of a PDV item's first 6 bytes: the data
    that follows is ``item length - 2`` bytes (an item length below 2 is malformed)."""
    return _PDV_HEADER.unpack(head)


def pdata_header(length: int, context_id: int, control: int) -> bytes:
    """The 12 bytes before a fragment of ``length`` bytes: a P-DATA-TF with one PDV."""
    return _PDATA_HEADER.pack(P_DATA_TF, 0, length + 6, length + 2, context_id, control)


def pdata(pdvs: Iterable[tuple[int, int, bytes]]) -> bytes:
    """A P-DATA-TF holding the PDVs ``(context ID, control header, data)``."""
    body = b"".join(pdv_header(len(data), cx, control) + bytes(data) for cx, control, data in pdvs)
    return _PDU_HEADER.pack(P_DATA_TF, 0, len(body)) + body


def split_pdvs(body: bytes | memoryview) -> list[tuple[int, int, memoryview]] | None:
    """The PDVs ``(context ID, control header, data)`` of a P-DATA-TF's body (what follows
    its 6-byte header), the data as views of ``body``; None if the items do not tile it."""
    view = memoryview(body)
    pdvs, pos, end = [], 0, len(view)
    while pos + PDV_HEADER <= end:
        size, context_id, control = _PDV_HEADER.unpack_from(view, pos)
        if size < 2 or pos + 4 + size > end:
            return None
        pdvs.append((context_id, control, view[pos + PDV_HEADER : pos + 4 + size]))
        pos += 4 + size
    return pdvs if pos == end else None


def a_release_rq() -> bytes:
    """An A-RELEASE-RQ PDU."""
    return _PDU_HEADER.pack(A_RELEASE_RQ, 0, 4) + b"\0\0\0\0"


def a_release_rp() -> bytes:
    """An A-RELEASE-RP PDU."""
    return _PDU_HEADER.pack(A_RELEASE_RP, 0, 4) + b"\0\0\0\0"


def a_abort(source: int = 0, reason: int = 0) -> bytes:
    """An A-ABORT PDU: ``source`` 0 the service user (reason then 0), 2 the service provider
    with its ``reason`` (PS3.8 table 9-26)."""
    return _PDU_HEADER.pack(A_ABORT, 0, 4) + bytes((0, 0, source, reason if source == 2 else 0))


# -- command sets -----------------------------------------------------------------------------


def _element(tag: int, value: bytes) -> bytes:
    return _ELEMENT.pack(tag >> 16, tag & 0xFFFF, len(value)) + value


def _uid(value: str) -> bytes:
    data = value.encode("latin-1")  # a request's bytes as received (decoded as latin-1)
    return data + b"\0" if len(data) % 2 else data


def _command(elements: Iterable[bytes]) -> bytes:
    body = b"".join(elements)
    return _element(GROUP_LENGTH, struct.pack("<I", len(body))) + body


def c_store_rq(sop_class: str, sop_instance: str, msg_id: int, priority: int = LOW) -> bytes:
    """A C-STORE-RQ's command set (a dataset follows; no move originator)."""
    return _command((
        _element(AFFECTED_SOP_CLASS, _uid(sop_class)),
        _element(COMMAND_FIELD, _US.pack(C_STORE_RQ)),
        _element(MESSAGE_ID, _US.pack(msg_id)),
        _element(PRIORITY, _US.pack(priority)),
        _element(DATASET_TYPE, _US.pack(DATASET)),
        _element(AFFECTED_SOP_INSTANCE, _uid(sop_instance)),
    ))  # fmt: skip


def c_store_rsp(
    sop_class: str, sop_instance: str, msg_id: int, status: int, comment: str | None = None
) -> bytes:
    """A C-STORE-RSP's command set, with an Error Comment (0000,0902) if given (ASCII, at
    most 64 characters: LO, padded with a space)."""
    note = b""
    if comment:
        text = comment.encode("ascii", "replace")[:64]
        note = _element(ERROR_COMMENT, text + b" " if len(text) % 2 else text)
    return _command((
        _element(AFFECTED_SOP_CLASS, _uid(sop_class)),
        _element(COMMAND_FIELD, _US.pack(C_STORE_RSP)),
        _element(MESSAGE_ID_RESPONDED, _US.pack(msg_id)),
        _element(DATASET_TYPE, _US.pack(NO_DATASET)),
        _element(STATUS, _US.pack(status)),
        note,
        _element(AFFECTED_SOP_INSTANCE, _uid(sop_instance)),
    ))  # fmt: skip


def parse_command(command: bytes) -> dict[int, bytes] | None:
    """The elements of a command set (Implicit VR Little Endian) by tag; None if malformed
    (an element running past the end, or bytes left over)."""
    fields: dict[int, bytes] = {}
    pos, end = 0, len(command)
    while pos + 8 <= end:
        group, element, length = _ELEMENT.unpack_from(command, pos)
        pos += 8
        if pos + length > end:
            return None
        fields[group << 16 | element] = command[pos : pos + length]
        pos += length
    return fields if pos == end else None


def command_us(fields: dict[int, bytes], tag: int) -> int | None:
    """An US element's value (None if absent or not 2 bytes)."""
    value = fields.get(tag)
    return _US.unpack(value)[0] if value is not None and len(value) == 2 else None


def command_ui(fields: dict[int, bytes], tag: int) -> str:
    """A UI element's value, its padding stripped ("" if absent); the bytes are kept as
    received (latin-1), so that a UID that is not one can be refused by name."""
    value = fields.get(tag)
    return value.decode("latin-1").rstrip("\x00 ") if value else ""


def c_store_rsp_status(command: bytes, msg_id: int) -> int | None:
    """The Status of a C-STORE-RSP command set answering ``msg_id``; None when it is
    something else (malformed, another command, another request's response)."""
    fields = parse_command(command)
    if fields is None or fields.get(COMMAND_FIELD) != b"\x01\x80":
        return None
    if command_us(fields, MESSAGE_ID_RESPONDED) != msg_id:
        return None
    return command_us(fields, STATUS)
