"""Processes of this machine: whether one that left something behind is gone."""

from __future__ import annotations

import os


def gone(pid: int) -> bool:
    """Whether no process with this pid exists in this machine's (this container's) process
    namespace. A process of another user counts as living; so does an unrelated process that
    reuses the pid (a caller that must tell them apart also compares its start time)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False
