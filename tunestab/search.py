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
from pathlib import Path

from . import data as data_mod
from . import run_dir as rd
from . import spec as spec_mod
from .config import ConfigError
from .strategies import of

# --------------------------------------------------------------------------------------------
# what each result carries when Tune keeps it


def make_callbacks(scheduler, tracking):
    """Tune's callbacks, in the order they must run: the placement-group sweep
    (tunestab/placement_sweep.py), then `TrialOutcome` completes each result (the
    TEV verdict, then the objectives decided from it, for every member) before MLflow logs it."""
    from ray.tune.callback import Callback

    from .members import MEMBERS, ended, keep, member_configs, reports_of, tally
    from .outcome import LR, objectives
    from .placement_sweep import PlacementGroupSweep

    class TrialOutcome(Callback):
        """Writes into every result Tune keeps, in one place and in this order, for each member
        in it (tunestab/members.py): the TEV scheduler's verdict (`tev_stop_step`,
        `tev_stop_reason`, `stop_reason = tev`), then `stable_lr` and `objective`
        (outcome.objectives), which depend on how the member ended. Then the result's `members`
        becomes every member's latest kept report (members.keep): a member's reports after its
        TEV verdict are not kept, so it ends at the verdict step as a lone trial stopped there."""

        def on_trial_result(self, iteration, trials, trial, result, **info):
            configs = member_configs(trial.config)
            fresh = reports_of(result)
            for mid, report in fresh.items():
                if scheduler is not None:
                    scheduler.annotate(mid, report)
                report.update(objectives(report, configs.get(mid, {}).get(LR, 0.0)))
            before = (trial.last_result or {}).get(MEMBERS) or {}
            kept = keep(before, fresh)
            result[MEMBERS] = kept
            result[OUTCOMES] = tally(kept)
            for mid, report in kept.items():
                if ended(report) and not ended(before.get(mid)):
                    print(ending_line(mid, configs.get(mid, {}), report), flush=True)

    # The sweep first: a group it frees lets the next trial start.
    return [PlacementGroupSweep(), TrialOutcome(), tracking]


def ending_line(mid: str, config: dict, report: dict) -> str:
    """One console line per member that ends, however it ends: a stop is the search working."""
    from .outcome import TEV_STOP_REASON, StopReason

    reason = report.get("stop_reason")
    why = {
        StopReason.TEV: f"stopped by the TEV scheduler ({report.get(TEV_STOP_REASON, 'its rule')})",
        StopReason.COMPLETED: "completed",
    }.get(reason, f"failed ({reason})")
    lr = config.get("lr")
    what = f"{config.get('variant')}" + (f", lr {lr:.3g}" if isinstance(lr, (int, float)) else "")
    return f"tunestab: {mid} ({what}, seed {config.get('seed', 0)}) {why} at step {report.get('step')}"


OUTCOMES = "outcomes"
"""A trial's members by how they stand, for the console: "running 3, completed 1, tev 1"."""


# --------------------------------------------------------------------------------------------
# the Tuner


def param_space(space: spec_mod.Space, run_dir: Path) -> dict:
    # Train runs (and their checkpoints), one per trial id, where a resumed search finds them
    # (ray_trial.trial_driver): in the run folder, or under train_storage, which every node reaches.
    train_storage = (
        f"{space.train_storage.rstrip('/')}/{run_dir.name}" if space.train_storage else str(run_dir / rd.TRAIN_DIR)
    )
    runner = {
        "board": board_name(run_dir),
        "workers": space.resources.workers,
        "cpus_per_worker": space.resources.cpus_per_worker,
        "gpus_per_worker": space.resources.gpus_per_worker,
        "max_failures": space.resources.max_failures,
        "accelerator_type": space.resources.accelerator_type,
        "storage": train_storage,
    }
    return {**space.trial, "runner": runner, **of(space).param_space(space)}


def board_name(run_dir: Path) -> str:
    """The search's stop board (tunestab/stop_board.py): one per run folder, so a resumed
    search opens the same name."""
    return f"tunestab-stops-{run_dir.name}"


