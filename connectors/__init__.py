"""DICOM in and out of dataflow (C-STORE receiver, export to PACS). Filled in by issue 5."""
