import json
import logging

import pytest
import structlog

from dataflow.logs import configure_logging


@pytest.fixture(autouse=True)
def restore_logging():
    """configure_logging binds to the sys.stderr of the moment: capsys's, closed after the
    test. Put back the defaults, or later tests log into a closed file."""
    handlers, level = list(logging.root.handlers), logging.root.level
    yield
    structlog.reset_defaults()
    logging.root.handlers[:] = handlers
    logging.root.setLevel(level)


def test_patient_identifiers_are_redacted_by_default(capsys):
    configure_logging("INFO", json=True)
    structlog.get_logger("t").info("instance_stored", patient_id="PAT-123", nbytes=10)
    record = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert record["patient_id"] == "<redacted>" and record["nbytes"] == 10
    assert record["event"] == "instance_stored"


def test_phi_can_be_allowed_explicitly(capsys):
    configure_logging("INFO", json=True, allow_phi=True)
    structlog.get_logger("t").info("instance_stored", patient_id="PAT-123")
    assert "PAT-123" in capsys.readouterr().err
    configure_logging("INFO", json=True)


def test_level_filters(capsys):
    configure_logging("WARNING", json=True)
    log = structlog.get_logger("t")
    log.info("quiet")
    log.warning("loud")
    err = capsys.readouterr().err
    assert "loud" in err and "quiet" not in err
    configure_logging("INFO")
