"""Query/retrieve from a PACS as an SCU (Study Root): C-FIND, C-GET and C-MOVE.

See :mod:`connectors.dicom.query.scu` and docs/dicom.md ("Query and retrieve"). The PACS is
an export :class:`~connectors.dicom.export.sender.Destination` (AE title, host, port, TLS,
time-outs): the same settings as a C-STORE destination.
"""

from connectors.dicom.query import scu
from connectors.dicom.query.scu import *  # noqa: F403 - the package is its one module

__all__ = scu.__all__
