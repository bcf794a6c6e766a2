"""TEV scheduler: decisions on synthetic result streams, state that survives a restore, and a
real two-trial Tune run where the divergent trial is stopped by TEV."""

import dataclasses
import json
import math
import pickle
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
from ray.tune.schedulers import TrialScheduler

from tunestab.scheduler import TEVRule, TEVScheduler

CONTINUE, STOP = TrialScheduler.CONTINUE, TrialScheduler.STOP


def stream(means, ratios, every=10):
    """Reports every `every` steps with tev_mean = means[i], tev_std = ratios[i] * means[i]."""
    return [
        {"step": every * (i + 1), "tev_mean": m, "tev_std": r * m, "stop_reason": "running"}
        for i, (m, r) in enumerate(zip(means, ratios))
    ]


def feed(sched, results, tid="t"):
    trial = SimpleNamespace(trial_id=tid)
    sched.on_trial_add(None, trial)
    decisions = []
    for r in results:
        decisions.append(sched.on_trial_result(None, trial, dict(r)))
        if decisions[-1] == STOP:
            break
    return decisions


# The σ/μ rule of the first calibration (docs/results/legacy/scheduler_eval.md): the
# mechanics below (threshold, rise, shadow, state) on a signal a single trial carries.
DISPERSION = TEVRule(signal="dispersion", threshold=0.6, rise=1.6, rise_floor=0.3)

# μ_TEV grows with the LR in runs that stay stable; the ratio σ/μ settles around 0.2-0.3.
RISE = [1 - math.exp(-(i + 1) / 3) for i in range(20)]
STABLE_RATIOS = [0.1, 0.2, 0.25, 0.27, 0.26, 0.24] + [0.25] * 14


@pytest.mark.parametrize("scale", [0.1, 0.6, 3.0])  # as if the LR were 30x apart
def test_stable_runs_are_never_stopped_whatever_their_tev_level(scale):
    decisions = feed(TEVScheduler(DISPERSION), stream([scale * x for x in RISE], STABLE_RATIOS))
    assert decisions == [CONTINUE] * 20


def test_exploding_run_is_stopped_at_the_report_where_its_spread_jumps():
    ratios = [0.17, 0.22, 0.2, 0.62, 0.9, 1.1]
    sched = TEVScheduler(DISPERSION)
    decisions = feed(sched, stream([0.5, 0.9, 1.0, 0.95, 0.85, 0.8], ratios))
    assert decisions == [CONTINUE, CONTINUE, CONTINUE, STOP]
    assert sched.verdicts["t"]["step"] == 40 and sched.verdicts["t"]["stopped"]
    assert "dispersion" in sched.verdicts["t"]["reason"]


def test_slow_divergence_is_caught_by_the_rise_against_its_own_past():
    # The ratio stays under the ceiling but jumps 1.7x from one report to the next.
    ratios = [0.1, 0.15, 0.18, 0.2, 0.2, 0.34, 0.38]
    sched = TEVScheduler(TEVRule(signal="dispersion", threshold=0.4, rise=1.6, rise_floor=0.3))
    assert feed(sched, stream([0.3] * 7, ratios)) == [CONTINUE] * 5 + [STOP]
    assert "rose" in sched.verdicts["t"]["reason"]


@pytest.mark.parametrize(
    "signal,key",
    [
        ("dispersion_max", "tev_dispersion_max"),
        ("row_max", "tev_row_max"),
        ("update", "embed_update_max"),
        ("growth", "tev_growth_max"),
    ],
)
def test_a_rule_can_watch_any_per_step_signal_of_the_report(signal, key):
    results = stream([0.3] * 6, [0.2] * 6)
    for r, v in zip(results, [1.0, 1.1, 1.0, 1.2, 5.0, 6.0]):
        r[key] = v
    sched = TEVScheduler(TEVRule(signal=signal, threshold=4.0, rise=0, min_step=0))
    assert feed(sched, results) == [CONTINUE] * 4 + [STOP]
    assert sched.verdicts["t"]["reason"].startswith(f"{signal}=5")


