"""The receiving side: C-STORE SCP (:mod:`.receiver`, with the fast path :mod:`.intake`; both
call the steps of a C-STORE in :mod:`.store`, and :mod:`.intake` never imports
:mod:`.receiver`), the spool and its path components (:mod:`.spool`) and the durable groups
of received instances that become jobs (:mod:`.groups`)."""
