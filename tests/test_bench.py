"""The benchmarks run: `bench/gpu_check.py` is the one command for a GPU, so its code path is
kept working here, at a toy shape on the CPU; the study tools behind the docs' claims
(`collect_runs.py`, `scheduler_eval.py`) decide as they say on small made-up inputs."""

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.mark.slow
def test_the_gpu_check_runs_every_part_at_a_tiny_shape_on_the_cpu():
    done = subprocess.run(
        [sys.executable, str(BENCH / "gpu_check.py"), "--tiny"], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = [line.split(" | ") for line in done.stdout.splitlines() if line.startswith("| ") and "---" not in line][1:]
    parts = {row[0].strip("| ") for row in rows}
    assert parts == {"a", "b", "c", "d", "e", "f"}
    assert sum(row[0] == "| a" for row in rows) == 8  # every variant trained
    assert all(row[2] in ("ok", "-") for row in rows)
    resumed = next(row for row in rows if row[0] == "| d")
    assert "largest relative difference 0.0e+00" in resumed[3]
    # (f): both engines timed at each population size, processes beside them, and they agree.
    populations = [row for row in rows if row[0] == "| f"]
    assert [row[1] for row in populations] == [
        "population of 1",
        "population of 2",
        "vectorised = interleaved (4 members)",
    ]
    assert (
        "interleaved" in populations[1][3] and "vectorised" in populations[1][3] and "2 processes" in populations[1][3]
    )
    assert populations[2][2] == "ok"


def test_collect_runs_tops_up_each_variant_where_its_seeds_disagree_or_else_either_side_of_its_boundary():
    sys.path.insert(0, str(BENCH))
    try:
        import collect_runs
    finally:
        sys.path.remove(str(BENCH))

    def run(variant, lr, seed, diverged):
        return {"settings": {"variant": variant, "lr": lr, "seed": seed, "steps": 600}, "diverged": diverged}

    runs = [run("a", lr, seed, lr > 0.3 or (lr == 0.2 and seed == 1)) for lr in (0.1, 0.2, 0.4) for seed in (0, 1, 2)]
    runs += [run("b", lr, seed, lr > 0.15) for lr in (0.05, 0.1, 0.2, 0.4) for seed in (0, 1, 2)]
    runs += [run("c", lr, seed, False) for lr in (0.1, 0.2) for seed in (0, 2)]  # never diverged: no boundary
    assert collect_runs.boundary_lrs(runs) == {"a": [0.2], "b": [0.1, 0.2], "c": []}
    todo = collect_runs.boundary_top_up(runs, 5)
    assert sorted((s["variant"], s["lr"], s["seed"]) for s in todo) == [
        ("a", 0.2, 3),
        ("a", 0.2, 4),
        ("b", 0.1, 3),
        ("b", 0.1, 4),
        ("b", 0.2, 3),
        ("b", 0.2, 4),
    ]
    assert all(s["steps"] == 600 for s in todo)  # the rest of each run's settings kept
    assert not [
        s
        for s in collect_runs.boundary_top_up(runs + [run("a", 0.2, s, False) for s in (3, 4)], 5)
        if s["variant"] == "a"
    ]


def synthetic_labels(path, tev_step, loss_step):
    """A labelled set where divergent runs (LR 0.04 and 0.08) show TEV's jump at `tev_step` and
    the loss's climb at `loss_step`; converged runs (LR 0.01, 0.02) show neither."""
    import json
    import random

    rng = random.Random(0)
    with open(path, "w") as f:
        for lr in (0.01, 0.02, 0.04, 0.08):
            for seed in range(4):
                divergent = lr > 0.03
                end = 140 if divergent else 200
                reports = []
                for step in range(20, end + 1, 20):
                    noise = 1 + 0.05 * rng.random()
                    ratio = (1.0 if divergent and step >= tev_step else 0.2) * noise
                    loss = (8.0 if divergent and step >= loss_step else 4.0 - step / 100) * noise
                    reports.append(
                        {
                            "step": step,
                            "loss": loss,
                            "loss_max": loss * 1.02,
                            "tev_mean": 0.3,
                            "tev_std": 0.3 * ratio,
                            "tev_dispersion_max": ratio * 1.01,
                            "tev_growth_max": 0.001 * noise,
                            "tev_row_max": 1.5 * noise,
                            "embed_update_max": 0.1 * noise,
                        }
                    )
                f.write(
                    json.dumps(
                        {
                            "settings": {"variant": "baseline", "lr": lr, "seed": seed, "warmup_steps": 60},
                            "steps": 200,
                            "stop_reason": "blowup" if divergent else "completed",
                            "reports": reports,
                        }
                    )
                    + "\n"
                )


def test_scheduler_eval_credits_tev_only_when_tev_moves_before_the_loss(tmp_path):
    """bench/scheduler_eval.py on two synthetic label sets: where TEV jumps two reports before
    the loss climbs, the best TEV rule leads the loss rule in every held-out divergent run and
    the goal is met; where the loss moves first, no TEV rule leads and the verdict says so."""
    for tev_step, loss_step, verdict in ((80, 120, "is met"), (120, 80, "is NOT met")):
        path = tmp_path / f"runs_{tev_step}.jsonl"
        synthetic_labels(path, tev_step, loss_step)
        done = subprocess.run(
            [sys.executable, str(BENCH / "scheduler_eval.py"), "--runs", str(path), "--train-seeds", "0,1"],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        line = next(x for x in done.stdout.splitlines() if x.startswith("Verdict"))
        assert line.endswith(f"the goal (>= 50%, >= 0.9, 0) {verdict}."), line
        if tev_step < loss_step:
            assert "stops 100% of the held-out divergent runs" in line and "recall 1.00 and 0 false stops" in line
        else:
            assert "stops 0% of the held-out" in line


def test_search_cost_builds_a_grid_a_max_lr_and_a_range_test_search_the_product_accepts():
    """bench/search_cost.py compares three searches on one base space; each must be a space the
    product accepts, the grid one bracket step apart and the range-test search the max_lr one
    with range_test on."""
    import math

    import yaml

    from tunestab import spec

    sys.path.insert(0, str(BENCH))
    try:
        import search_cost
    finally:
        sys.path.remove(str(BENCH))
    raw = yaml.safe_load((BENCH.parent / "docs/results/legacy/default.yaml").read_text())
    grid, maxlr, ranged = search_cost.spaces(raw, 1.5, 8, 2)
    parsed = [spec.parse(s) for s in (grid, maxlr, ranged)]
    lrs = grid["params"]["lr"]["grid"]
    assert all(math.isclose(b / a, 1.5, rel_tol=1e-4) for a, b in zip(lrs, lrs[1:])) and len(lrs) == 18
    assert [p.strategy for p in parsed] == ["sweep", "max_lr", "max_lr"]
    assert not parsed[1].max_lr.range_test and parsed[2].max_lr.range_test
    assert {k: v for k, v in ranged["max_lr"].items() if k != "range_test"} == maxlr["max_lr"]
    # Like for like with the one-seed grid: the bracket alone, no boundary seeds, unless asked.
    assert parsed[1].max_lr.seeds == 0 and search_cost.spaces(raw, 1.5, 8, 2, seeds=3)[1]["max_lr"]["seeds"] == 3


def test_search_overhead_counts_the_cpu_of_the_processes_it_starts_by_what_they_are():
    sys.path.insert(0, str(BENCH))
    try:
        import search_overhead
    finally:
        sys.path.remove(str(BENCH))

    sampler = search_overhead.CpuSampler(every_s=0.05)
    sampler.start()
    # A child that burns about 0.6 s of CPU, and one that only sleeps; both exit before the
    # sampler stops, so their readings are the last taken while they lived (the burner idles a
    # second before it exits, time for a sampler on a busy machine to read it).
    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.6: pass\ntime.sleep(1.0)"
    subprocess.run([sys.executable, "-c", burn], check=True)
    subprocess.run(["sleep", "0.3"], check=True)
    used = sampler.stop()
    # Named by its interpreter and first two words: `python -c import`.
    burner = next(v for k, v in used.items() if k.split()[1:] == ["-c", "import"])
    assert burner[0] == 1 and 0.5 <= burner[1] <= 1.5, used
    assert used.get("sleep", (1, 0.0))[1] < 0.1, used  # seen (or too short to see), but idle
    assert 0 < sampler.busy() <= 1


def fake_run_folder(root: Path) -> Path:
    """A search's run folder with two trials: loop_s 30 and 10, members that trained 300 steps."""
    import json

    root.mkdir(exist_ok=True)
    (root / "trials.csv").write_text("trial_id,variant,step\na-0,baseline,100\na-1,baseline,100\nb-0,baseline,100\n")
    for trial, loop_s in (("trial_driver_a", 30.0), ("trial_driver_b", 10.0)):
        d = root / "tune" / "space" / trial
        d.mkdir(parents=True)
        reports = [{"loop_s": loop_s / 2, "step": 50}, {"loop_s": loop_s, "step": 100}]
        (d / "result.json").write_text("\n".join(json.dumps(r) for r in reports) + "\n")
    return root


def test_cores_shared_reads_a_searchs_loop_time_per_member_step_from_its_last_reports(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import cores_shared

    assert cores_shared.in_search(fake_run_folder(tmp_path)) == (40.0 / 300, 300, 2)


@pytest.mark.slow
def test_cores_shared_times_a_member_alone_and_two_at_once_beside_the_search(tmp_path):
    space = tmp_path / "tiny.yaml"
    space.write_text(
        "name: tiny\nstrategy: max_lr\nvariants: [baseline]\n"
        "trial: {n_layer: 1, n_head: 2, d_model: 16, seq_len: 16, batch_size: 2, steps: 10}\n"
        "params:\n  lr: {loguniform: [0.001, 0.1]}\n"
    )
    done = subprocess.run(
        [sys.executable, str(BENCH / "cores_shared.py"), "--space", str(space), "--steps", "3", "--rounds", "1"]
        + ["--run-dir", str(fake_run_folder(tmp_path / "run"))],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = {
        line.split(" | ")[0].strip("| "): line.split(" | ")[1:]
        for line in done.stdout.splitlines()
        if line.startswith("| ")
    }
    assert float(rows["one process alone"][0]) > 0 and rows["one process alone"][1] == "1.00 |"
    assert float(rows["two processes at once"][0]) > 0
    inside = next(v for k, v in rows.items() if k.startswith("inside the search (300 member-steps, 2 trials"))
    assert float(inside[0]) == pytest.approx(40.0 / 300, abs=1e-4)
