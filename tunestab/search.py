"""`python -m tunestab.search`: a search space in, a Ray Tune search over Ray Train trials out,
with the TEV scheduler stopping unstable trials and everything logged to MLflow.

    python -m tunestab.search                          # search_spaces/default.yaml: CPU, offline, minutes
    python -m tunestab.search --space rybakov_cpu --storage /data/runs --tracking-uri http://127.0.0.1:5000
    python -m tunestab.search --space default --resume # continue the newest interrupted search

Strategies (the space's `strategy`):
- max_lr: per variant, bracket the largest LR that does not diverge (tunestab/bracket.py);
- tune:   Optuna (TPE, GP or CMA-ES) over the space's parameters; objective: final val_loss, with
          diverged and TEV-stopped trials scored as their initial loss (worse than any that learned);
- sweep:  every combination of the grids, for every variant (the papers' protocol);
- scale:  max_lr at several model sizes, then per variant a fit of the max stable LR against the
          parameter count and a prediction, with an interval, at a larger size (tunestab/scaling.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from pathlib import Path

from . import data as data_mod
from . import spec as spec_mod
from .config import ConfigError
from .loop import cache_dir
from .trainer import RAY_TRAIN_ENV

STATE_FILE = "tunestab_search.json"
SPACE_COPY = "space.yaml"


# --------------------------------------------------------------------------------------------
# objectives: what the Optuna study sees of each trial


def outcome_stable(result: dict) -> bool:
    """Completed its budget without diverging (a TEV stop counts as predicted divergent)."""
    return result.get("stop_reason") == "completed" and not result.get("diverged", 0)


def objectives(result: dict, lr: float) -> dict:
    l0 = result.get("loss_init", result.get("loss", 0.0))
    stable = outcome_stable(result)
    if "range_lr" in result:  # an LR range test: where its loss passed l0 (tunestab/bracket.py)
        return {"stable_lr": float(result["range_lr"]), "objective": float(l0)}
    return {"stable_lr": float(lr) if stable else 0.0,
            "objective": float(result["val_loss"]) if stable and "val_loss" in result else float(l0)}


def make_callbacks(scheduler, tracking):
    from ray.tune.callback import Callback

    from .tev_rule import dispersion

    class Objectives(Callback):
        """Adds `stable_lr` and `objective` to every result Tune keeps (after the TEV verdict), and
        `tev_dispersion`, the sigma/mu of TEV that the scheduler watches."""

        def on_trial_result(self, iteration, trials, trial, result, **info):
            result.update(objectives(result, trial.config.get("lr", 0.0)))
            if result.get("tev_mean"):
                result["tev_dispersion"] = dispersion(result["tev_mean"], result.get("tev_std", 0.0))

    # Order matters: the TEV verdict first, then the objectives computed from it, then MLflow.
    return ([scheduler.callback()] if scheduler is not None else []) + [Objectives(), tracking]


# --------------------------------------------------------------------------------------------
# the Tuner


def param_space(space: spec_mod.Space, run_dir: Path) -> dict:
    from ray import tune

    # Train runs (and their checkpoints), one per trial id, where a resumed search finds them
    # (trainer.trial_driver): in the run folder, or under train_storage, which every node reaches.
    train_storage = (f"{space.train_storage.rstrip('/')}/{run_dir.name}" if space.train_storage
                     else str(run_dir / "train"))
    runner = {"workers": space.resources.workers, "cpus_per_worker": space.resources.cpus_per_worker,
              "gpus_per_worker": space.resources.gpus_per_worker, "max_failures": space.resources.max_failures,
              "accelerator_type": space.resources.accelerator_type,
              "storage": train_storage}
    out = {**space.trial, "runner": runner}
    if space.strategy in ("max_lr", "scale"):
        if space.max_lr.range_test:
            out["lr_range_start"] = space.param("lr").values[0]  # a range test climbs the whole range
        return out  # variant, lr, seed (and lr_schedule) come from BracketSearch
    variants = list(space.variants)
    if space.strategy == "sweep":
        out["variant"] = tune.grid_search(variants)
    else:
        out["variant"] = tune.choice(variants) if len(variants) > 1 else variants[0]
    out.update({p.name: p.tune_domain() for p in space.params})
    return out


def progress_reporter(space: spec_mod.Space):
    """Tune's status table with the columns a stability search is read by: what each trial
    tries, how far it got, its loss, its TEV dispersion σ/μ, and how it ended."""
    from ray.tune import CLIReporter

    params = ["variant", "lr"] + [p.name for p in space.params if p.name != "lr"]
    # The scale strategy's sizes: the fields that tell them apart (d_model, n_layer, ...).
    if space.strategy == "scale":
        params += list(dict.fromkeys(k for f in space.scale.every_size.values() for k in f))
    metrics = {"step": "step", "loss": "loss", "val_loss": "val loss", "tev_dispersion": "TEV σ/μ",
               "stop_reason": "status"}
    return CLIReporter(parameter_columns=params, metric_columns=metrics, max_report_frequency=30,
                       max_progress_rows=30)


def searcher(space: spec_mod.Space, run_dir: Path):
    import optuna

    from .bracket import BracketSearch, FinalOnlyOptunaSearch

    storage = optuna.storages.RDBStorage(f"sqlite:///{run_dir / 'optuna.db'}")
    if space.strategy == "max_lr":
        return BracketSearch(list(space.variants), design(space), storage=storage, study_name=space.name)
    if space.strategy == "scale":
        arms = space.arms()
        return BracketSearch(list(arms), design(space), storage=storage, study_name=space.name, arms=arms)
    if space.strategy == "tune":
        sampler = {"tpe": optuna.samplers.TPESampler, "gp": optuna.samplers.GPSampler,
                   "cmaes": optuna.samplers.CmaEsSampler}[space.tune.sampler](seed=space.tune.seed)
        optuna_search = FinalOnlyOptunaSearch(metric="objective", mode="min", sampler=sampler, storage=storage,
                                              study_name=space.name)
        if space.tune.seeds > 1:
            from .bracket import SeedRepeater

            return SeedRepeater(optuna_search, space.tune.seeds, space.trial_config(space.variants[0]).seed)
        return optuna_search
    return None  # sweep: Tune's own grid


def design(space: spec_mod.Space):
    """How max_lr spends each variant's trials (tunestab/bracket.py)."""
    from .bracket import Design

    m = space.max_lr
    lo, hi = space.param("lr").values
    return Design(lo, hi, m.ratio, m.slots, m.max_trials, space.trial_config(space.variants[0]).seed, m.seeds,
                  m.points, m.step, m.range_test, m.range_margin)


