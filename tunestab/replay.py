"""`python -m tunestab.replay RUN_DIR`: log into MLflow what a search could not log while its
tracking store was away.

    python -m tunestab.replay ~/tunestab_results/max_lr-20261123-080925
    python -m tunestab.replay RUN_DIR --tracking-uri http://127.0.0.1:5000   # the store moved

Tune's own files in the run folder keep every report of every trial (`result.json`, each member
of its population under `members`: tunestab/members.py) and how each trial ended (the experiment
state). For each member the child run is found by its `member_id` tag, or opened, and only the
steps MLflow does not have are logged; a member that ended gets its tags and final status. A finished search whose parent run is not FINISHED gets its summary,
tables and plots (tunestab.report). Replaying twice logs nothing twice.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import run_dir as rd
from .members import MEMBERS, RUNNER, fresh_reports, member_configs, reports

# Tune's trial states -> MLflow's run states, for trials that ended.
ENDED = {"TERMINATED": "FINISHED", "ERROR": "FAILED"}


def experiment(run_dir: Path):
    """Tune's record of the search in run_dir: an ExperimentAnalysis (no Ray cluster needed)."""
    from ray.tune import ExperimentAnalysis

    tune_dir = run_dir / rd.TUNE_DIR
    folders = [p for p in tune_dir.iterdir() if p.is_dir()] if tune_dir.is_dir() else []
    if len(folders) != 1:
        raise FileNotFoundError(f"{tune_dir}: expected one Tune experiment folder, found {len(folders)}")
    return ExperimentAnalysis(str(folders[0]))


def member_reports(trial) -> dict[str, tuple[dict, list[dict]]]:
    """member id -> (its config, its reports in order, each at the step it was made); a trial of
    one model (a search from before populations) is its one member, under its trial id."""
    results = reports(trial.path)
    if MEMBERS not in trial.config:
        return {trial.trial_id: ({k: v for k, v in trial.config.items() if k != RUNNER}, results)}
    return {mid: (config, fresh_reports(results, mid)) for mid, config in member_configs(trial.config).items()}


def replay(run_dir: Path, uri: str) -> dict:
    """Log what is missing; returns counts of what was done."""
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient
    from ray.tune import ResultGrid

    from . import spec as spec_mod
    from .report import report
    from .tracking import MLflowTracking, flat_params

    state = json.loads((run_dir / rd.STATE_FILE).read_text())
    client = MlflowClient(uri)
    parent = state["parent_run_id"]
    experiment_name = client.get_experiment(client.get_run(parent).info.experiment_id).name
    # The space as it ran (a search started from a dict, not a file, has no copy).
    space = spec_mod.load(str(run_dir / rd.SPACE_COPY)) if (run_dir / rd.SPACE_COPY).is_file() else None
    tracking = MLflowTracking(uri, experiment_name, parent)
    marker = run_dir / rd.INCOMPLETE_FILE
    done = {"trials": 0, "steps": 0, "ended": 0, "parent": False}

    from .members import ended as member_ended

    analysis = experiment(run_dir)
    for trial in analysis.trials:
        for mid, (config, results) in member_reports(trial).items():
            if not results:
                continue  # never reported: nothing to log
            run_id = tracking.run_for(mid, trial.trial_id, config)
            if not client.get_run(run_id).data.params:  # opened just before the store went away
                client.log_batch(run_id, params=[Param(k, v) for k, v in flat_params(config).items()])
            have = {int(m.step) for m in client.get_metric_history(run_id, "step")}
            missing = [r for r in results if int(r.get("step", r.get("training_iteration", 0))) not in have]
            for r in missing:
                tracking.log_result(run_id, r)
            # A member ends with its last report, or with its trial.
            status = "FINISHED" if member_ended(results[-1]) else ENDED.get(trial.status)
            ended = status is not None and client.get_run(run_id).info.status == "RUNNING"
            if ended:
                tracking.finish(run_id, results[-1], status, config)
            done["trials"] += bool(missing or ended)
            done["steps"] += len(missing)
            done["ended"] += ended

    if marker.exists():
        marker.rename(run_dir / (rd.INCOMPLETE_FILE + ".replayed"))
    if state.get("finished") and client.get_run(parent).info.status != "FINISHED":
        # Writes the marker again if it fails.
        report(space or spec_mod.load(str(run_dir / rd.SPACE_COPY)), ResultGrid(analysis), uri, parent, run_dir)
        done["parent"] = True
    return done


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m tunestab.replay",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("run_dir", help="a search's run folder (printed by the search as 'Results: ...')")
    ap.add_argument("--tracking-uri", help="MLflow tracking URI (default: the one the search used)")
    args = ap.parse_args(argv)

    from .tracking_store import TrackingError, check_reachable

    run_dir = Path(args.run_dir).expanduser().absolute()
    if not (run_dir / rd.STATE_FILE).is_file():
        print(f"error: run_dir: {run_dir} is not a search's run folder (no {rd.STATE_FILE})", file=sys.stderr)
        return 2
    uri = args.tracking_uri or json.loads((run_dir / rd.STATE_FILE).read_text())["tracking_uri"]
    try:
        check_reachable(uri)
    except TrackingError as e:
        print(f"error: tracking_uri: {e}", file=sys.stderr)
        return 2
    done = replay(run_dir, uri)
    print(
        f"replayed {done['steps']} reports into {done['trials']} member runs; {done['ended']} runs marked "
        f"ended; parent run {'completed' if done['parent'] else 'already complete or search unfinished'}"
    )
    if (run_dir / rd.INCOMPLETE_FILE).exists():
        print(f"error: MLflow failed again while replaying; see {run_dir / rd.INCOMPLETE_FILE}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
