"""The real peers the DICOM tests rely on (tests/dicom_peers.py) work as the tests assume:
dcmtk's storescu delivers to storescp and to Orthanc, and Orthanc sends on request."""

from __future__ import annotations

import pydicom
import pytest
from dicom_peers import echoscu, start_orthanc, start_storescp, storescu

from operators.dicom.phantom import write_ct_series

pytestmark = pytest.mark.integration


@pytest.fixture
def series(tmp_path):
    return write_ct_series(tmp_path / "series", slices=4, size=32, seed=11)


def test_storescu_to_storescp_and_orthanc_then_orthanc_to_storescp(
    private_network, tmp_path, series
):
    with start_storescp(tmp_path / "sink") as sink:
        assert echoscu("127.0.0.1", sink.port, called=sink.aet).returncode == 0
        sent = storescu("127.0.0.1", sink.port, series.files, called=sink.aet)
        assert sent.returncode == 0, sent.stderr
        received = {pydicom.dcmread(p).SOPInstanceUID for p in sink.files()}
        assert received == set(series.sop_instance_uids)
        modalities = {"sink": (sink.aet, "127.0.0.1", sink.port)}
        with start_orthanc(tmp_path / "orthanc", modalities=modalities) as orthanc:
            sent = storescu("127.0.0.1", orthanc.dicom_port, series.files, called=orthanc.aet)
            assert sent.returncode == 0, sent.stderr
            assert orthanc.sop_instance_uids() == set(series.sop_instance_uids)
            for path in sink.files():
                path.unlink()
            orthanc.store_to("sink", orthanc.instances())
            received = {pydicom.dcmread(p).SOPInstanceUID for p in sink.files()}
            assert received == set(series.sop_instance_uids)
