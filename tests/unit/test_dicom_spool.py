"""The receiver's spool without a network: sanitised path components, the header parse, and
the durable groups (grouping, duplicates, late arrivals, completion, restart)."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
from deadlines import HANG
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset

from connectors.dicom.config import CalledAE, ReceiverConfig, ReceiverConfigError
from connectors.dicom.receive.groups import GroupStore, Placement
from connectors.dicom.receive.spool import (
    BadInstance,
    Header,
    ae_component,
    parse_header,
    uid_component,
    valid_uid,
    write_temp,
)

HOSTILE = ["../../etc", "..", ".", "/abs/path", "a\x00b", "1.2\x00/../x", "9" * 200, "", "1/2"]


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_values_become_hashes(value):
    for component in (uid_component(value), ae_component(value)):
        assert component.startswith("x") and len(component) == 25
        assert component.isalnum()


def test_safe_values_are_kept():
    assert uid_component("1.2.840.10008.5.1.4.1.1.2") == "1.2.840.10008.5.1.4.1.1.2"
    assert ae_component(" DATAFLOW ") == "DATAFLOW"
    assert ae_component("CT-1_A") == "CT-1_A"
    assert ae_component("AE WITH SPACE").startswith("x")
    assert uid_component("1.2.3") != uid_component("1.2.4")


def test_valid_uid():
    assert valid_uid("1.2.3") and valid_uid("1.02.3")  # leading zeros tolerated
    for bad in ("", "...", "1.2.a", "1" * 65, "../1", "1.2 "):
        assert not valid_uid(bad)


def _encoded(**values) -> io.BytesIO:
    ds = Dataset()
    for name, value in values.items():
        setattr(ds, name, value)
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, ds)
    return io.BytesIO(buffer.getvalue())


EXPLICIT = "1.2.840.10008.1.2.1"
UIDS = dict(
    SOPClassUID="1.2.840.10008.5.1.4.1.1.2",
    SOPInstanceUID="1.2.3.4",
    StudyInstanceUID="1.2.3",
    SeriesInstanceUID="1.2.3.5",
)


def test_parse_header_reads_the_uids():
    header = parse_header(_encoded(**UIDS, PatientName="Doe^John", Rows=4), EXPLICIT)
    assert header == Header("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4", "1.2.3", "1.2.3.5")


@pytest.mark.parametrize("missing", sorted(UIDS))
def test_parse_header_refuses_missing_uids(missing):
    values = {k: v for k, v in UIDS.items() if k != missing}
    with pytest.raises(BadInstance) as err:
        parse_header(_encoded(**values), EXPLICIT)
    assert err.value.status == 0xA900 and missing in str(err.value)


@pytest.mark.parametrize("padding", [0, 300_000])  # compressed beyond one 64 KiB read
def test_parse_header_of_a_deflated_dataset_at_an_offset(padding):
    import zlib

    # the UIDs come first; random bytes after them do not compress: many reads of the file
    raw = _encoded(
        **UIDS, EncapsulatedDocument=os.urandom(padding) + b"\0" * (padding % 2)
    ).getvalue()
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    deflated = packer.compress(raw) + packer.flush()
    fp = io.BytesIO(b"x" * 132 + deflated)
    header = parse_header(fp, "1.2.840.10008.1.2.1.99", offset=132)
    assert header == Header(*UIDS.values()) and fp.tell() == 0


def test_parse_header_refuses_garbage():
    with pytest.raises(BadInstance) as err:
        parse_header(io.BytesIO(b"\x08\x00\x16\x00UI\xff\xff" + b"\x01" * 10), EXPLICIT)
    assert err.value.status in (0xC000, 0xA900)


def test_config_checks():
    with pytest.raises(ReceiverConfigError):
        ReceiverConfig(spool=Path("x"), called_aes=[]).validate()
    with pytest.raises(ReceiverConfigError):
        ReceiverConfig(spool=Path("x"), called_aes=[CalledAE("A" * 17)]).validate()
    with pytest.raises(ReceiverConfigError):
        ReceiverConfig(spool=Path("x"), called_aes=[CalledAE("A", late="later")]).validate()
    config = ReceiverConfig(spool=Path("x"), called_aes=[CalledAE(" A ", routes=["p"])])
    again = ReceiverConfig.from_dict(config.validate().to_dict())
    assert again.called("A").routes == ["p"] and again.called_aes[0].ae_title == "A"


# -- groups -----------------------------------------------------------------------------------


class Spool:
    def __init__(self, root: Path, duplicates="overwrite", **called) -> None:
        self.root = root
        self.store = GroupStore(root, duplicates)
        self.called = CalledAE("AE", routes=["p"], timeout=1, **called)
        (root / ".incoming").mkdir(exist_ok=True)

    def put(self, sop="1.1", study="1.2", series="1.3", data=b"x") -> Placement:
        temp = write_temp(self.root / ".incoming", [data])
        header = Header("1.2.840.10008.5.1.4.1.1.2", sop, study, series)
        item = Placement(header, temp, len(data), self.called, "SCU", "127.0.0.1")
        self.store.place([item])
        return item


def test_instances_land_in_one_group_folder(tmp_path):
    spool = Spool(tmp_path)
    items = [spool.put(sop=f"1.1.{k}") for k in range(3)]
    assert {i.status for i in items} == {0} and len({i.group_id for i in items}) == 1
    (group,) = spool.store.groups("pending")
    assert group.instances == 3 and group.routes == ("p",) and group.kind == "study"
    files = sorted(p.name for p in group.folder.rglob("*.dcm"))
    assert files == ["1.1.0.dcm", "1.1.1.dcm", "1.1.2.dcm"]
    assert group.folder.is_relative_to(tmp_path) and not list((tmp_path / ".incoming").iterdir())


def test_group_by_series(tmp_path):
    spool = Spool(tmp_path, group_by="series")
    spool.put(sop="1.1.1", series="1.3.1")
    spool.put(sop="1.1.2", series="1.3.2")
    assert sorted(g.uid for g in spool.store.groups("pending")) == ["1.3.1", "1.3.2"]


@pytest.mark.parametrize(
    ("policy", "status", "content"),
    [("overwrite", 0, b"second"), ("keep-first", 0, b"first"), ("reject", 0x0111, b"first")],
)
def test_duplicates(tmp_path, policy, status, content):
    spool = Spool(tmp_path, duplicates=policy)
    spool.put(data=b"first")
    assert spool.put(data=b"second").status == status
    (group,) = spool.store.groups("pending")
    ((_, path),) = spool.store.instances(group.id)
    assert group.instances == 1 and path.read_bytes() == content
    assert len(list(group.folder.rglob("*.dcm"))) == 1


def _only_copy(store: GroupStore, group_id: int) -> bytes:
    """The bytes of the group's one instance, checked to be its one file on disk."""
    ((_, path),) = store.instances(group_id)
    (group,) = [g for g in store.groups() if g.id == group_id]
    assert list(group.folder.rglob("*.dcm")) == [path] and group.instances == 1
    return path.read_bytes()


