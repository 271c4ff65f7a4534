"""``connectors.dicom.net.pdu``: every encoder byte for byte against pynetdicom's own
(``pynetdicom.pdu``, ``pynetdicom.dimse_messages``), every parser against what pynetdicom
encodes, and a malformed input refused rather than misread."""

from __future__ import annotations

import io

import pytest
from pydicom.dataset import Dataset
from pynetdicom import dsutils
from pynetdicom.dimse_messages import C_STORE_RQ, C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu import A_ABORT_RQ, A_RELEASE_RP, A_RELEASE_RQ, P_DATA_TF
from pynetdicom.pdu_primitives import A_ABORT, A_P_ABORT, A_RELEASE, P_DATA

from connectors.dicom.net import pdu
from connectors.dicom.net.pdu import Status

CT = "1.2.840.10008.5.1.4.1.1.2"
REQUESTS = [(CT, "1.2.3.4", 5, pdu.LOW), ("1.2.3", "9" * 64, 65535, pdu.HIGH),
            ("1.2.840.10008.5.1.4.1.1.4", "1.2.3.45", 1, pdu.MEDIUM)]  # fmt: skip


def pynetdicom_pdata(pdvs: list[tuple[int, bytes]]) -> bytes:
    primitive = P_DATA()
    primitive.presentation_data_value_list = [[cx, data] for cx, data in pdvs]
    return P_DATA_TF(primitive).encode()


@pytest.mark.parametrize("size", [0, 1, 4, 16383, 16384 * 3])
@pytest.mark.parametrize("control", [0x00, 0x01, 0x02, 0x03])
def test_a_p_data_tf_with_one_pdv_is_pynetdicoms(size, control):
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    expected = pynetdicom_pdata([(7, bytes([control]) + data)])
    assert pdu.pdata_header(len(data), 7, control) + data == expected
    assert pdu.pdata([(7, control, data)]) == expected


def test_a_p_data_tf_with_several_pdvs_is_pynetdicoms_and_splits_back():
    pdvs = [(1, pdu.COMMAND | pdu.LAST, b"command!"), (3, 0x00, b"abc"), (3, pdu.LAST, b"")]
    expected = pynetdicom_pdata([(cx, bytes([control]) + data) for cx, control, data in pdvs])
    assert pdu.pdata(pdvs) == expected
    assert pdu.parse_pdu_header(expected[:6]) == (pdu.P_DATA_TF, len(expected) - 6)
    assert pdu.pdu_header(pdu.P_DATA_TF, len(expected) - 6) == expected[:6]
    split = pdu.split_pdvs(memoryview(expected)[6:])
    assert [(cx, control, bytes(data)) for cx, control, data in split] == pdvs
    assert all(isinstance(data, memoryview) for _, _, data in split)  # no copies
    decoded = P_DATA_TF()
    decoded.decode(expected)  # and pynetdicom reads what we split the same way
    items = decoded.presentation_data_value_items
    assert [(i.presentation_context_id, i.presentation_data_value[1:]) for i in items] == [
        (cx, data) for cx, _, data in pdvs
    ]


def test_a_pdv_header_round_trips():
    head = pdu.pdv_header(10, 5, pdu.COMMAND)
    assert head == b"\x00\x00\x00\x0c\x05\x01"
    assert pdu.parse_pdv_header(head) == (12, 5, pdu.COMMAND)


@pytest.mark.parametrize(
    "body",
    [b"\x00\x00\x00\x01\x01\x03", b"\x00\x00\x00\x09\x01\x03abc", b"\x00\x00\x00\x03\x01\x03ab"],
    ids=["item-shorter-than-its-header", "item-past-the-end", "bytes-left-over"],
)
def test_pdvs_that_do_not_tile_the_body_are_refused(body):
    assert pdu.split_pdvs(body) is None


def test_release_pdus_are_pynetdicoms():
    assert pdu.a_release_rq() == A_RELEASE_RQ(A_RELEASE()).encode()
    reply = A_RELEASE()
    reply.result = "affirmative"
    assert pdu.a_release_rp() == A_RELEASE_RP(reply).encode()


@pytest.mark.parametrize("source", [0, 1])
def test_an_a_abort_by_the_service_user_is_pynetdicoms(source):
    primitive = A_ABORT()
    primitive.abort_source = source
    assert pdu.a_abort(source) == A_ABORT_RQ(primitive).encode()
    assert pdu.a_abort(source, 5) == A_ABORT_RQ(primitive).encode()  # reason 0 for the user


