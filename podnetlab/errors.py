"""The lab's one error, in a module of its own: the lab and the modules it builds on
(runtimes, netsetup) all raise it, and `podnetmon lab` reports it."""

from __future__ import annotations


class LabError(RuntimeError):
    """A lab operation failed; the message says which step and why."""
