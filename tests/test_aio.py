"""sharedstate.aio without a backend. Its calls, values, locks and snapshots run in the contract suite
(tests/contract/, the ``aio`` face), and what only it has — tasks, lock ownership per task, a loop that
never blocks, cancelled waits — in tests/contract/test_aio_tasks.py, on every backend."""

from __future__ import annotations

import pytest

from sharedstate import aio


def test_lock_ownership_needs_a_task():
    with pytest.raises(RuntimeError):
        aio._task_token()  # no running loop, no task