@pytest.mark.parametrize("reason", [0, 1, 2, 4, 5, 6])
def test_an_a_abort_by_the_service_provider_is_pynetdicoms(reason):
    primitive = A_P_ABORT()
    primitive.provider_reason = reason
    assert pdu.a_abort(2, reason) == A_ABORT_RQ(primitive).encode()


@pytest.mark.parametrize(("sop_class", "sop_instance", "message_id", "priority"), REQUESTS)
def test_a_c_store_request_is_pynetdicoms(sop_class, sop_instance, message_id, priority):
    req = C_STORE()
    req.MessageID, req.Priority = message_id, priority
    req.AffectedSOPClassUID, req.AffectedSOPInstanceUID = sop_class, sop_instance
    req.DataSet = io.BytesIO(b"\x08\x00\x16\x00" + b"\x00" * 4)  # a dataset follows
    message = C_STORE_RQ()
    message.primitive_to_message(req)
    (command,) = next(message.encode_msg(1, 16384)).presentation_data_value_list
    assert command == (1, b"\x03" + pdu.c_store_rq(sop_class, sop_instance, message_id, priority))
    assert command[1][1:] == dsutils.encode(message.command_set, True, True)


@pytest.mark.parametrize(
    ("status", "comment"),
    [(Status.SUCCESS, None), (Status.OUT_OF_RESOURCES, "disk reserve reached"),
     (Status.NOT_MATCHING, "SOPClassUID differs from the request's"),  # odd: padded
     (Status.TOO_LARGE, "x" * 80), (Status.DUPLICATE, None)],
)  # fmt: skip
@pytest.mark.parametrize(("sop_class", "sop_instance", "message_id", "_"), REQUESTS)
def test_a_c_store_response_is_pynetdicoms(sop_class, sop_instance, message_id, _, status,
                                           comment):  # fmt: skip
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = message_id
    rsp.AffectedSOPClassUID, rsp.AffectedSOPInstanceUID = sop_class, sop_instance
    rsp.Status = status
    if comment is not None:
        rsp.ErrorComment = comment[:64]
    message = C_STORE_RSP()
    message.primitive_to_message(rsp)
    (command,) = next(message.encode_msg(3, 16384)).presentation_data_value_list
    ours = pdu.c_store_rsp(sop_class, sop_instance, message_id, status, comment)
    assert command == (3, b"\x03" + ours)
    assert pdu.c_store_rsp_status(ours, message_id) == status
    assert pdu.c_store_rsp_status(ours, message_id ^ 1) is None  # another request's


def test_a_command_set_parses_to_what_pydicom_wrote():
    ds = Dataset()
    ds.AffectedSOPClassUID, ds.AffectedSOPInstanceUID = CT, "1.2.3.4.5"  # odd: padded with NUL
    ds.CommandField, ds.MessageID, ds.Priority, ds.CommandDataSetType = 1, 77, 0, 1
    ds.CommandGroupLength = 0
    ds.CommandGroupLength = len(dsutils.encode(ds, True, True)) - 12
    fields = pdu.parse_command(dsutils.encode(ds, True, True))
    assert pdu.command_us(fields, pdu.COMMAND_FIELD) == pdu.C_STORE_RQ
    assert pdu.command_us(fields, pdu.MESSAGE_ID) == 77
    assert pdu.command_ui(fields, pdu.AFFECTED_SOP_CLASS) == CT
    assert pdu.command_ui(fields, pdu.AFFECTED_SOP_INSTANCE) == "1.2.3.4.5"
    assert pdu.command_us(fields, pdu.STATUS) is None and pdu.command_ui(fields, pdu.STATUS) == ""


def test_a_malformed_command_set_is_refused():
    command = pdu.c_store_rq(CT, "1.2.3", 1)
    assert pdu.parse_command(command[:-3]) is None  # cut off inside an element
    assert pdu.parse_command(command + b"\x00") is None  # bytes left over
    assert pdu.c_store_rsp_status(command, 1) is None  # a request, not a response
    assert pdu.c_store_rsp_status(b"", 1) is None


def test_statuses_are_the_standards():
    assert (Status.SUCCESS, Status.OUT_OF_RESOURCES, Status.TOO_LARGE) == (0, 0xA700, 0xA701)
    assert (Status.NOT_MATCHING, Status.CANNOT_UNDERSTAND) == (0xA900, 0xC000)
    assert (Status.DUPLICATE, Status.PROCESSING_FAILURE) == (0x0111, 0x0110)