def num_trials(space: spec_mod.Space) -> int:
    if space.strategy in ("max_lr", "scale"):
        from .bracket import EXTEND

        m = space.max_lr
        # The range test, the bracket, then each boundary seed's grid at its largest, per variant
        # (at each size, for scale).
        return (int(m.range_test) + m.max_trials + m.seeds * (m.points + 2 * EXTEND)) * len(space.arms())
    if space.strategy == "tune":
        return space.tune.num_samples * space.tune.seeds
    return 1  # a grid is expanded by Tune itself


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


def max_concurrent(space: spec_mod.Space, nodes: list[dict], bootstrap_config: str = BOOTSTRAP_CONFIG) -> int:
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
        print(f"note: resources.max_concurrent {r.max_concurrent} is more than the cluster can hold "
              f"at once ({fits}); running {fits} at a time", file=sys.stderr)
        return fits
    return r.max_concurrent or fits


# --------------------------------------------------------------------------------------------
# checks before Ray starts


# Remote filesystems Ray Train writes checkpoints to through pyarrow (credentials come from
# the nodes' environment, e.g. an instance role; they cannot be checked from here).
REMOTE_SCHEMES = ("s3", "gs", "gcs", "abfs", "abfss", "hdfs")


def writable(key: str, folder: Path) -> list[str]:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".tunestab-write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        return [f"{key}: cannot write to {folder}: {e.strerror or e}"]
    return []


def prepare(args) -> tuple[spec_mod.Space, str]:
    """Load and check everything a search needs; raise ConfigError listing every problem."""
    space = spec_mod.load(args.space)
    overrides = {}
    if args.storage:
        overrides["storage"] = args.storage
    if args.tracking_uri:
        overrides["tracking_uri"] = args.tracking_uri
    if args.train_storage is not None:
        overrides["train_storage"] = args.train_storage
    if args.max_concurrent is not None:
        if args.max_concurrent < 1:
            raise ConfigError([f"--max-concurrent: must be >= 1, got {args.max_concurrent}"], "command line")
        overrides["resources"] = dataclasses.replace(space.resources, max_concurrent=args.max_concurrent)
    space = dataclasses.replace(space, **overrides)
    problems = []
    storage = Path(os.path.expanduser(space.storage)).absolute()
    problems += writable("storage", storage)
    train_storage = space.train_storage
    if "://" in train_storage:
        scheme = train_storage.split("://", 1)[0]
        if scheme not in REMOTE_SCHEMES:
            problems.append(f"train_storage: {train_storage!r}: unknown scheme {scheme!r} "
                            f"(known: {', '.join(REMOTE_SCHEMES)}, or a folder)")
    elif train_storage:
        train_storage = str(Path(os.path.expanduser(train_storage)).absolute())
        problems += writable("train_storage", Path(train_storage))
    from .tracking import TrackingError, check_reachable, resolve_uri

    uri = resolve_uri(space.tracking_uri, str(storage))
    try:
        check_reachable(uri)
    except TrackingError as e:
        problems.append(f"tracking_uri: {e}")
    cfg = space.trial_config(space.variants[0])
    try:
        data_mod.load_splits(cfg.data, cfg.tokenizer, cache_dir(cfg), cfg.val_fraction, cfg.max_tokens or None)
    except data_mod.DataError as e:
        problems.append(f"trial.data: {e}")
    if problems:
        raise ConfigError(problems, f"search {space.source}")
    return dataclasses.replace(space, storage=str(storage), train_storage=train_storage), uri


