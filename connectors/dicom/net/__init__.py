"""The DICOM network layer: the only package that touches pynetdicom's internals.

- :mod:`.fastnet` — pynetdicom's transport without its polling latency, and the hooks
  (parking a DUL thread, giving a PDU back) the fast paths use; off, with the reason said,
  on a pynetdicom it does not know.
- :mod:`.association` — requesting associations: cancelling, ``TCP_NODELAY``, the refused
  connection's socket, the reactor pause that loses C-STORE responses.
"""