def progress_reporter(space: spec_mod.Space):
    """Tune's status table with the columns a stability search is read by: what each trial's
    population shares, how far it got, and how its members stand (each member's loss, TEV and
    outcome are in MLflow, a child run each)."""
    from ray.tune import CLIReporter

    strategy = of(space)
    shared = [p.name for p in space.params if p.name not in strategy.member_fields]
    params = ["variant"] + shared + strategy.progress_params(space)
    metrics = {"step": "step", "active": "training", "population": "members", OUTCOMES: "how members stand"}
    return CLIReporter(
        parameter_columns=params,
        metric_columns=metrics,
        max_report_frequency=30,
        max_progress_rows=30,
        max_column_length=40,
    )


def searcher(space: spec_mod.Space, run_dir: Path):
    """The strategy's searcher, its members put into populations of up to
    `resources.population` (tunestab/members.py)."""
    import optuna

    from .searchers import PopulationSearch

    strategy = of(space)
    inner = strategy.searcher(space, optuna.storages.RDBStorage(f"sqlite:///{run_dir / rd.OPTUNA_DB}"))
    return PopulationSearch(
        inner,
        space.resources.population_size(),
        strategy.num_trials(space),
        member_fields=strategy.member_fields,
        rounds=strategy.rounds,
    )


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
            problems.append(
                f"train_storage: {train_storage!r}: unknown scheme {scheme!r} "
                f"(known: {', '.join(REMOTE_SCHEMES)}, or a folder)"
            )
    elif train_storage:
        train_storage = str(Path(os.path.expanduser(train_storage)).absolute())
        problems += writable("train_storage", Path(train_storage))
    from .tracking_store import TrackingError, check_reachable, resolve_uri

    uri = resolve_uri(space.tracking_uri, str(storage))
    try:
        check_reachable(uri)
    except TrackingError as e:
        problems.append(f"tracking_uri: {e}")
    cfg = space.trial_config(space.variants[0])
    try:
        data_mod.load_splits(cfg.data, cfg.tokenizer, data_mod.cache_dir(cfg), cfg.val_fraction, cfg.max_tokens or None)
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
        save_view(
            client,
            client.get_run(parent_run_id).info.experiment_id,
            parent_run_id,
            deepest(space),
            name,
            of(space).group_by(space),
            list(of(space).arms(space)),
        )
    except Exception as e:
        print(f"warning: could not save the MLflow chart view ({type(e).__name__}: {str(e)[:200]})", file=sys.stderr)


# --------------------------------------------------------------------------------------------
# the command


