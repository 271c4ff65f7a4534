"""The sending side: the durable outbox of results (:mod:`.outbox`), the exporter that drains
it with retries, back-off and dead letters (:mod:`.exporter`), and the transports behind one
seam (:mod:`.transport`: ``send(files, on_result, cancel)``): DIMSE C-STORE (:mod:`.sender`,
with the fast path :mod:`.direct`), DICOMweb STOW-RS (:mod:`.stow`), and the in-memory test
double (:mod:`.memory`)."""
