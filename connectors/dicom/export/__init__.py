"""The sending side: the durable outbox of results (:mod:`.outbox`), the exporter that drains
it with retries, back-off and dead letters (:mod:`.exporter`), and the transports: DIMSE
C-STORE (:mod:`.sender`, with the fast path :mod:`.direct`) and DICOMweb STOW-RS
(:mod:`.stow`)."""
