"""The DICOM receiver against real dcmtk clients (``echoscu``, ``storescu``, by absolute path,
``TCP_NODELAY=1``): what a Success promises, what gets refused and how, grouping into jobs,
restarts and kill -9 in the middle of a transfer, TLS."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pydicom
import pytest
from deadlines import HANG, wait_until
from dicom_peers import DCMTK_ENV, dcmtk, echoscu, storescu
from pydicom.filereader import _read_file_meta_info

from connectors.dicom.config import CalledAE, Peer, ReceiverConfig, TLSConfig
from connectors.dicom.receive.groups import GroupStore
from connectors.dicom.receive.receiver import Receiver
from operators.dicom.phantom import write_ct_series

pytestmark = [pytest.mark.integration, pytest.mark.dicom_wire]

AET = "DATAFLOW"
HOST = "127.0.0.1"
ROOT = Path(__file__).resolve().parents[2]


def ct(folder: Path, slices: int = 5, seed: int = 0, size: int = 64, **kw) -> list[Path]:
    write_ct_series(folder, slices=slices, size=size, seed=seed, **kw)
    return sorted(folder.glob("*.dcm"))


def config(tmp: Path, called: list[CalledAE] | None = None, **kw) -> ReceiverConfig:
    kw.setdefault("peers", [Peer("STORESCU"), Peer("ECHOSCU")])
    called = called or [CalledAE(AET, routes=["ct"], timeout=30)]
    return ReceiverConfig(spool=tmp / "spool", port=0, called_aes=called, **kw)


@contextlib.contextmanager
def receiving(cfg: ReceiverConfig):
    got: list = []
    receiver = Receiver(cfg, got.append).start()
    receiver.got = got
    try:
        yield receiver
    finally:
        receiver.stop()


def wait_for(condition, timeout: float = HANG):
    return wait_until(condition, "condition reached", timeout, poll=0.05)


def part10(path: Path) -> tuple[str, bytes]:
    """(transfer syntax, the encoded dataset after the file meta) of a Part-10 file."""
    with open(path, "rb") as fp:
        assert fp.read(132)[128:] == b"DICM"
        meta = _read_file_meta_info(fp)
        return str(meta.TransferSyntaxUID), fp.read()


def stored(receiver: Receiver) -> dict[str, Path]:
    """SOP Instance UID -> file, over every group."""
    return {sop: path for g in receiver.groups() for sop, path in receiver.store.instances(g.id)}


def sop_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def statuses(output: str) -> list[str]:
    return re.findall(r"Received Store Response \(([^)]*)\)", output)


# -- associations -----------------------------------------------------------------------------


def test_the_fast_path_is_on_or_off_as_this_run_says(tmp_path, dicom_fast_path):
    """Every test here runs with the fast path on and off (tests/integration/conftest.py)."""
    with receiving(config(tmp_path)) as rx:
        assert rx.stats()["fast_path"] == (dicom_fast_path == "on")
        assert storescu(HOST, rx.port, ct(tmp_path / "ct", 2), called=AET).returncode == 0
        assert len(stored(rx)) == 2


def test_echo_and_association_refusals(tmp_path):
    cfg = config(tmp_path, peers=[Peer("ECHOSCU"), Peer("FARAWAY", host="10.9.9.9")])
    with receiving(cfg) as rx:
        assert echoscu(HOST, rx.port, called=AET).returncode == 0
        other = echoscu(HOST, rx.port, called="NOT-OURS")
        assert other.returncode != 0 and "Called AE Title Not Recognized" in other.stderr
        stranger = echoscu(HOST, rx.port, calling="STRANGER", called=AET)
        assert "Calling AE Title Not Recognized" in stranger.stderr
        wrong_host = echoscu(HOST, rx.port, calling="FARAWAY", called=AET)
        assert "Calling AE Title Not Recognized" in wrong_host.stderr
        files = ct(tmp_path / "ct", 2)
        refused = storescu(HOST, rx.port, files, calling="STRANGER", called=AET)
        assert refused.returncode != 0 and rx.groups() == []


def test_unknown_peers_allowed_when_configured(tmp_path):
    with receiving(config(tmp_path, peers=[], allow_unknown_peers=True)) as rx:
        assert echoscu(HOST, rx.port, calling="ANYONE", called=AET).returncode == 0


# -- storing ----------------------------------------------------------------------------------


def test_many_files_stored_exactly_as_sent(tmp_path):
    files = ct(tmp_path / "ct", 40, seed=1)
    with receiving(config(tmp_path)) as rx:
        result = storescu(HOST, rx.port, files, called=AET, extra=["-v"])
        assert result.returncode == 0, result.stderr
        assert statuses(result.stdout + result.stderr) == ["Success"] * 40
        got = stored(rx)
        assert len(got) == 40
        for f in files:
            assert part10(got[sop_uid(f)]) == part10(f)
        (group,) = rx.groups("pending")
        assert group.instances == 40 and group.calling_ae == "STORESCU"
        assert group.peer_host == HOST and group.routes == ("ct",)
        assert sorted(p.resolve() for p in group.folder.rglob("*.dcm")) == sorted(
            p.resolve() for p in got.values()
        )
        assert not list((rx.spool / ".incoming").iterdir())


def test_several_associations_at_once(tmp_path):
    series = [ct(tmp_path / f"s{k}", 15, seed=10 + k) for k in range(4)]
    cfg = config(tmp_path, called=[CalledAE(AET, group_by="series", timeout=30)])
    with receiving(cfg) as rx:
        args = [dcmtk("storescu"), "-aet", "STORESCU", "-aec", AET, HOST, str(rx.port)]
        procs = [
            subprocess.Popen([*args, *map(str, files)], env=DCMTK_ENV, stderr=subprocess.DEVNULL)
            for files in series
        ]
        assert [p.wait(timeout=HANG) for p in procs] == [0, 0, 0, 0]
        assert sorted(g.instances for g in rx.groups("pending")) == [15, 15, 15, 15]
        assert len(stored(rx)) == 60


VARIANTS = [  # name, dcmtk tool, its options, what storescu then proposes
    ("rle", "dcmcrle", [], "-xr"),
    ("jpeg-lossless", "dcmcjpeg", ["+e1"], "-xs"),
    ("implicit", "dcmconv", ["+ti"], "-xi"),
    ("big-endian", "dcmconv", ["+tb"], "-xb"),
]


def _compressed(tmp: Path, files: list[Path]) -> dict[str, list[Path]]:
    out: dict[str, list[Path]] = {}
    for name, tool, options, _ in VARIANTS:
        folder = tmp / name
        folder.mkdir()
        for f in files:
            subprocess.run([dcmtk(tool), *options, str(f), str(folder / f.name)], check=True)
        out[name] = sorted(folder.glob("*.dcm"))
    return out


def test_transfer_syntaxes_kept_as_received(tmp_path):
    base = ct(tmp_path / "ct", 3, seed=2)
    variants = _compressed(tmp_path, base)
    with receiving(config(tmp_path, called=[CalledAE(AET, group_by="series")])) as rx:
        for (name, files), (*_, propose) in zip(variants.items(), VARIANTS):
            ts_sent = part10(files[0])[0]
            result = storescu(HOST, rx.port, files, called=AET, extra=[propose])
            assert result.returncode == 0, (name, result.stderr)
            got = stored(rx)
            for f in files:
                ts, data = part10(got[sop_uid(f)])
                assert (ts, data) == (ts_sent, part10(f)[1]), name
                sent, kept = pydicom.dcmread(f), pydicom.dcmread(got[sop_uid(f)])
                assert sent.PixelData == kept.PixelData
            # same SOP Instance UIDs each round: the copies overwrite (the default policy)
    assert {part10(f)[0] for fs in variants.values() for f in fs[:1]} == {
        "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2",
        "1.2.840.10008.1.2.2",
    }  # fmt: skip


def _altered(good: Path, path: Path, sop: str, **values) -> Path:
    """A copy of ``good`` with another SOP Instance UID and ``values`` (None: deleted)."""
    with pydicom.config.disable_value_validation():
        ds = pydicom.dcmread(good)
        for tag, value in values.items():
            if value is None:
                delattr(ds, tag)
            else:
                setattr(ds, tag, value)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop
        ds.save_as(path)
    return path


def _bad_files(tmp: Path, good: Path) -> list[Path]:
    """Files with no Study UID and a hostile Series UID."""
    return [
        _altered(good, tmp / "no-study.dcm", "1.2.9.1", StudyInstanceUID=None),
        _altered(good, tmp / "hostile.dcm", "1.2.9.2", SeriesInstanceUID="../../../../etc/x"),
    ]


def test_bad_input_refused_and_the_association_goes_on(tmp_path):
    good = ct(tmp_path / "ct", 3, seed=3)
    bad = _bad_files(tmp_path, good[0])
    big = ct(tmp_path / "big", 1, seed=4, size=256)
    files = [good[0], *bad, good[1], *big, good[2]]
    before = set(tmp_path.parent.iterdir())
    with receiving(config(tmp_path, max_instance_size=100_000)) as rx:
        result = storescu(HOST, rx.port, files, called=AET, extra=["-v", "--no-halt"])
        output = result.stdout + result.stderr
        got = statuses(output)
        assert got[0] == got[3] == got[5] == "Success" and got.count("Success") == 3, got
        assert "DataSetDoesNotMatchSOPClass" in got[1] and "OutOfResources" in got[4], got
        assert echoscu(HOST, rx.port, called=AET).returncode == 0  # the service goes on
        assert sorted(stored(rx)) == sorted(sop_uid(f) for f in good)
        files = [p for p in rx.spool.rglob("*") if p.suffix in (".dcm", ".part")]
        assert len(files) == 3
    assert set(tmp_path.parent.iterdir()) == before  # nothing written beside the test folder


def test_hostile_called_ae_title_stays_in_the_spool(tmp_path):
    called = [CalledAE("../../etc", timeout=30)]
    with receiving(config(tmp_path, called=called)) as rx:
        result = storescu(HOST, rx.port, ct(tmp_path / "ct", 2), called="../../etc")
        assert result.returncode == 0, result.stderr
        (group,) = rx.groups()
        assert group.called_ae == "../../etc"
        assert group.folder.resolve().is_relative_to(rx.spool.resolve())
        assert group.folder.parent.name.startswith("x")


@pytest.mark.parametrize(("policy", "ok"), [("overwrite", 2), ("keep-first", 2), ("reject", 1)])
def test_duplicates_follow_the_policy(tmp_path, policy, ok):
    (first,) = ct(tmp_path / "ct", 1, seed=5)
    ds = pydicom.dcmread(first)
    ds.ImageComments = "second copy"
    second = tmp_path / "second.dcm"
    ds.save_as(second)
    with receiving(config(tmp_path, duplicates=policy)) as rx:
        result = storescu(HOST, rx.port, [first, second], called=AET, extra=["-v", "-nh"])
        got = statuses(result.stdout + result.stderr)
        assert got.count("Success") == ok, got
        (path,) = stored(rx).values()
        comment = pydicom.dcmread(path).get("ImageComments")
        assert comment == ("second copy" if policy == "overwrite" else None)
        assert rx.groups()[0].instances == 1


def test_disk_reserve_refuses_with_out_of_resources(tmp_path):
    free = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize
    with receiving(config(tmp_path, min_free_bytes=free + 2**30)) as rx:
        result = storescu(HOST, rx.port, ct(tmp_path / "ct", 3), called=AET, extra=["-v", "-nh"])
        output = result.stdout + result.stderr
        assert statuses(output) == ["Refused: OutOfResources"] * 3, output
        assert [p for p in rx.spool.rglob("*") if p.is_file() and "sqlite" not in p.name] == []
    with receiving(config(tmp_path, min_free_percent=99.99)) as rx:
        result = storescu(HOST, rx.port, ct(tmp_path / "ct2", 1), called=AET, extra=["-v"])
        assert "Success" not in statuses(result.stdout + result.stderr)


# -- grouping ---------------------------------------------------------------------------------


class CompletionWatch:
    """Watches the receiver's completion loop through the real ``GroupStore.complete_due``
    (wrapped, not replaced): when each group was completed for its quiet time, and how many
    rounds the loop has made — so that "nothing more happened" is asserted after rounds of
    the loop, not after a sleep."""

    def __init__(self, monkeypatch) -> None:
        self.rounds = 0
        self.completed: dict[int, float] = {}  # group id -> the "now" it was completed at
        self._changed = threading.Condition()
        real = GroupStore.complete_due

        def complete_due(store, now, not_before):
            ids = real(store, now, not_before)
            with self._changed:
                self.rounds += 1
                self.completed.update(dict.fromkeys(ids, now))
                self._changed.notify_all()
            return ids

        monkeypatch.setattr(GroupStore, "complete_due", complete_due)

    def wait_rounds(self, count: int = 2) -> None:
        """Until ``count`` more rounds have begun: the round before them has handed over."""
        with self._changed:
            target = self.rounds + count
            assert self._changed.wait_for(lambda: self.rounds >= target, HANG), "loop hung"


def test_group_completes_after_the_quiet_timeout(tmp_path, monkeypatch):
    watch = CompletionWatch(monkeypatch)
    files = ct(tmp_path / "ct", 4, seed=6)
    with receiving(config(tmp_path, called=[CalledAE(AET, routes=["a", "b"], timeout=1)])) as rx:
        assert storescu(HOST, rx.port, files, called=AET).returncode == 0
        (group,) = wait_for(lambda: rx.got)
        assert watch.completed[group.id] - group.last_arrival >= 1  # not before the quiet time
        assert group.instances == 4 and group.routes == ("a", "b") and group.state == "complete"
        assert group.first_arrival <= group.last_arrival
        assert rx.mark_dispatched(group.id)
        watch.wait_rounds()
        assert len(rx.got) == 1 and rx.groups("dispatched")[0].id == group.id


def test_group_completes_on_release(tmp_path):
    called = [CalledAE(AET, timeout=300, complete_on_release=True)]
    with receiving(config(tmp_path, called=called)) as rx:
        assert storescu(HOST, rx.port, ct(tmp_path / "ct", 3), called=AET).returncode == 0
        (group,) = wait_for(lambda: rx.got)  # long before the 300 s quiet time
        assert group.instances == 3


@pytest.mark.parametrize(("late", "expect"), [("new-job", 1), ("rerun", 4), ("ignore", None)])
def test_late_arrivals(tmp_path, monkeypatch, late, expect):
    watch = CompletionWatch(monkeypatch)
    files = ct(tmp_path / "ct", 4, seed=7)
    called = [CalledAE(AET, timeout=300, complete_on_release=True, late=late)]
    with receiving(config(tmp_path, called=called)) as rx:
        assert storescu(HOST, rx.port, files[:3], called=AET).returncode == 0
        (first,) = wait_for(lambda: rx.got)
        assert storescu(HOST, rx.port, files[3:], called=AET).returncode == 0
        if expect is None:
            watch.wait_rounds()
            assert len(rx.got) == 1 and rx.groups("ignored")[0].instances == 1
        else:
            second = wait_for(lambda: rx.got[1:])[0]
            assert second.late_of == first.id and second.instances == expect
            assert len(list(second.folder.rglob("*.dcm"))) == expect


def test_restart_completes_pending_groups(tmp_path, monkeypatch):
    watch = CompletionWatch(monkeypatch)
    files = ct(tmp_path / "ct", 5, seed=8)
    cfg = config(tmp_path, called=[CalledAE(AET, timeout=1.5)])
    with receiving(cfg) as rx:
        assert storescu(HOST, rx.port, files, called=AET).returncode == 0
    restarted = time.time()
    with receiving(cfg) as rx:
        assert rx.groups("pending")[0].instances == 5
        (group,) = wait_for(lambda: rx.got)
        assert watch.completed[group.id] - restarted >= 1.5  # the quiet timer restarted
    with receiving(cfg) as rx:  # complete but never dispatched: handed over again
        (again,) = wait_for(lambda: rx.got)
        assert again.id == group.id
        rx.mark_dispatched(group.id)
    with receiving(cfg) as rx:
        watch.wait_rounds()
        assert rx.got == []


@contextlib.contextmanager
def receiver_process(cfg: ReceiverConfig, log: Path | None = None):
    """``python -m connectors.dicom.receive.receiver`` (no pytest warning filters in there; the
    environment is this test's: DATAFLOW_DICOM_FASTNET too), its log in ``log`` if given:
    yields (process, port)."""
    cmd = [
        sys.executable,
        "-m",
        "connectors.dicom.receive.receiver",
        "--config",
        json.dumps(cfg.to_dict()),
    ]
    with contextlib.ExitStack() as stack:
        err = stack.enter_context(open(log, "w")) if log is not None else subprocess.DEVNULL
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        yield proc, int(proc.stdout.readline().split()[1])  # "listening PORT" (logs: stderr)
    finally:
        if proc.poll() is None:
            proc.terminate()
        proc.wait(timeout=HANG)
        proc.stdout.close()


def test_hostile_sop_instance_uid_in_the_request(tmp_path):
    good = ct(tmp_path / "ct", 2, seed=12)
    hostile = _altered(good[0], tmp_path / "hostile-sop.dcm", "1.2.3/../../../../evil")
    before = set(tmp_path.parent.iterdir())
    cfg = config(tmp_path)
    with receiver_process(cfg) as (_, port):
        result = storescu(HOST, port, [good[0], hostile], called=AET, extra=["-v", "-nh"])
        got = statuses(result.stdout + result.stderr)
        assert got[0] == "Success" and "Success" not in got[1:], result.stdout
        assert storescu(HOST, port, good[1:], called=AET).returncode == 0  # the service goes on
    with receiving(cfg) as rx:
        assert sorted(stored(rx)) == sorted(sop_uid(f) for f in good)
        assert len([p for p in rx.spool.rglob("*") if p.suffix in (".dcm", ".part")]) == 2
    assert set(tmp_path.parent.iterdir()) == before


# -- kill -9 ----------------------------------------------------------------------------------


def test_kill_9_during_a_transfer_loses_no_acknowledged_instance(tmp_path):
    files = ct(tmp_path / "ct", 200, seed=9)
    cfg = config(tmp_path, called=[CalledAE(AET, timeout=1)])
    with receiver_process(cfg) as (proc, port):
        args = [dcmtk("storescu"), "-v", "-aet", "STORESCU", "-aec", AET, HOST, str(port)]
        scu = subprocess.Popen([*args, *map(str, files)], env=DCMTK_ENV, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
        acked, current = [], None
        for line in scu.stdout:
            if line.startswith("I: Sending file: "):
                current = Path(line.split(": ", 2)[2].strip())
            elif "Received Store Response (Success)" in line:
                acked.append(current)
                if len(acked) == 60:
                    proc.send_signal(signal.SIGKILL)
        scu.wait(timeout=HANG)
        scu.stdout.close()
        assert proc.wait(timeout=HANG) == -signal.SIGKILL
    assert 60 <= len(acked) < 200, "the receiver died in the middle"
    with receiving(cfg) as rx:
        (group,) = wait_for(lambda: rx.got)
        got = stored(rx)
        for f in acked:
            assert part10(got[sop_uid(f)]) == part10(f)
        assert group.instances == len(got) >= len(acked)
        assert len(list(group.folder.rglob("*.dcm"))) == group.instances
        assert not list((rx.spool / ".incoming").iterdir())


# -- TLS --------------------------------------------------------------------------------------


def _certificate(folder: Path, name: str) -> tuple[Path, Path]:
    key, cert = folder / f"{name}.key", folder / f"{name}.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-subj", f"/CN={name}", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return key, cert


def test_tls(tmp_path):
    server_key, server_cert = _certificate(tmp_path, "server")
    client_key, client_cert = _certificate(tmp_path, "client")
    files = ct(tmp_path / "ct", 3, seed=11)
    trust = ["+cf", str(server_cert)]
    tls = TLSConfig(cert=server_cert, key=server_key)
    with receiving(config(tmp_path, tls=tls)) as rx:
        result = storescu(HOST, rx.port, files, called=AET, extra=["+tla", *trust])
        assert result.returncode == 0, result.stderr
        assert len(stored(rx)) == 3
        plain = storescu(HOST, rx.port, files, called=AET)
        assert plain.returncode != 0
    tls = TLSConfig(cert=server_cert, key=server_key, ca=client_cert)
    with receiving(config(tmp_path / "b", tls=tls)) as rx:
        anonymous = storescu(HOST, rx.port, files, called=AET, extra=["+tla", *trust])
        assert anonymous.returncode != 0 and rx.groups() == []
        ok = storescu(HOST, rx.port, files, called=AET,
                      extra=["+tls", str(client_key), str(client_cert), *trust])  # fmt: skip
        assert ok.returncode == 0, ok.stderr
        assert len(stored(rx)) == 3


# -- several processes -----------------------------------------------------------------------


def _storescu_at_once(port: int, shares: list[list[Path]]) -> list[int]:
    args = [dcmtk("storescu"), "-aet", "STORESCU", "-aec", AET, HOST, str(port)]
    procs = [
        subprocess.Popen([*args, *map(str, files)], env=DCMTK_ENV, stderr=subprocess.DEVNULL)
        for files in shares
    ]
    return [p.wait(timeout=HANG) for p in procs]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_processes_share_the_port_and_a_dead_worker_is_restarted(tmp_path):
    files = ct(tmp_path / "ct", 24, seed=40)
    cfg = config(tmp_path, called=[CalledAE(AET, timeout=30)], processes=3)
    with receiving(cfg) as rx:
        workers = rx.worker_pids
        assert len(workers) == 2 and all(_alive(pid) for pid in workers)
        assert _storescu_at_once(rx.port, [files[k::6] for k in range(6)]) == [0] * 6
        assert len(stored(rx)) == 24
        (group,) = rx.groups("pending")  # one study, whichever process received it
        assert group.instances == 24
        os.kill(workers[0], signal.SIGKILL)
        wait_for(lambda: len(rx.worker_pids) == 2 and workers[0] not in rx.worker_pids)
        more = ct(tmp_path / "more", 4, seed=41)
        assert _storescu_at_once(rx.port, [more[:2], more[2:]]) == [0, 0]
        assert len(stored(rx)) == 28
        now = rx.worker_pids
    wait_for(lambda: not any(_alive(pid) for pid in now))


def test_workers_stop_when_the_main_receiver_is_killed(tmp_path):
    cfg = config(tmp_path, processes=2)
    with receiver_process(cfg) as (proc, port):
        assert echoscu(HOST, port, called=AET).returncode == 0
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        (worker,) = map(int, children)
        assert _alive(worker)
        proc.kill()
        proc.wait(timeout=HANG)
        wait_for(lambda: not _alive(worker))


def test_threads_left_behind_are_ours_only():
    names = [t.name for t in threading.enumerate()]
    assert not [n for n in names if n.startswith(("dicom-", "AcceptorThread"))]


SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


def secondary_capture(source: Path, target: Path) -> Path:
    """A copy of ``source`` as a Secondary Capture instance (what a modality sends along)."""
    from pydicom.uid import generate_uid

    ds = pydicom.dcmread(source)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SECONDARY_CAPTURE
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(target, enforce_file_format=True)
    return target


def test_ignored_sop_classes_are_acknowledged_and_dropped(tmp_path):
    files = ct(tmp_path / "ct", 2, seed=41)
    sc = secondary_capture(files[0], tmp_path / "sc.dcm")
    called = [CalledAE(AET, routes=["ct"], timeout=30, complete_on_release=True,
                       ignored_sop_classes=[SECONDARY_CAPTURE])]  # fmt: skip
    with receiving(config(tmp_path, called=called)) as rx:
        result = storescu(HOST, rx.port, [files[0], sc, files[1]], called=AET, extra=["-v"])
        assert statuses(result.stdout + result.stderr) == ["Success"] * 3
        assert sorted(stored(rx)) == sorted(sop_uid(f) for f in files)
        (group,) = wait_for(lambda: rx.got)  # completed on release, the SC not in it
        assert group.instances == 2
        assert not list(rx.spool.rglob("*.part"))
