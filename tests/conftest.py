"""Helpers shared by the tests that start real servers and processes."""

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout_s: float, proc=None) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:4]} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(url)


class MlflowServer:
    """A real `mlflow server` on 127.0.0.1 with a SQLite store, which can be stopped and started
    again on the same port and store (a tracking server that goes away and comes back)."""

    def __init__(self, folder: Path):
        self.folder, self.port, self.proc = folder, free_port(), None
        self.uri = f"http://127.0.0.1:{self.port}"
        self.artifacts = folder / "mlflow-artifacts"

    def start(self) -> "MlflowServer":
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mlflow",
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--backend-store-uri",
                f"sqlite:///{self.folder / 'mlflow-server.db'}",
                "--artifacts-destination",
                str(self.artifacts),
                "--workers",
                "1",
            ],
            stdout=open(self.folder / "mlflow-server.log", "a"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            wait_http(f"{self.uri}/health", 180, self.proc)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Gone at once, as a crashed or unplugged server is: the whole process group, SIGKILL."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, 9)
            self.proc.wait(30)


@pytest.fixture
def mlflow_server(tmp_path):
    server = MlflowServer(tmp_path).start()
    try:
        yield server
    finally:
        server.stop()


def descendants(pid: int) -> list[int]:
    """Every process below pid, from /proc (Linux)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def process_title(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def edge_results(lrs: dict[str, tuple], edge: dict[str, float]) -> list:
    """Tune-like results of one-model trials at seed 0: variant v at each of lrs[v] completes
    below edge[v] and blows up from it (the report reads them as it reads Tune's `Result`)."""
    from types import SimpleNamespace

    return [
        SimpleNamespace(
            config={"variant": v, "lr": lr, "seed": 0},
            error=None,
            metrics_dataframe=None,
            metrics={
                "trial_id": f"{v}{lr}",
                "stop_reason": "completed" if lr < edge[v] else "blowup",
                "diverged": int(lr >= edge[v]),
                "val_loss": 3.0,
                "loss_init": 5.5,
            },
        )
        for v in lrs
        for lr in lrs[v]
    ]