def deepest(space: spec_mod.Space) -> int:
    """The most layers any trial of the space has (each gets a chart section in MLflow)."""
    depths = [space.trial_config(space.variants[0]).n_layer]
    depths += [f["n_layer"] for f in space.scale.every_size.values() if "n_layer" in f]
    p = space.param("n_layer")
    if p is not None:
        depths += [int(v) for v in p.values]
    return max(depths)


def save_chart_view(client, parent_run_id: str, space: spec_mod.Space, name: str) -> None:
    """This search's view in the MLflow UI, "tunestab <name>" (tunestab/mlflow_view.py). A view is
    a convenience: a store that refuses it costs a warning, not the search."""
    from .mlflow_view import save_view

    try:
        save_view(client, client.get_run(parent_run_id).info.experiment_id, parent_run_id, deepest(space), name,
                  ("variant", "size") if space.strategy == "scale" else ("variant",))
    except Exception as e:
        print(f"warning: could not save the MLflow chart view ({type(e).__name__}: {str(e)[:200]})", file=sys.stderr)


def newest_run_dir(storage: Path, name: str) -> Path | None:
    dirs = sorted(p for p in storage.glob(f"{name}-*") if (p / STATE_FILE).exists())
    return dirs[-1] if dirs else None


# --------------------------------------------------------------------------------------------
# the command