def test_peer_compares_a_trial_with_the_same_variant_at_lower_lrs_at_the_same_step():
    """σ/μ of 0.5 is ordinary where the lower-LR trials of the variant sit at 0.45, and 2.5x
    their median where they sit at 0.2: only the second is stopped."""
    sched = TEVScheduler(TEVRule(signal="peer", threshold=2.0, rise=0, min_step=0))

    def trial(tid, variant, lr):
        t = SimpleNamespace(trial_id=tid, config={"variant": variant, "lr": lr})
        sched.on_trial_add(None, t)
        return t

    peers = [trial("a", "baseline", 0.01), trial("b", "baseline", 0.02), trial("c", "qk_norm", 0.01)]
    for step in (10, 20, 30):
        for t, ratio in zip(peers, (0.2, 0.2, 0.45)):
            sched.on_trial_result(None, t, {"step": step, "tev_mean": 1.0, "tev_std": ratio})
    high_baseline, high_qk = trial("x", "baseline", 0.1), trial("y", "qk_norm", 0.1)
    decisions = {
        t.trial_id: [
            sched.on_trial_result(None, t, {"step": s, "tev_mean": 1.0, "tev_std": r})
            for s, r in ((10, 0.3), (20, 0.5))
        ]
        for t in (high_baseline, high_qk)
    }
    assert decisions == {"x": [CONTINUE, STOP], "y": [CONTINUE, CONTINUE]}
    assert sched.verdicts["x"]["reason"].startswith("peer=2.5")
    lone = trial("z", "mlra", 0.1)  # no peers yet: no verdict, whatever its spread
    assert sched.on_trial_result(None, lone, {"step": 10, "tev_mean": 1.0, "tev_std": 0.9}) == CONTINUE


def test_an_lr_range_test_is_never_stopped_and_is_no_peer():
    """A range test's TEV climbs with its LR by design: it is not judged, and a fixed-LR trial
    of the variant is not compared with it (its ramp starts below every trial's LR)."""
    sched = TEVScheduler(TEVRule(signal="peer", threshold=2.0, rise=0, min_step=0))
    ramp = SimpleNamespace(trial_id="r", config={"variant": "baseline", "lr": 1e-3, "lr_schedule": "range"})
    sched.on_trial_add(None, ramp)
    assert [
        sched.on_trial_result(None, ramp, {"step": s, "tev_mean": 1.0, "tev_std": 0.1 * s}) for s in (10, 20, 30)
    ] == [CONTINUE] * 3
    assert "r" not in sched.history and "r" not in sched.verdicts
    fixed = SimpleNamespace(trial_id="x", config={"variant": "baseline", "lr": 0.1})
    sched.on_trial_add(None, fixed)
    # Against the ramp as a peer (σ/μ 1.0 at step 10) this 2.5 would be a stop; with no peer, none.
    assert sched.on_trial_result(None, fixed, {"step": 10, "tev_mean": 1.0, "tev_std": 2.5}) == CONTINUE


def test_no_verdict_before_min_step_even_for_a_wide_spread():
    sched = TEVScheduler(dataclasses.replace(DISPERSION, min_step=50))
    assert feed(sched, stream([0.5] * 6, [0.1, 0.9, 0.9, 0.9, 0.1, 0.1])) == [CONTINUE] * 6
    assert sched.verdicts == {}


def test_by_default_no_verdict_before_the_trials_own_warm_up():
    """min_step None reads the trial config's `warmup_steps`: the same wide spread is judged at
    step 20 in a trial without warm-up, from step 40 in one with 40 warm-up steps, and from
    TrialConfig's default (30) in one whose config leaves the warm-up unset, as a search's does."""
    sched = TEVScheduler(dataclasses.replace(DISPERSION, min_step=None))
    decisions = {}
    for tid, warmup in (("cold", {"warmup_steps": 0}), ("warm", {"warmup_steps": 40}), ("unset", {})):
        trial = SimpleNamespace(trial_id=tid, config={"variant": "baseline", "lr": 0.1, **warmup})
        sched.on_trial_add(None, trial)
        decisions[tid] = [sched.on_trial_result(None, trial, r) for r in stream([0.5] * 4, [0.2, 0.9, 0.9, 0.9])]
    assert decisions == {
        "cold": [CONTINUE, STOP, CONTINUE, CONTINUE],
        "warm": [CONTINUE, CONTINUE, CONTINUE, STOP],
        "unset": [CONTINUE, CONTINUE, STOP, CONTINUE],
    }


