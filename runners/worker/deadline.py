"""Calls that must end by a job's deadline although nothing can tell them to stop.

A store that accepts the connection and never answers keeps botocore waiting for its read timeout,
once per attempt; no setting makes that wait end at a given moment. So such calls run in daemon
threads and the job waits for them only until its deadline: a call still running then is given up
(it ends on its own timeouts, and its thread never holds the worker up, nor the process's exit).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any


class DeadlinePassed(Exception):
    """The call had not returned when the deadline came."""


@dataclass
class Outcome:
    """One call's end: `value`, or `error` (the exception it raised, or DeadlinePassed)."""

    value: Any = None
    error: BaseException | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def call_by(deadline: float, fn: Callable[[], Any]) -> Any:
    """`fn()`'s value, or what it raised, or DeadlinePassed if it has not returned by `deadline`
    (time.monotonic())."""
    outcome = calls_by(deadline, [fn])[0]
    if outcome.error is not None:
        raise outcome.error
    return outcome.value


def calls_by(
    deadline: float, fns: Sequence[Callable[[], Any]], stop_at_first_error: bool = False
) -> list[Outcome]:
    """Run `fns` at once, each in its own thread; wait until all returned or `deadline` came, or, with
    `stop_at_first_error`, until one raised. Calls not returned by then end as DeadlinePassed (or, after
    another's error, as the reason to stop waiting, chained to it)."""
    done: queue.Queue = queue.Queue()

    def run(index: int, fn: Callable[[], Any]) -> None:
        try:
            done.put((index, Outcome(value=fn())))
        except BaseException as exc:  # handed to the caller, whatever it is
            done.put((index, Outcome(error=exc)))

    for index, fn in enumerate(fns):
        threading.Thread(target=run, args=(index, fn), daemon=True, name=f"by-deadline-{index}").start()
    outcomes: dict[int, Outcome] = {}
    first_error: BaseException | None = None
    while len(outcomes) < len(fns):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        try:
            index, outcome = done.get(timeout=remaining)
        except queue.Empty:
            break
        outcomes[index] = outcome
        if outcome.error is not None and stop_at_first_error:
            first_error = outcome.error
            break
    while True:  # what ended meanwhile still counts
        try:
            index, outcome = done.get_nowait()
        except queue.Empty:
            break
        outcomes.setdefault(index, outcome)
    for index in range(len(fns)):
        if index not in outcomes:
            if first_error is not None:
                stopped = DeadlinePassed("not waited for: an earlier call to the same place failed")
                stopped.__cause__ = first_error
            else:
                stopped = DeadlinePassed("the job's deadline came first")
            outcomes[index] = Outcome(error=stopped)
    return [outcomes[i] for i in range(len(fns))]
