"""Query/retrieve from a PACS: C-FIND, C-GET and C-MOVE (Study Root), or QIDO-RS and WADO-RS on
a DICOMweb source.

See :mod:`connectors.dicom.query.scu`, :mod:`connectors.dicom.query.web` and docs/dicom.md
("Query and retrieve"). A DIMSE PACS is an export
:class:`~connectors.dicom.export.sender.Destination` (AE title, host, port, TLS, time-outs):
the same settings as a C-STORE destination; a DICOMweb one a
:class:`~connectors.dicom.query.web.WebSource` (its base URL). :func:`source_from` makes
either from a stage's ``pacs`` mapping, and ``c_find``/``c_get`` take either.
"""

from connectors.dicom.query import scu, web
from connectors.dicom.query.scu import *  # noqa: F403
from connectors.dicom.query.web import *  # noqa: F403

__all__ = [*scu.__all__, *web.__all__]