def test_a_failed_commit_keeps_the_acknowledged_copy(tmp_path, monkeypatch):
    spool = Spool(tmp_path)
    first = spool.put(data=b"acknowledged")

    def broken_fsync(directory):
        raise OSError(5, "directory fsync failed (injected)")

    monkeypatch.setattr("connectors.dicom.receive.groups.fsync_dir", broken_fsync)
    with pytest.raises(OSError, match="injected"):
        spool.put(data=b"never acknowledged")
    assert _only_copy(spool.store, first.group_id) == b"acknowledged"
    monkeypatch.undo()
    spool.store.close()
    store = GroupStore(tmp_path)  # the restart's sweep keeps the acknowledged copy
    store.sweep_pending()
    assert _only_copy(store, first.group_id) == b"acknowledged"


KILLED_IN_PLACE = """
import os, signal, sys
from pathlib import Path
sys.path[:0] = [{tests!r}, {shared!r}]  # shared: tests/ (deadlines)
from test_dicom_spool import Spool
import connectors.dicom.receive.groups as groups
spool = Spool(Path({root!r}))
spool.put(data=b"acknowledged")
groups.fsync_dir = lambda directory: os.kill(os.getpid(), signal.SIGKILL)
spool.put(data=b"never acknowledged")  # killed after the file is placed, before the commit
"""


def test_kill_9_between_placement_and_commit_keeps_the_acknowledged_copy(tmp_path):
    here = Path(__file__).parent
    script = KILLED_IN_PLACE.format(tests=str(here), shared=str(here.parent), root=str(tmp_path))
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=root,
                          capture_output=True, text=True, timeout=HANG)  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    store = GroupStore(tmp_path)
    (group,) = store.groups("pending")
    store.sweep_pending()  # what the receiver does at start
    assert _only_copy(store, group.id) == b"acknowledged"


def test_the_same_sop_instance_in_another_series_leaves_one_file(tmp_path):
    spool = Spool(tmp_path)
    spool.put(sop="1.1.7", series="1.3.1", data=b"old")
    spool.put(sop="1.1.8", series="1.3.1", data=b"other")
    newer = spool.put(sop="1.1.7", series="1.3.2", data=b"new")
    assert newer.status == 0 and newer.note == "duplicate overwritten"
    (group,) = spool.store.groups("pending")
    got = {sop: p.read_bytes() for sop, p in spool.store.instances(group.id)}
    assert got == {"1.1.7": b"new", "1.1.8": b"other"} and group.instances == 2
    assert sorted(p.read_bytes() for p in group.folder.rglob("*.dcm")) == [b"new", b"other"]


