""" "Did you mean": the known word a user most likely misspelled, and the one wording of an
unknown-key error that every configuration reader uses (pipelines, the service file, the
connectors' sections), so a typo is named the same way wherever it is made."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = ["suggest", "unknown_keys"]


def suggest(word: str, choices: Iterable[str]) -> str | None:
    """The choice ``word`` most likely misspells (case-insensitive), or None."""
    by_key = {str(c).casefold(): str(c) for c in choices}
    close = difflib.get_close_matches(str(word).casefold(), list(by_key), n=1, cutoff=0.75)
    return by_key[close[0]] if close else None


def unknown_keys(unknown: Iterable[str], known: Iterable[str]) -> str:
    """``unknown key 'ae-title' (did you mean 'ae-titles'? known: a, b)`` for one key,
    ``unknown keys 'x', 'y' (...)`` for several, each near miss suggested."""
    names = sorted(str(k) for k in known)
    keys = sorted(str(k) for k in unknown)
    guesses = [(k, suggest(k, names)) for k in keys]
    hints = "; ".join(f"did you mean {g!r} for {k!r}" if len(keys) > 1 else f"did you mean {g!r}"
                      for k, g in guesses if g)  # fmt: skip
    head = "unknown key " if len(keys) == 1 else "unknown keys "
    listed = ", ".join(repr(k) for k in keys)
    return f"{head}{listed} ({hints + '? ' if hints else ''}known: {', '.join(names)})"
