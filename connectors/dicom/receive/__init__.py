"""The receiving side: C-STORE SCP (:mod:`.receiver`, with the fast path :mod:`.intake`), the
spool and its path components (:mod:`.spool`) and the durable groups of received instances
that become jobs (:mod:`.groups`)."""