def test_patience_needs_consecutive_reports():
    sched = TEVScheduler(TEVRule(signal="dispersion", threshold=0.4, patience=2, rise=0))
    ratios = [0.2, 0.2, 0.2, 0.5, 0.2, 0.5, 0.5]
    assert feed(sched, stream([0.3] * 7, ratios)) == [CONTINUE] * 6 + [STOP]
    assert sched.verdicts["t"]["step"] == 70


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 1e30])
@pytest.mark.parametrize("shadow", [False, True])
def test_a_nonfinite_report_always_stops(bad, shadow):
    sched = TEVScheduler(shadow=shadow)
    results = stream([0.1, 0.2, 0.3], [0.2] * 3)
    results[1]["tev_mean"] = bad
    assert feed(sched, results) == [CONTINUE, STOP]
    assert sched.verdicts["t"]["reason"] == "nonfinite report"


def test_worker_nonfinite_stop_reason_stops():
    results = stream([0.1, 0.2], [0.2] * 2)
    results[1]["stop_reason"] = "nonfinite"
    assert feed(TEVScheduler(), results) == [CONTINUE, STOP]


def test_results_without_probes_pass_through():
    sched = TEVScheduler()
    assert feed(sched, [{"step": 10, "val_loss": 3.0}, {"foo": 1}]) == [CONTINUE, CONTINUE]


def test_shadow_mode_records_but_never_stops_and_annotates_results():
    sched = TEVScheduler(DISPERSION, shadow=True)
    results = stream([0.5, 0.9, 1.0, 0.95, 0.85, 0.8], [0.17, 0.22, 0.2, 0.62, 0.9, 1.1])
    assert feed(sched, results) == [CONTINUE] * 6
    assert sched.verdicts["t"] == {"step": 40, "reason": sched.verdicts["t"]["reason"], "stopped": False}
    early, late = dict(results[1]), dict(results[5])
    sched.annotate("t", early)
    sched.annotate("t", late)
    assert "tev_stop_step" not in early
    assert late["tev_stop_step"] == 40 and late["stop_reason"] == "running"
    assert "dispersion" in late["tev_stop_reason"]


def test_an_active_stop_is_annotated_as_stop_reason_tev():
    sched = TEVScheduler(DISPERSION)
    results = stream([0.5, 0.9, 1.0, 0.95], [0.17, 0.22, 0.2, 0.62])
    feed(sched, results)
    last = dict(results[3])
    sched.callback().on_trial_result(0, [], SimpleNamespace(trial_id="t"), last)
    assert last["stop_reason"] == "tev" and last["tev_stop_step"] == 40


def test_save_restore_round_trips_and_decides_the_same(tmp_path):
    ratios = [0.17, 0.22, 0.2, 0.3, 0.62]
    results = stream([0.5, 0.9, 1.0, 0.95, 0.9], ratios)
    a = TEVScheduler(TEVRule(signal="dispersion", threshold=0.5, patience=2, rise=0))
    feed(a, results[:4], tid="x")
    feed(a, results, tid="y")
    a.save(str(tmp_path / "s.json"))
    b = TEVScheduler()
    b.restore(str(tmp_path / "s.json"))
    assert b.state() == a.state() and b.rule == a.rule
    # Trial x had a streak of 0 after step 40; both need two more wide reports to stop.
    more = stream([0.9] * 6, [0.6] * 6)[4:]
    assert feed(a, more, tid="x") == feed(b, more, tid="x") == [CONTINUE, STOP]


def test_state_survives_the_pickle_that_tuner_restore_brings_back(tmp_path):
    path = str(tmp_path / "tev_scheduler.json")
    sched = TEVScheduler(state_path=path)
    frozen = pickle.dumps(sched)  # what Tune stores when the Tuner is built
    feed(sched, stream([0.3] * 4, [0.2, 0.2, 0.2, 0.2]), tid="a")
    restored = pickle.loads(frozen)
    assert restored.history == {}
    # First use after the restore reads the state file: the history of trial a is back, and a
    # resumed trial that reports step 30 again replaces its old step-30 entry.
    feed(restored, [{"step": 30, "tev_mean": 0.3, "tev_std": 0.06}], tid="a")
    assert [h[0] for h in restored.history["a"]] == [10, 20, 30]


