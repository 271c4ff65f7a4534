"""DICOM networking: the C-STORE receiver and export to PACS (issue 5)."""