def start_ray() -> None:
    """Join the cluster in RAY_ADDRESS, or start a local one for this search.

    A local cluster gets a GCS port chosen here, and its workers get RAY_ADDRESS pointing at it.
    Train V2 frees a stopped trial's placement group from a helper actor that finds its cluster
    through the State API; with no address it looks for "the" Ray instance on the machine, and
    with two (two searches at once, or one left by a killed process) it fails on every poll, the
    group is never freed and the next trial waits forever. The dashboard serves the State API
    (docs/scheduler.md); it listens on 127.0.0.1 only.
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
        ray.init(runtime_env={"env_vars": env})
        return
    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    os.environ["RAY_GCS_SERVER_PORT"] = str(port)  # read by ray.init when it starts the GCS
    address = f"{ray.util.get_node_ip_address()}:{port}"
    try:
        ray.init(address="local", include_dashboard=True,
                 runtime_env={"env_vars": {**RAY_TRAIN_ENV, "RAY_ADDRESS": address}})
    finally:
        del os.environ["RAY_GCS_SERVER_PORT"]


def run_search(space: spec_mod.Space, uri: str, resume: bool) -> int:
    from ray import tune

    from .analysis import report
    from .scheduler import TEVScheduler
    from .tracking import INCOMPLETE_FILE, MLflowTracking, artifact_location, start_parent
    from .trainer import trial_driver

    storage = Path(space.storage)
    run_dir = newest_run_dir(storage, space.name) if resume else None
    if resume and run_dir is None:
        print(f"error: --resume: no earlier search named {space.name!r} in {storage}", file=sys.stderr)
        return 2
    if run_dir is None:
        run_dir = storage / f"{space.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        run_dir.mkdir(parents=True)
        parent = start_parent(uri, space.name, run_dir.name, {"strategy": space.strategy, "space": space.source,
                                                              "run_dir": str(run_dir)},
                              artifacts=artifact_location(uri, space.storage))
        (run_dir / STATE_FILE).write_text(json.dumps({"parent_run_id": parent, "tracking_uri": uri}))
        from mlflow.tracking import MlflowClient

        save_chart_view(MlflowClient(uri), parent, space, run_dir.name)
        if space.source:
            # A copy in the run folder too: `python -m tunestab.replay` rebuilds the summary from it.
            shutil.copyfile(space.source, run_dir / SPACE_COPY)
            MlflowClient(uri).log_artifact(parent, space.source)
    state = json.loads((run_dir / STATE_FILE).read_text())
    # MLflow's HTTP client retries a failed call 7 times with backoff, about four minutes in
    # which Tune's loop (and every trial's reports) would wait. Three tries ride out a blip;
    # a longer outage is left to MLflowTracking, which stops calling until the server is back.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    # `stable_lr` and `objective` depend on how a trial ends, so the driver's Objectives callback
    # adds them to each result; workers do not report them, and Tune must not insist they do.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    # Tune's newer console output picks its own columns (the first four metrics a worker
    # reports) and prints every trial's whole config; the classic reporter takes ours.
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"

    start_ray()

    # A trial driver only starts its TorchTrainer and relays reports, so it reserves no CPU at
    # all, only a sliver of the head node's own resource (Tune refuses an empty bundle). Any CPU
    # would be taken from the Train workers: with a 0.01-CPU driver per trial, two 1-CPU trials
    # no longer fit on 2 CPUs (2.02 > 2), the second trial's Train controller times out waiting
    # for its worker, and Train V2 can leave a placement group behind while it retries, which
    # deadlocked a search of many short trials (docs/reliability.md). Likewise a 4-CPU worker
    # could not start on a 4-CPU GPU node that also held a driver.
    trainable = tune.with_resources(trial_driver, tune.PlacementGroupFactory([{"node:__internal_head__": 0.001}]))
    tune_dir = run_dir / "tune"
    if resume and tune.Tuner.can_restore(str(tune_dir / space.name)):
        # The scheduler, searcher and callbacks come back from the Tuner's own pickle.
        tuner = tune.Tuner.restore(str(tune_dir / space.name), trainable=trainable, resume_unfinished=True,
                                   resume_errored=True)
    else:
        scheduler = None
        if space.scheduler.type == "tev":
            scheduler = TEVScheduler(space.scheduler.rule, shadow=space.scheduler.shadow,
                                     state_path=str(run_dir / "tev_scheduler.json"))
        tracking = MLflowTracking(uri, space.name, state["parent_run_id"], incomplete=str(run_dir / INCOMPLETE_FILE),
                                  scale=space.scale if space.strategy == "scale" else None)
        tuner = tune.Tuner(
            trainable,
            param_space=param_space(space, run_dir),
            tune_config=tune.TuneConfig(search_alg=searcher(space, run_dir), scheduler=scheduler,
                                        num_samples=num_trials(space),
                                        max_concurrent_trials=max_concurrent(space, live_nodes())),
            run_config=tune.RunConfig(storage_path=str(tune_dir), name=space.name,
                                      callbacks=make_callbacks(scheduler, tracking), verbose=1,
                                      progress_reporter=progress_reporter(space)),
        )
    grid = tuner.fit()
    (run_dir / STATE_FILE).write_text(json.dumps({**state, "finished": True}))
    report(space, grid, uri, state["parent_run_id"], run_dir)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tunestab.search", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--space", default="default", help="a file, or a name in search_spaces/ (default: default)")
    ap.add_argument("--resume", action="store_true", help="continue the newest interrupted search of this space")
    ap.add_argument("--tracking-uri", help="MLflow tracking URI (default: the space's, sqlite:///mlflow.db "
                                           "in the storage folder)")
    ap.add_argument("--storage", help="folder for Tune results, the Optuna study and MLflow's SQLite file")
    ap.add_argument("--train-storage", help="where trials' Ray Train checkpoints go (default: the run folder); "
                                            "on a multi-node cluster a URI every node reaches, e.g. s3://bucket/tunestab")
    ap.add_argument("--max-concurrent", type=int, help="trials running at once (default: from the cluster)")
    ap.add_argument("--dry-run", action="store_true", help="check everything and print the plan; run nothing")
    args = ap.parse_args(argv)
    try:
        space, uri = prepare(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(f"search {space.name!r} ({space.strategy}) from {space.source}")
        print(f"  variants: {', '.join(space.variants)}")
        for p in space.params:
            print(f"  {p.name}: {p.kind} {list(p.values)}")
        if space.strategy == "scale":
            from .scaling import non_embedding_params

            target = next(iter(space.scale.target))
            for name, fields in space.scale.every_size.items():
                role = "target, measured too" if name == target and space.scale.measure_target else \
                    "target, predicted" if name == target else "measured"
                print(f"  size {name} ({role}): {fields}, {non_embedding_params(space.trial_config(space.variants[0], **fields)):,} "
                      f"parameters without embeddings ({space.variants[0]})")
        print(f"  trials: {'grid' if space.strategy == 'sweep' else f'up to {num_trials(space)}'}; "
              f"scheduler: {space.scheduler.type}{' (shadow)' if space.scheduler.shadow else ''}")
        print(f"  storage: {space.storage}\n  train storage: {space.train_storage or 'the run folder'}\n"
              f"  tracking: {uri}")
        return 0
    return run_search(space, uri, args.resume)


if __name__ == "__main__":
    sys.exit(main())
