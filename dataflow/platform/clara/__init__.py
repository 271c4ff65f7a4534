"""Clara Deploy's platform API over gRPC, inside ``dataflow serve``: the services Clara,
Pipelines, Jobs, Payloads, Models and Monitor of ``nvidia.clara.platform``, on the same
:class:`~dataflow.platform.core.Platform` as the REST API, so that NVIDIA's Python client
(``nvidia-clara-client``), the ``clara`` CLI and scripts written for them work unchanged.

``protos/`` holds our ``.proto`` files, written from the wire interface Clara's client declares;
``gen/`` the code generated from them (``generate.py``); ``server.py`` the servicers. Every
response carries Clara's ``ResponseHeader``: a negative ``code`` (Clara's error codes, by
resource: -0x1000 pipelines, -0x2000 jobs, -0x3000 payloads, ours -0x5000 models) and the
message say what was wrong — a bad or unknown id is an answer, never a gRPC error.
"""

from __future__ import annotations

from dataflow.platform.clara.server import ClaraServer, serve

__all__ = ["ClaraServer", "serve"]
