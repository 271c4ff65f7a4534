"""The "stock pynetdicom" storage SCP of ``benchmarks/dicom.py``: what a user writes from
pynetdicom's documentation, run as its own process.

    python benchmarks/dicom_scp.py PORT FOLDER raw|save [MAX_PDU]

- ``raw``: the handler writes the preamble, the file meta and ``event.encoded_dataset()``
  (pynetdicom's "write fastest" recipe, no decoding);
- ``save``: ``ds = event.dataset; ds.file_meta = event.file_meta; ds.save_as(...)`` (decodes
  and re-encodes; pynetdicom's storescp example).

Every storage SOP class with pynetdicom's default transfer syntaxes; ``maximum_pdu_size`` is
pynetdicom's default (16382) unless ``MAX_PDU`` is given. No fsync. Prints ``listening`` once
it listens, runs until SIGTERM.
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path

from pynetdicom import AE, AllStoragePresentationContexts, evt

__all__ = ["main"]


def main(argv: list[str]) -> int:
    port, folder, mode = int(argv[0]), Path(argv[1]), argv[2]
    folder.mkdir(parents=True, exist_ok=True)

    def on_store(event) -> int:
        path = folder / f"{event.request.AffectedSOPInstanceUID}.dcm"
        if mode == "raw":
            with open(path, "wb") as f:
                f.write(event.encoded_dataset())
        else:
            ds = event.dataset
            ds.file_meta = event.file_meta
            ds.save_as(path, enforce_file_format=True)
        return 0x0000

    ae = AE(ae_title="STOCK")
    ae.supported_contexts = AllStoragePresentationContexts
    if len(argv) > 3:
        ae.maximum_pdu_size = int(argv[3])
    server = ae.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )
    print("listening", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: stop.set())
    stop.wait()
    server.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
