"""A process Ray ends on purpose prints no traceback, and every other unraisable error still does
(tunestab/quiet_exit.py)."""

import os
import signal
import sys
import threading
import time

import pytest

from tunestab import quiet_exit


def raise_from(path: str, exc: str):
    """Call a function named like Ray's SIGTERM handler, compiled as if it lived in `path`, and
    return the exception's type and traceback."""
    code = compile(f"def sigterm_handler(signum, frame):\n    raise {exc}\n", path, "exec")
    scope: dict = {}
    exec(code, scope)
    try:
        scope["sigterm_handler"](signal.SIGTERM, None)
    except BaseException as e:  # noqa: BLE001 - the point is to catch SystemExit too
        return type(e), e.__traceback__
    raise AssertionError("did not raise")


def test_only_a_systemexit_from_rays_sigterm_handler_is_recognised():
    ray_worker = os.path.join("site-packages", "ray", "_private", "worker.py")
    assert quiet_exit.raised_by_ray_sigterm(*raise_from(ray_worker, "SystemExit(1)"))
    assert not quiet_exit.raised_by_ray_sigterm(*raise_from(ray_worker, "ValueError('x')"))
    assert not quiet_exit.raised_by_ray_sigterm(*raise_from(os.path.join("mine", "worker.py"), "SystemExit(1)"))
    assert not quiet_exit.raised_by_ray_sigterm(None, None)


def test_the_hook_drops_rays_sigterm_exit_and_passes_on_the_rest(monkeypatch):
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    quiet_exit.install()

    class Unraisable:
        def __init__(self, exc_type, tb):
            self.exc_type, self.exc_traceback = exc_type, tb

    ray_worker = os.path.join("ray", "_private", "worker.py")
    sys.unraisablehook(Unraisable(*raise_from(ray_worker, "SystemExit(1)")))
    assert seen == []
    other = Unraisable(*raise_from(ray_worker, "RuntimeError('kept')"))
    sys.unraisablehook(other)
    assert seen == [other]


@pytest.mark.slow
def test_an_actor_sigtermed_while_exiting_prints_nothing_and_other_errors_still_print(tmp_path, capfd):
    """The race CI once saw at a trial's end (docs/reliability.md): an actor that is already
    exiting, its interpreter waiting in `threading._shutdown` for a thread, gets Ray's SIGTERM.
    Under the search's own cluster (cluster.start_ray) the console stays clean; the same actor
    with Python's default hook put back prints the "Exception ignored ... SystemExit" traceback,
    so the scenario is the real one; and an unrelated unraisable error still prints in full."""
    import ray
    import ray.cloudpickle

    from tunestab import cluster

    # The workers cannot import this test module: ship the actor below by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

    def linger(marker: str) -> None:
        """A thread that outlives its process's main thread: once the interpreter is exiting (the main
        thread stopped, `threading._shutdown` waiting for this thread) it says so in `marker`."""
        while threading.main_thread().is_alive():
            time.sleep(0.05)
        with open(marker, "w") as f:
            f.write("exiting")
        time.sleep(20)

    @ray.remote(num_cpus=0)
    class Lingers:
        def start(self, marker: str, default_hook: bool) -> int:
            if default_hook:
                sys.unraisablehook = sys.__unraisablehook__
            threading.Thread(target=linger, args=(marker,)).start()  # not a daemon: exit waits for it
            return os.getpid()

        def unraisable(self) -> None:
            class Broken:
                def __del__(self):
                    raise RuntimeError("an unrelated unraisable error")

            Broken()

    def sigterm_while_exiting(actor, name: str, default_hook: bool) -> int:
        marker = tmp_path / name
        pid = ray.get(actor.start.remote(str(marker), default_hook))
        actor.__ray_terminate__.remote()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not marker.exists():
            time.sleep(0.05)
        assert marker.exists(), f"actor {pid} did not start to exit"
        os.kill(pid, signal.SIGTERM)  # what Ray sends a worker it ends
        while time.monotonic() < deadline and os.path.exists(f"/proc/{pid}"):
            time.sleep(0.1)
        time.sleep(3)  # Ray forwards a worker's stderr to the driver about once a second
        return pid

    cluster.start_ray()
    try:
        quiet, loud = Lingers.remote(), Lingers.remote()
        ray.get([quiet.__ray_ready__.remote(), loud.__ray_ready__.remote()])
        capfd.readouterr()
        ray.get(quiet.unraisable.remote())
        quiet_pid = sigterm_while_exiting(quiet, "quiet", default_hook=False)
        ours = "".join(capfd.readouterr())
        sigterm_while_exiting(loud, "loud", default_hook=True)
        # The control's traceback reaches the console through Ray's log forwarding, which lags on
        # a loaded machine: wait for it rather than a fixed time.
        default, deadline = "", time.monotonic() + 60
        while "SystemExit: 1" not in default and time.monotonic() < deadline:
            default += "".join(capfd.readouterr())
            time.sleep(0.5)
    finally:
        ray.shutdown()
    assert "RuntimeError: an unrelated unraisable error" in ours, ours
    assert "SystemExit" not in ours, ours
    assert "Exception ignored in: <module 'threading'" in default and "SystemExit: 1" in default, default
    # Nothing from the quiet actor arrived late either.
    assert not [line for line in default.splitlines() if f"pid={quiet_pid}" in line and "SystemExit" in line]
