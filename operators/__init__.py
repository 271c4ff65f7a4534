"""Bundled stages: DICOM series to volume (``operators.dicom``), image stages, the reference
pipelines' pass-through trio. See docs/operators.md."""