def test_the_default_rule_is_the_one_the_held_out_evaluation_chose():
    """docs/scheduler_eval.md is the output of bench/scheduler_eval.py on the label set; the
    scheduler ships its best TEV rule, with the minimum step left to each trial's warm-up."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "scheduler_eval.md").read_text()
    chosen = json.loads(re.search(r"```json\n(.*?)\n```", text, re.S).group(1))["default_rule"]
    assert dataclasses.asdict(TEVRule()) == {**chosen, "min_step": None}


def test_bad_rule_is_refused_with_every_problem():
    with pytest.raises(ValueError) as e:
        TEVScheduler(TEVRule(threshold=0, rise=0.5, patience=0))
    assert "threshold" in str(e.value) and "rise" in str(e.value) and "patience" in str(e.value)


@pytest.mark.slow
def test_tune_run_stops_the_divergent_trial_by_tev_and_completes_the_stable_one(tmp_path, capfd):
    """One real population through Tune -> TorchTrainer on CPU, on the calibration proxy (12
    blocks, width 64, no clipping): the member at LR 2.0 diverges, the one at 0.03 does not. The
    scheduler stops the first through the stop board, the worker drops it, and the trial ends on
    its own when the second completes. A stop is the search working: the console says so in one
    line per member and shows no traceback (Ray forwards its workers' output to this one)."""
    import ray
    from ray import tune
    from ray.util.state import list_actors, list_placement_groups

    from tunestab import cluster
    from tunestab.ray_trial import trial_driver
    from tunestab.search import make_callbacks
    from tunestab.stop_board import open_board

    sched = TEVScheduler(DISPERSION, state_path=str(tmp_path / "tev_scheduler.json"), board="test-stops")
    base = {
        "n_layer": 12,
        "d_model": 64,
        "n_head": 4,
        "grad_clip": 0.0,
        "steps": 100,
        "warmup_steps": 30,
        "report_every": 10,
        "eval_every": 100,
        "checkpoint_every": 0,
        "data_cache": str(tmp_path / "cache"),
        "runner": {"workers": 1, "board": "test-stops"},
        "members": {"div": {"lr": 2.0}, "ok": {"lr": 0.03}},
    }
    # The search's own start: its cluster's address for the workers, and the dashboard, which
    # serves the State API this test reads.
    cluster.start_ray()
    try:
        board = open_board("test-stops")  # noqa: F841 - held while the search runs
        sweep, outcome, _ = make_callbacks(sched, None)
        tuner = tune.Tuner(
            tune.with_resources(trial_driver, {"cpu": 0.01}),
            param_space=base,
            tune_config=tune.TuneConfig(scheduler=sched, max_concurrent_trials=1),
            run_config=tune.RunConfig(
                storage_path=str(tmp_path / "results"), name="two", callbacks=[sweep, outcome], verbose=0
            ),
        )
        grid = tuner.fit()
        assert not grid.errors and len(grid) == 1
        members = grid[0].metrics["members"]
        divergent, stable = members["div"], members["ok"]
        assert divergent["stop_reason"] == "tev" and divergent["diverged"] == 0
        assert divergent["step"] < 70 and divergent["tev_stop_step"] == divergent["step"]
        assert stable["stop_reason"] == "completed" and stable["step"] == 100
        assert "tev_stop_step" not in stable
        # The worker heard of the stop and trained the other member alone to the end.
        rows = [json.loads(line) for line in (Path(grid[0].path) / "result.json").read_text().splitlines()]
        assert rows[-1]["active"] == 1, [(r["step"], r["active"]) for r in rows]
        # The stopped trial's workers and placement groups are gone, not leaked.
        address = ray.get_runtime_context().gcs_address  # this cluster, whatever else runs here
        assert [pg.state for pg in list_placement_groups(address=address) if pg.state != "REMOVED"] == []
        # Each trial started no actor it does not use: Ray Data's DatasetManager, the preemption
        # watcher and Train's placement-group cleaner, one process each per trial
        # (tunestab/ray_trial.py; the search's sweep frees what the cleaner would).
        classes = {a.class_name for a in list_actors(address=address, limit=10_000)}
        assert "RayTrainWorker" in classes, classes
        assert not classes & {"DatasetManager", "PreemptionWatcher", "PlacementGroupCleaner"}, classes
        console = "".join(capfd.readouterr())
        lines = [line for line in console.splitlines() if line.startswith("tunestab: ")]
        assert len(lines) == 2, lines
        assert lines[0].startswith("tunestab: div (") and "stopped by the TEV scheduler" in lines[0], lines
        assert lines[1].startswith("tunestab: ok (") and lines[1].endswith("completed at step 100"), lines
        # The one traceback allowed: Ray Train's own WARNING when a controller's request to its
        # autoscaling coordinator times out on a loaded machine, logged with its traceback and
        # "safe to ignore" (docs/reliability.md). A stop prints none.
        lines = console.splitlines()
        unexplained = [
            i for i, line in enumerate(lines) if "Traceback" in line and not (i and "safe to ignore" in lines[i - 1])
        ]
        assert not unexplained, console[-4000:]
    finally:
        ray.shutdown()
