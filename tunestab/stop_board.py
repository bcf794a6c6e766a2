"""The stop board: which members of which populations the search's TEV scheduler has stopped.

A population's members train together in one Ray Train worker group, one Tune trial, and Tune can
stop a trial only as a whole. The scheduler decides per member in the search's process; the
board carries its verdicts to the workers. It is a named actor with no CPU of its own, which the
search opens before Tune starts (`open_board`); the scheduler posts to it (`post`) and the
population's rank 0 asks it after each report (`ask`), so a stopped member ends at the next
report after its verdict. The driver keeps a member's results only up to its verdict step
(tunestab/members.py), so what a member records is what a lone trial stopped there records;
the lag only costs the steps trained in between.

A board that cannot be reached costs compute, never results: the worker trains the member on
and the driver still keeps nothing after the verdict.
"""

from __future__ import annotations

import sys

_handles: dict[str, object] = {}
_warned: set[str] = set()


def _board_class():
    import ray

    @ray.remote(num_cpus=0, max_restarts=-1)
    class StopBoard:
        def __init__(self):
            self.stops: dict[str, set[str]] = {}

        def post(self, trial_id: str, member_ids: list[str]) -> None:
            self.stops.setdefault(trial_id, set()).update(member_ids)

        def stopped(self, trial_id: str) -> list[str]:
            return sorted(self.stops.get(trial_id, ()))

    return StopBoard


def open_board(name: str):
    """The search's board (created if it does not exist): its handle, which the search holds for
    as long as it runs."""
    handle = _board_class().options(name=name, get_if_exists=True).remote()
    _handles[name] = handle
    return handle


def _handle(name: str):
    import ray

    if name not in _handles:
        _handles[name] = ray.get_actor(name)
    return _handles[name]


def post(name: str, trial_id: str, member_ids: list[str]) -> None:
    """Tell the workers of `trial_id` to stop these members (does not wait for the board)."""
    try:
        _handle(name).post.remote(trial_id, list(member_ids))
    except Exception as e:  # noqa: BLE001 - a missing board costs compute, not results
        _warn(name, e)


def ask(name: str, trial_id: str, timeout_s: float = 10.0) -> list[str]:
    """The members of `trial_id` the scheduler has stopped so far."""
    import ray

    try:
        return ray.get(_handle(name).stopped.remote(trial_id), timeout=timeout_s)
    except Exception as e:  # noqa: BLE001
        _handles.pop(name, None)  # look it up again next time
        _warn(name, e)
        return []


def _warn(name: str, e: Exception) -> None:
    if name not in _warned:
        _warned.add(name)
        print(
            f"tunestab: WARNING: stop board {name!r} unreachable ({type(e).__name__}: {str(e)[:200]}); "
            "stopped members train on, and the search keeps none of their results after the stop",
            file=sys.stderr,
            flush=True,
        )
