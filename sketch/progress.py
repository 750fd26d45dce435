"""How long work reports progress, without knowing who shows it (a terminal bar, a log, nothing).

- :data:`Progress`: called with a count of bytes just done.
- :data:`Phases`: called when a step of a longer job starts, with the step's name and its total
  in bytes (None when not known in advance, e.g. ranking, publishing); it returns the
  :data:`Progress` of that step (or None). The previous step ends when the next one starts.
"""

from __future__ import annotations

from collections.abc import Callable

Progress = Callable[[int], None]
Phases = Callable[[str, "int | None"], "Progress | None"]


def start_phase(phases: Phases | None, name: str, total: int | None = None) -> Progress | None:
    """``phases(name, total)``, or None when nobody listens."""
    return phases(name, total) if phases is not None else None
