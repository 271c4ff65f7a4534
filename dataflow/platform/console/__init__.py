"""The management console: server-rendered pages of the platform at ``/`` of the REST port
(Jinja2 templates, a little JavaScript of our own, no build step), made from the same
:class:`~dataflow.platform.core.Platform` calls as the API. The engineer on call opens a page:
what needs a person first, then jobs (live: the API's event stream), a job with its operators,
logs and files, the DICOM side, the export outbox and the models.

Patient names, IDs and birth dates are never shown: pages show ids, AE titles, states, counts
and times, and logs already scrubbed.
"""

from __future__ import annotations

from dataflow.platform.console.pages import add_console

__all__ = ["add_console"]
