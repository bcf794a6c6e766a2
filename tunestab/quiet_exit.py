"""A process Ray ends on purpose ends without a traceback.

Ray asks a worker process to end with SIGTERM, and its handler (`sigterm_handler` in
ray/_private/worker.py) raises SystemExit in whatever frame is running. When the process is
already on its way out, as a trial's actors are when their trial has ended, that frame can be
one where Python cannot raise: a weakref callback, or `threading._shutdown` waiting for a thread.
Python then swallows the SystemExit and prints "Exception ignored in ... Traceback ... SystemExit:
1" through `sys.unraisablehook`, and Ray forwards it to the search's console, where it looks like
a crash. It is not one: the exit was asked for and happens either way.

`install` is the job's `worker_process_setup_hook` (cluster.start_ray): Ray runs it in every
worker process before the first task. It drops exactly those unraisable SystemExits, the ones
raised by Ray's SIGTERM handler, and passes every other unraisable exception on to the hook that
was there. Real failures do not come this way: a killed worker or a failed task reaches the
console as Ray's own error.
"""

from __future__ import annotations

import os
import sys
import traceback

# Where Ray's handler lives; a frame of it in the traceback is what marks the SystemExit as Ray's.
RAY_SIGTERM_HANDLER = ("sigterm_handler", os.path.join("ray", "_private", "worker.py"))


def raised_by_ray_sigterm(exc_type: type | None, tb) -> bool:
    """True when the exception is a SystemExit raised by Ray's SIGTERM handler."""
    if exc_type is None or not issubclass(exc_type, SystemExit):
        return False
    name, path = RAY_SIGTERM_HANDLER
    return any(f.name == name and f.filename.endswith(path) for f in traceback.extract_tb(tb))


def install() -> None:
    """Wrap `sys.unraisablehook` so that Ray's own SIGTERM exits print nothing."""
    previous = sys.unraisablehook

    def hook(unraisable) -> None:
        if raised_by_ray_sigterm(unraisable.exc_type, unraisable.exc_traceback):
            return
        previous(unraisable)

    sys.unraisablehook = hook
