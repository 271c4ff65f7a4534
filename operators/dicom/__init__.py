"""DICOM operators: series -> volume (``SeriesToVolume``), and a synthetic CT phantom.

See docs/operators.md. ``load_series`` and ``split_series`` are plain functions; the stage
``operators.dicom:SeriesToVolume`` (or ``operators.dicom.series:SeriesToVolume``) uses them.
The phantom writers live in ``operators.dicom.phantom`` (single-frame CT series, also a
command) and ``operators.dicom.enhanced`` (one Enhanced CT multi-frame file); they are not
imported here, so that ``python -m operators.dicom.phantom`` runs cleanly.
"""

from operators.dicom.derived import WriteDerivedSeries
from operators.dicom.frames import SeriesError
from operators.dicom.rtstruct import WriteRTStruct
from operators.dicom.selector import (
    RuleError,
    SelectionError,
    SelectionReport,
    SelectSeries,
    SeriesInfo,
    evaluate,
    load_rules,
    select_series,
)
from operators.dicom.series import (
    SeriesPlan,
    SeriesToVolume,
    find_files,
    load_series,
    plan_series,
    split_series,
)

__all__ = [
    "RuleError",
    "SelectSeries",
    "SelectionError",
    "SelectionReport",
    "SeriesError",
    "SeriesInfo",
    "SeriesPlan",
    "SeriesToVolume",
    "WriteDerivedSeries",
    "WriteRTStruct",
    "evaluate",
    "find_files",
    "load_rules",
    "load_series",
    "plan_series",
    "select_series",
    "split_series",
]
