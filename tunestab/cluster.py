"""The Ray cluster a search runs on: joining or starting it, and how many trials it can hold at
once. Ray is imported where it is used; the environment Ray Train needs is here, light, for the
search and for `python -m tunestab.train --workers N` alike."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .spec import Space

# Ray Train V2's controller takes one report off each worker's size-1 queue per poll, every
# RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (default 2 s), so reports faster than that block the worker:
# 0.42x bare-loop speed at 2 s. Polling every 0.1 s costs CPU on small machines (0.80-0.88x);
# 0.5 s gave 0.89-0.93x for ~1 s more teardown. Measurements: docs/overhead.md.
#
# Every trial starts a Train controller and its helper actors, each a new Python process that
# imports Ray Train (1-2 s to start, 2-8 s in its constructor on 2 busy cores: docs/overhead.md).
# The preemption watcher is one of them: it tells the training function that a node is being
# drained (`ray.train.get_preemption_info()`), which the loop does not ask, so trials go without it.
RAY_TRAIN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}

# Run by Ray in every worker process of the search's job: a process Ray ends on purpose prints no
# traceback (tunestab/quiet_exit.py).
QUIET_EXIT = "tunestab.quiet_exit.install"

# Written by `ray up` on the head node: the cluster's node types, with the resources the launcher
# filled in for each instance type, and how many of each it may start.
BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"


def cluster_capacity(nodes: list[dict], bootstrap_config: str = BOOTSTRAP_CONFIG, accelerator_type: str = "") -> dict:
    """The CPUs and GPUs of the cluster's live nodes (`nodes`: each one's resources), or, on an
    autoscaling cluster, what it can grow to: a GPU cluster usually starts with no GPU node at
    all. With `accelerator_type`, only GPUs of nodes labelled with it (the launcher labels each
    node `accelerator_type:<its GPU>`) count."""
    import yaml

    label = f"accelerator_type:{accelerator_type}"

    def gpus(resources: dict) -> float:
        return float(resources.get("GPU", 0)) if not accelerator_type or label in resources else 0.0

    out = {"CPU": sum(float(n.get("CPU", 0)) for n in nodes), "GPU": sum(gpus(n) for n in nodes)}
    path = Path(os.path.expanduser(bootstrap_config))
    if path.is_file():
        config = yaml.safe_load(path.read_text()) or {}
        head = config.get("head_node_type")
        top = {k: 0.0 for k in out}
        for name, node in (config.get("available_node_types") or {}).items():
            count = 1 if name == head else int(node.get("max_workers", 0))
            resources = node.get("resources") or {}
            top["CPU"] += count * float(resources.get("CPU", 0))
            top["GPU"] += count * gpus(resources)
        out = {k: max(out[k], top[k]) for k in out}
    return out


def live_nodes() -> list[dict]:
    import ray

    return [n["Resources"] for n in ray.nodes() if n.get("Alive")]


def max_concurrent(space: Space, nodes: list[dict], bootstrap_config: str = BOOTSTRAP_CONFIG) -> int:
    """Trials at once: as many as the cluster's GPUs (of the space's accelerator_type, if it
    names one) or CPUs, for CPU trials, can hold at its largest, or the space's number when it
    is smaller."""
    r = space.resources
    capacity = cluster_capacity(nodes, bootstrap_config, r.accelerator_type)
    if r.gpus_per_worker:
        fits = max(1, int(capacity["GPU"] // (r.workers * r.gpus_per_worker)))
    else:
        fits = max(1, int(capacity["CPU"] // max(r.workers * r.cpus_per_worker, 1e-9)))
    if r.max_concurrent > fits:
        # More trials than the cluster can ever hold would each start a Train controller that
        # waits for workers, times out and retries, holding resources the running ones need.
        print(
            f"note: resources.max_concurrent {r.max_concurrent} is more than the cluster can hold "
            f"at once ({fits}); running {fits} at a time",
            file=sys.stderr,
        )
        return fits
    return r.max_concurrent or fits


def start_ray() -> None:
    """Join the cluster in RAY_ADDRESS, or start a local one for this search.

    A local cluster gets a GCS port chosen here, and its workers get RAY_ADDRESS pointing at it:
    Ray code in a worker that looks for "the" Ray instance on the machine with no address fails
    when there are two (two searches at once, or one left by a killed process). Train V2's
    placement-group cleaner did, leaving a stopped trial's group held forever (docs/scheduler.md);
    trials now start without it, but the address stays pinned. The dashboard serves the State API
    and the Ray dashboard; it listens on 127.0.0.1 only.
    """
    import socket

    import ray

    address = os.environ.get("RAY_ADDRESS", "")
    if address:
        # `ray job submit` sets it to the cluster's GCS address; pass it on to the workers too
        # (not a ray:// or http:// address, which only a client understands).
        env = dict(RAY_TRAIN_ENV)
        if "://" not in address:
            env["RAY_ADDRESS"] = address
        ray.init(runtime_env={"env_vars": env, "worker_process_setup_hook": QUIET_EXIT})
        return
    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    os.environ["RAY_GCS_SERVER_PORT"] = str(port)  # read by ray.init when it starts the GCS
    address = f"{ray.util.get_node_ip_address()}:{port}"
    try:
        ray.init(
            address="local",
            include_dashboard=True,
            runtime_env={
                "env_vars": {**RAY_TRAIN_ENV, "RAY_ADDRESS": address},
                "worker_process_setup_hook": QUIET_EXIT,
            },
        )
    finally:
        del os.environ["RAY_GCS_SERVER_PORT"]
