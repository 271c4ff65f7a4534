"""Fixtures shared by the integration tests: the browser of the console's tests, and the DICOM
wire tests run twice, with pynetdicom's fast path on and off.

A module (or test) marked ``dicom_wire`` runs once with the fast path on and once with
``DATAFLOW_DICOM_FASTNET=0`` (ids ``fast-path-on`` / ``fast-path-off``): the environment is
set for the test (receiver processes it starts inherit it); in this process the fast path is
installed for the ``on`` run (a test that calls ``send_files`` by hand starts no exporter) and
uninstalled for the ``off`` run and after each test, so the next start decides again.
A test that only makes sense with the fast path on says why with ``dicom_wire(off="reason")``:
its ``fast-path-off`` run is skipped with that reason. The test can ask for ``dicom_fast_path``
("on"/"off").
"""

import pytest

from tests.integration.browser import browser  # noqa: F401 (a fixture, found by name)

FAST_PATH = {"fast-path-on": "on", "fast-path-off": "off"}


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "dicom_wire(off=None): run with pynetdicom's fast path on and off (DATAFLOW_DICOM_FASTNET"
        "=0); off='reason' skips the off run, saying why",
    )


def pytest_generate_tests(metafunc):
    if metafunc.definition.get_closest_marker("dicom_wire") is not None:
        modes = list(FAST_PATH.values())
        metafunc.parametrize("dicom_fast_path", modes, ids=list(FAST_PATH), indirect=True)


@pytest.fixture(autouse=True)
def dicom_fast_path(request, monkeypatch):
    """ "on" or "off" in a ``dicom_wire`` test (see the module); None elsewhere."""
    mode = getattr(request, "param", None)
    if mode is None:
        yield None
        return
    marker = request.node.get_closest_marker("dicom_wire")
    reason = marker.kwargs.get("off") if marker is not None else None
    if mode == "off" and reason:
        pytest.skip(f"fast path off: {reason}")
    from connectors.dicom.net import fastnet

    fastnet.uninstall()  # the next receiver or exporter started here decides again
    if mode == "off":
        monkeypatch.setenv("DATAFLOW_DICOM_FASTNET", "0")
    else:
        monkeypatch.delenv("DATAFLOW_DICOM_FASTNET", raising=False)
        fastnet.install()  # on for a test that sends by hand, whatever ran before it
    try:
        yield mode
    finally:
        fastnet.uninstall()  # the environment is restored after: the next start decides