def test_overwriting_again_and_again_leaves_the_last_copy_only(tmp_path):
    spool = Spool(tmp_path)
    for k in range(4):
        spool.put(data=f"copy {k}".encode())
    (group,) = spool.store.groups("pending")
    assert _only_copy(spool.store, group.id) == b"copy 3"


def test_quiet_timeout_and_restart_timer(tmp_path):
    spool = Spool(tmp_path)
    spool.put()
    (group,) = spool.store.groups("pending")
    assert spool.store.complete_due(group.last_arrival + 0.5, 0) == []
    # after a restart the quiet time counts from the start again
    assert spool.store.complete_due(group.last_arrival + 5, group.last_arrival + 4.5) == []
    assert spool.store.complete_due(group.last_arrival + 5, 0) == [group.id]


def test_the_completion_loop_is_told_when_the_first_group_falls_due(tmp_path):
    spool = Spool(tmp_path)
    assert spool.store.next_due(0) is None  # nothing pending: it waits its interval
    spool.put()
    (group,) = spool.store.groups("pending")
    timeout = spool.called.timeout
    assert spool.store.next_due(0) == group.last_arrival + timeout  # complete_due's rule
    assert spool.store.next_due(group.last_arrival + 7) == group.last_arrival + 7 + timeout
    assert spool.store.complete_due(group.last_arrival + timeout, 0) == [group.id]
    assert spool.store.next_due(0) is None
    assert spool.store.groups("complete")[0].id == group.id
    assert spool.store.mark_dispatched(group.id) and not spool.store.mark_dispatched(group.id)
    assert [g.id for g in spool.store.groups("dispatched")] == [group.id]


def _complete_first(spool: Spool) -> int:
    (group,) = spool.store.groups("pending")
    assert spool.store.complete([group.id]) == [group.id]
    return group.id


def test_late_new_job(tmp_path):
    spool = Spool(tmp_path, late="new-job")
    spool.put(sop="1.1.1")
    first = _complete_first(spool)
    late = spool.put(sop="1.1.2")
    (group,) = spool.store.groups("pending")
    assert group.id == late.group_id != first and group.late_of == first
    assert group.instances == 1 and [p.name for p in group.folder.rglob("*.dcm")] == ["1.1.2.dcm"]


def test_late_ignore(tmp_path):
    spool = Spool(tmp_path, late="ignore")
    spool.put(sop="1.1.1")
    first = _complete_first(spool)
    assert spool.put(sop="1.1.2").status == 0 and spool.put(sop="1.1.3").status == 0
    (ignored,) = spool.store.groups("ignored")
    assert ignored.late_of == first and ignored.instances == 2
    assert spool.store.groups("pending") == []
    assert spool.store.complete_due(ignored.last_arrival + 100, 0) == []


def test_late_rerun_holds_the_whole_group(tmp_path):
    spool = Spool(tmp_path, late="rerun")
    spool.put(sop="1.1.1", data=b"a")
    spool.put(sop="1.1.2", data=b"b")
    first = _complete_first(spool)
    spool.put(sop="1.1.3", data=b"c")
    (group,) = spool.store.groups("pending")
    assert group.late_of == first and group.instances == 3
    contents = sorted(p.read_bytes() for _, p in spool.store.instances(group.id))
    assert contents == [b"a", b"b", b"c"]
    old = spool.store.groups("complete")[0]
    assert old.instances == 2 and len(list(old.folder.rglob("*.dcm"))) == 2


def test_sweep_removes_unrecorded_files_only(tmp_path):
    spool = Spool(tmp_path)
    spool.put(sop="1.1.1")
    (group,) = spool.store.groups("pending")
    stray = next(group.folder.iterdir()) / "1.1.9.dcm"  # moved in, never committed
    stray.write_bytes(b"x")
    spool.store.close()
    store = GroupStore(tmp_path)
    assert store.sweep_pending() == 1 and not stray.exists()
    assert [p.name for _, p in store.instances(group.id)] == ["1.1.1.dcm"]
    assert os.path.exists(store.instances(group.id)[0][1])


@pytest.mark.parametrize(
    ("sop_class", "sop_instance", "syntax"),
    [
        ("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4", "1.2.840.10008.1.2.1"),
        ("1.2.3", "1.2.3.45", "1.2.840.10008.1.2"),
        ("1.2.840.10008.5.1.4.1.1.4", "9" * 64, "1.2.840.10008.1.2.4.70"),
    ],
)
def test_file_meta_bytes_are_those_pydicom_writes(sop_class, sop_instance, syntax):
    from pydicom.dataset import FileMetaDataset
    from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION

    from connectors.dicom.receive.spool import encode_file_meta, file_meta_bytes

    meta = FileMetaDataset()
    meta.FileMetaInformationGroupLength = 0
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = syntax
    meta.ImplementationClassUID = PYNETDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = PYNETDICOM_IMPLEMENTATION_VERSION
    expected = encode_file_meta(meta)
    assert file_meta_bytes(sop_class, sop_instance, syntax, PYNETDICOM_IMPLEMENTATION_UID,
                           PYNETDICOM_IMPLEMENTATION_VERSION) == expected  # fmt: skip
    assert file_meta_bytes(sop_class, sop_instance, syntax, "1.2.3", "ODD") != expected


