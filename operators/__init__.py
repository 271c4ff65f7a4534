"""Bundled stages (series to volume, inference, DICOM SEG writers...). Filled in by issue 4."""
