"""The management console: server-rendered pages of the platform at ``/`` of the REST port
(Jinja2 templates, a little JavaScript of our own, no build step), made from the same
:class:`~dataflow.platform.core.Platform` calls as the API. The engineer on call opens a page:
what needs a person first, then jobs (live: the API's event stream; found by accession number
or UID), a job with its pipeline's graph, timeline, images, logs and files, the pipelines with
their diagnostics, the DICOM side, the export outbox (live) and the models.

Patient names, IDs and birth dates are not shown: pages show ids, AE titles, states, counts
and times, and logs already scrubbed; ``api.patient-details`` lets a role see them on a job's
page (audited). With ``api.tokens`` a browser signs in with a token (``/console/login``) and
the buttons follow its role. Graphs and charts are SVG drawn on the server (``svg.py``).
"""

from __future__ import annotations

from dataflow.platform.console.pages import add_console

__all__ = ["add_console"]