def test_reclaim_removes_a_dispatched_group_and_a_late_instance_stays_late(tmp_path):
    spool = Spool(tmp_path, late="new-job")
    spool.put(sop="1.1.1")
    first = _complete_first(spool)
    folder = spool.store.groups("complete")[0].folder
    assert not spool.store.reclaim(first)  # complete, not dispatched: still to be handed over
    assert spool.store.mark_dispatched(first)
    assert spool.store.reclaim(first) and not spool.store.reclaim(first)
    assert not folder.exists() and folder.parent.is_dir()  # only the group's own folder
    assert spool.store.instances(first) == []
    assert [g.id for g in spool.store.groups("reclaimed")] == [first]
    spool.put(sop="1.1.2")  # the same study again, after its group was reclaimed
    (late,) = spool.store.groups("pending")
    assert late.late_of == first


def test_a_reclaimed_groups_folder_left_by_a_crash_is_swept(tmp_path):
    spool = Spool(tmp_path)
    spool.put()
    group = _complete_first(spool)
    spool.store.mark_dispatched(group)
    folder = spool.store.groups("dispatched")[0].folder
    kept = tmp_path / "kept"
    folder.rename(kept)  # as if the process died between the commit and the deletion
    assert spool.store.reclaim(group)
    kept.rename(folder)
    spool.store.sweep_pending()
    assert not folder.exists()


def _pydicom_uids(data: bytes, implicit: bool) -> list[str]:
    from pydicom.filereader import read_dataset

    from connectors.dicom.receive.spool import _TAG_SERIES, _WANTED, _text

    ds = read_dataset(io.BytesIO(data), implicit, True, stop_when=lambda t, v, n: t > _TAG_SERIES)
    return [_text(ds.get_item(tag)) for tag in _WANTED]


@pytest.mark.parametrize("implicit", [False, True])
@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"PatientName": "Doe^John", "Rows": 4, "ImageComments": "x" * 301},  # after the UIDs
        {"ImageType": ["ORIGINAL", "PRIMARY"], "SpecificCharacterSet": "ISO_IR 100"},  # before
        {"StudyInstanceUID": "1.2.3 ", "SeriesInstanceUID": "1.2.3.5\0"},  # padding cleaned
        {"SOPInstanceUID": "1.2.x.4"},  # not a UID: both see it, the check refuses it
    ],
)
def test_the_quick_header_walk_reads_what_pydicom_reads(implicit, extra):
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    from connectors.dicom.receive.spool import quick_uids

    ds = Dataset()
    with warnings.catch_warnings():  # pydicom warns about the padded and the bad UID
        warnings.simplefilter("ignore")
        for name, value in {**UIDS, **extra}.items():
            setattr(ds, name, value)
    item = Dataset()
    item.CodeValue = "121"
    ds.ReferencedPatientSequence = Sequence([item])  # (0008,1120): a defined-length sequence
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, implicit
    write_dataset(buffer, ds)
    data = buffer.getvalue()
    quick = quick_uids(data, implicit, complete=True)
    assert quick is not None and quick == _pydicom_uids(data, implicit)
    syntax = "1.2.840.10008.1.2" if implicit else EXPLICIT
    if "x" in quick[1]:
        with pytest.raises(BadInstance, match="SOPInstanceUID is not a valid UID"):
            parse_header(io.BytesIO(data), syntax)
    else:
        assert parse_header(io.BytesIO(data), syntax) == Header(*quick)


def test_the_quick_header_walk_leaves_what_it_cannot_read_to_pydicom():
    from connectors.dicom.receive.spool import quick_uids

    data = _encoded(**UIDS).getvalue()
    assert quick_uids(data[:20], False) is None  # cut off
    undefined = b"\x08\x00\x05\x11SQ\x00\x00\xff\xff\xff\xff"  # (0008,1105) of undefined length
    assert quick_uids(undefined + data, False) is None
    assert quick_uids(b"\x08\x00\x05\x00\x01\x02" + data, False) is None  # no VR there
    ended = data + b"\x28\x00\x10\x00US\x02\x00\x04\x00"  # past (0020,000E): done
    assert quick_uids(ended, False) == [*UIDS.values()]
    assert quick_uids(data, False, complete=True) == [*UIDS.values()]
    assert quick_uids(data, False) is None  # it may go on past what was read: pydicom decides