def run_search(space: spec_mod.Space, uri: str, resume: bool) -> int:
    from ray import tune

    from .cluster import live_nodes, max_concurrent, start_ray
    from .ray_trial import trial_driver
    from .report import report
    from .scheduler import TEVScheduler
    from .stop_board import open_board
    from .tracking import MLflowTracking, start_parent
    from .tracking_store import artifact_location

    storage = Path(space.storage)
    run_dir = rd.newest(storage, space.name) if resume else None
    if resume and run_dir is None:
        print(f"error: --resume: no earlier search named {space.name!r} in {storage}", file=sys.stderr)
        return 2
    if run_dir is None:
        run_dir = rd.new(storage, space.name)
        parent = start_parent(
            uri,
            space.name,
            run_dir.name,
            {"strategy": space.strategy, "space": space.source, "run_dir": str(run_dir)},
            artifacts=artifact_location(uri, space.storage),
        )
        (run_dir / rd.STATE_FILE).write_text(json.dumps({"parent_run_id": parent, "tracking_uri": uri}))
        from mlflow.tracking import MlflowClient

        save_chart_view(MlflowClient(uri), parent, space, run_dir.name)
        if space.source:
            # A copy in the run folder too: `python -m tunestab.replay` rebuilds the summary from it.
            shutil.copyfile(space.source, run_dir / rd.SPACE_COPY)
            MlflowClient(uri).log_artifact(parent, space.source)
    state = json.loads((run_dir / rd.STATE_FILE).read_text())
    # MLflow's HTTP client retries a failed call 7 times with backoff, about four minutes in
    # which Tune's loop (and every trial's reports) would wait. Three tries ride out a blip;
    # a longer outage is left to MLflowTracking, which stops calling until the server is back.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    # `stable_lr` and `objective` depend on how a trial ends, so the driver's TrialOutcome callback
    # adds them to each result; workers do not report them, and Tune must not insist they do.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    # Tune's newer console output picks its own columns (the first four metrics a worker
    # reports) and prints every trial's whole config; the classic reporter takes ours.
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"

    start_ray()
    # Held for as long as the search runs: the TEV scheduler posts member stops to it.
    board = open_board(board_name(run_dir))  # noqa: F841

    # A trial driver only starts its TorchTrainer and relays reports, so it reserves no CPU at
    # all, only a sliver of the head node's own resource (Tune refuses an empty bundle). Any CPU
    # would be taken from the Train workers: with a 0.01-CPU driver per trial, two 1-CPU trials
    # no longer fit on 2 CPUs (2.02 > 2), the second trial's Train controller times out waiting
    # for its worker, and Train V2 can leave a placement group behind while it retries, which
    # deadlocked a search of many short trials (docs/reliability.md). Likewise a 4-CPU worker
    # could not start on a 4-CPU GPU node that also held a driver.
    trainable = tune.with_resources(trial_driver, tune.PlacementGroupFactory([{"node:__internal_head__": 0.001}]))
    tune_dir = run_dir / rd.TUNE_DIR
    if resume and tune.Tuner.can_restore(str(tune_dir / space.name)):
        # The scheduler, searcher and callbacks come back from the Tuner's own pickle.
        tuner = tune.Tuner.restore(
            str(tune_dir / space.name), trainable=trainable, resume_unfinished=True, resume_errored=True
        )
    else:
        scheduler = None
        if space.scheduler.type == "tev":
            scheduler = TEVScheduler(
                space.scheduler.rule,
                shadow=space.scheduler.shadow,
                state_path=str(run_dir / rd.SCHEDULER_STATE),
                board=board_name(run_dir),
            )
        tracking = MLflowTracking(uri, space.name, state["parent_run_id"], incomplete=str(run_dir / rd.INCOMPLETE_FILE))
        tuner = tune.Tuner(
            trainable,
            param_space=param_space(space, run_dir),
            tune_config=tune.TuneConfig(
                search_alg=searcher(space, run_dir),
                scheduler=scheduler,
                num_samples=of(space).num_trials(space),
                max_concurrent_trials=max_concurrent(space, live_nodes()),
                # A finished trial's driver process runs the next trial instead of a new one being
                # started: one Python process importing torch and Ray Train fewer per trial
                # (docs/overhead.md). Tune resets a driver whether or not its function has
                # returned, and one still in TorchTrainer.fit() fails the reset and errors the next
                # trial; the TEV scheduler never stops a population's trial (its worker drops the
                # stopped members), so every driver Tune resets has returned.
                reuse_actors=True,
            ),
            run_config=tune.RunConfig(
                storage_path=str(tune_dir),
                name=space.name,
                callbacks=make_callbacks(scheduler, tracking),
                verbose=1,
                progress_reporter=progress_reporter(space),
            ),
        )
    grid = tuner.fit()
    (run_dir / rd.STATE_FILE).write_text(json.dumps({**state, "finished": True}))
    report(space, grid, uri, state["parent_run_id"], run_dir)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m tunestab.search",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--space", default="default", help="a file, or a name in search_spaces/ (default: default)")
    ap.add_argument("--resume", action="store_true", help="continue the newest interrupted search of this space")
    ap.add_argument(
        "--tracking-uri", help="MLflow tracking URI (default: the space's, sqlite:///mlflow.db in the storage folder)"
    )
    ap.add_argument("--storage", help="folder for Tune results, the Optuna study and MLflow's SQLite file")
    ap.add_argument(
        "--train-storage",
        help="where trials' Ray Train checkpoints go (default: the run folder); "
        "on a multi-node cluster a URI every node reaches, e.g. s3://bucket/tunestab",
    )
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
        for line in of(space).dry_run(space):
            print(line)
        print(
            f"  trials: {of(space).trials_text(space)}; "
            f"scheduler: {space.scheduler.type}{' (shadow)' if space.scheduler.shadow else ''}"
        )
        print(
            f"  storage: {space.storage}\n  train storage: {space.train_storage or 'the run folder'}\n  tracking: {uri}"
        )
        return 0
    return run_search(space, uri, args.resume)


if __name__ == "__main__":
    sys.exit(main())
