"""The search command: objectives, checks before Ray starts, the summary, and an end-to-end
search on CPU read back from a SQLite MLflow store."""

import math
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import yaml
from conftest import edge_results

from tunestab import mlflow_view, report, run_dir, search, spec, tables
from tunestab.outcome import objectives
from tunestab.strategies.tune import SHOWN, config_scores, scores_text, separated
from tunestab.tables import summary


def test_objectives_score_how_a_trial_ended():
    done = {"stop_reason": "completed", "diverged": 0, "val_loss": 3.1, "loss_init": 5.5}
    assert objectives(done, 0.2) == {"stable_lr": 0.2, "objective": 3.1}
    blown = {"stop_reason": "blowup", "diverged": 1, "val_loss": 5.5, "loss_init": 5.5}
    assert objectives(blown, 0.9) == {"stable_lr": 0.0, "objective": 5.5}
    # Stopped by TEV: predicted divergent, scored like a divergence, never NaN.
    tev = {"stop_reason": "tev", "diverged": 0, "loss": 7.0, "loss_init": 5.5}
    assert objectives(tev, 0.9) == {"stable_lr": 0.0, "objective": 5.5}
    no_progress = {"stop_reason": "no_progress", "diverged": 1, "val_loss": 5.6, "loss_init": 5.5}
    assert objectives(no_progress, 0.5)["stable_lr"] == 0.0
    # An LR range test hands BracketSampler where it failed, however it ended.
    ramp = {"stop_reason": "range_end", "diverged": 1, "range_lr": 0.7, "loss_init": 5.5}
    assert objectives(ramp, 30.0) == {"stable_lr": 0.7, "objective": 5.5}


def test_summary_fits_each_variant_and_keeps_the_bracket():
    rows = [
        {"variant": "a", "lr": 0.1, "seed": 0, "stop_reason": "completed", "diverged": 0, "val_loss": 3.0},
        {"variant": "a", "lr": 0.3, "seed": 0, "stop_reason": "completed", "diverged": 0, "val_loss": 2.9},
        {"variant": "a", "lr": 0.5, "seed": 0, "stop_reason": "tev", "diverged": 0, "val_loss": None},
        {"variant": "a", "lr": 0.9, "seed": 0, "stop_reason": "blowup", "diverged": 1, "val_loss": 5.5},
        {"variant": "a", "lr": 0.3, "seed": 1, "stop_reason": "completed", "diverged": 0, "val_loss": 2.95},
        {"variant": "a", "lr": 0.5, "seed": 1, "stop_reason": "completed", "diverged": 0, "val_loss": 2.8},
        {"variant": "a", "lr": 0.4, "seed": 2, "stop_reason": "completed", "diverged": 0, "val_loss": 2.85},
        {"variant": "a", "lr": 0.7, "seed": 2, "stop_reason": "blowup", "diverged": 1, "val_loss": 5.5},
        {"variant": "b", "lr": 0.2, "seed": 0, "stop_reason": "error", "diverged": 0, "val_loss": None},
    ]
    table = pd.DataFrame(rows)
    fits = tables.boundaries(table, ["a", "b"])
    s = summary(table, ["a", "b"], fits).set_index("variant")
    # The bracket over all seeds, conservatively: a TEV stop at 0.5 bounds it, whatever seed 1 did
    # there, and the largest stable LR below it is seed 2's 0.4.
    assert s.loc["a", "largest_stable_lr"] == 0.4 and s.loc["a", "smallest_divergent_lr"] == 0.5
    # The fit: where P(diverge) crosses 10%, inside its interval, below the divergences.
    a = s.loc["a"]
    assert a["max_stable_lr_low"] < a["max_stable_lr"] < a["max_stable_lr_high"] and a["max_stable_lr"] < 0.9
    assert a["seeds"] == 3 and a["trials"] == 8
    assert a["best_val_loss"] == 2.8 and a["tev_stops"] == 1 and a["diverged"] == 2
    assert pd.isna(s.loc["b", "max_stable_lr"]) and math.isnan(s.loc["b", "best_val_loss"])  # only an error


def test_with_one_seed_the_answer_is_the_bracket_not_a_point_below_a_stable_lr(tmp_path):
    """One seed cannot say how the boundary varies between seeds: the fitted point is the prior's
    as much as the data's (in the default search it sat at 0.0202, below the stable 0.0265). The
    summary, its markdown, the ratios and the parent-run metrics give the bracket instead."""
    lrs = {"baseline": (0.0094, 0.0132, 0.0187, 0.0265, 0.0375), "qk_norm": (0.1, 0.14, 0.2, 0.28, 0.4)}
    edge = {"baseline": 0.03, "qk_norm": 0.25}
    grid = edge_results(lrs, edge)
    space = spec.parse(TINY | {"variants": list(lrs)})
    fits = tables.boundaries(tables.trial_table(space, grid), list(lrs))
    assert fits["baseline"].lr < 0.0265  # the point a fit gives: below an LR that trained stably
    out = report.build(space, grid)
    s = out.files["summary.csv"].set_index("variant")
    assert list(s["basis"]) == ["bracket", "bracket"] and s["max_stable_lr"].isna().all()
    assert (s.loc["baseline", "largest_stable_lr"], s.loc["baseline", "smallest_divergent_lr"]) == (0.0265, 0.0375)
    assert "| baseline | in [0.0265, 0.0375] (bracket) |" in out.files["summary.md"]
    r = out.files["ratios.csv"].iloc[0]
    assert r["basis"] == "bracket" and math.isnan(r["ratio"])
    assert (r["ratio_low"], r["ratio_high"]) == pytest.approx((0.2 / 0.0375, 0.28 / 0.0265))
    assert "between [5.33, 10.6] (bounds from the brackets)" in out.files["summary.md"]
    # The same table is the parent run's description, the top of its page in MLflow.
    note = out.tags[report.NOTE_TAG]
    assert note.startswith("**tiny** (max_lr)\n\n") and "| baseline | in \\[0.0265, 0.0375\\] (bracket) |" in note
    assert note.replace("\\[", "[").replace("\\]", "]").endswith(out.files["summary.md"])
    assert "max_stable_lr/baseline" not in out.metrics and out.metrics["largest_stable_lr/baseline"] == 0.0265
    assert out.metrics["smallest_divergent_lr/qk_norm"] == 0.28
    # The p_diverge plot draws the bracket, with no fitted point: it renders.
    fn, args = out.files["p_diverge.png"]
    fn(*args, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 10_000


TINY = {
    "name": "tiny",
    "strategy": "max_lr",
    "variants": ["baseline", "mlra"],
    "trial": {
        "n_layer": 2,
        "n_head": 2,
        "d_model": 32,
        "seq_len": 32,
        "batch_size": 4,
        "steps": 20,
        "warmup_steps": 5,
        "report_every": 10,
        "eval_every": 20,
        "checkpoint_every": 0,
        "eval_batches": 2,
    },
    "params": {"lr": {"loguniform": [1e-3, 30.0]}},
    "max_lr": {"ratio": 1.25, "slots": 1, "max_trials": 2, "seeds": 0},  # boundary seeds: test_bracket.py
    "resources": {"max_concurrent": 2},
}


def write_space(tmp_path, **changes) -> str:
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump({**TINY, **changes}))
    return str(path)


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--storage", "/proc/no-such-place"], "storage: cannot write"),
        (["--tracking-uri", "http://127.0.0.1:9"], "tracking_uri: tracking server http://127.0.0.1:9 is not reachable"),
        (["--tracking-uri", "file:./mlruns"], "MLflow 3 refuses the file store"),
        (["--max-concurrent", "0"], "--max-concurrent: must be >= 1"),
    ],
)
def test_bad_input_exits_2_with_one_message_before_ray(tmp_path, capsys, args, fragment):
    import ray

    argv = (
        ["--space", write_space(tmp_path)]
        + (["--storage", str(tmp_path / "s")] if "--storage" not in args else [])
        + args
    )
    assert search.main(argv) == 2
    err = capsys.readouterr().err
    assert fragment in err and err.startswith("error: ")
    assert not ray.is_initialized()


def test_missing_data_file_is_named(tmp_path, capsys):
    space = write_space(tmp_path, trial={**TINY["trial"], "data": str(tmp_path / "nowhere.jsonl")})
    assert search.main(["--space", space, "--storage", str(tmp_path / "s")]) == 2
    assert "trial.data:" in capsys.readouterr().err


def test_dry_run_prints_the_plan_and_starts_nothing(tmp_path, capsys):
    assert search.main(["--space", write_space(tmp_path), "--storage", str(tmp_path / "s"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "tiny" in out and "up to 4" in out and "sqlite:///" in out
    assert not list((tmp_path / "s").glob("tiny-*"))


def mlflow_runs(storage, name):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{storage / 'mlflow.db'}")
    exp = client.get_experiment_by_name(name)
    runs = client.search_runs([exp.experiment_id]) if exp else []
    return (
        client,
        [r for r in runs if "mlflow.parentRunId" not in r.data.tags],
        [r for r in runs if "mlflow.parentRunId" in r.data.tags],
    )


def run_search_in_process(space, storage):
    import ray

    try:
        assert search.main(["--space", space, "--storage", str(storage)]) == 0
    finally:
        ray.shutdown()


@pytest.mark.slow
def test_end_to_end_search_writes_parent_and_child_runs_to_mlflow(tmp_path, capsys):
    # With an LR range test per variant before its bracket (tunestab/bracket.py).
    storage = tmp_path / "results"
    run_search_in_process(write_space(tmp_path, max_lr={**TINY["max_lr"], "range_test": True}), storage)
    out = capsys.readouterr().out
    assert "| baseline |" in out and "| mlra |" in out and "mlflow ui --backend-store-uri" in out
    assert "range test failed at" in out

    client, parents, children = mlflow_runs(storage, "tiny")
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    # The printed link opens the model-training runs view with the search's saved chart view.
    exp = parent.info.experiment_id
    assert (
        f"http://127.0.0.1:5000/#/experiments/{exp}/runs?workflowType=machine_learning"
        f"&compareRunsMode=CHART&viewStateShareKey=tunestab-{parent.info.run_id}"
    ) in out
    # ... and a link to the parent run, which holds the answer: its description is the summary.
    assert f"http://127.0.0.1:5000/#/experiments/{exp}/runs/{parent.info.run_id}?workflowType=machine_learning" in out
    assert "| baseline |" in parent.data.tags["mlflow.note.content"]
    view = mlflow_view.read_state(
        client.get_experiment(exp).tags[f"mlflow.sharedViewState.tunestab-{parent.info.run_id}"]
    )
    assert [s["name"] for s in view["compareRunSections"]][:4] == ["answer", "Stability", "Model metrics", "layer_0"]
    # What the filter selects is this search's runs, each of them, and its parent, whose row in
    # the table holds the answer in one line, in a group of its own.
    listed = client.search_runs([exp], filter_string=view["searchFilter"])
    assert {r.info.run_id for r in listed} == {parent.info.run_id} | {c.info.run_id for c in children}
    assert parent.data.tags["variant"] == "(the answer)"
    assert parent.data.tags["answer"].startswith("baseline ") and "; mlra " in parent.data.tags["answer"]
    assert parent.data.tags["outcome"].split(", ")[0].split(" ")[1] in ("stable", "diverged", "stopped_by_tev")
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"space.yaml", "summary.md", "summary.csv", "trials.csv", "loss_vs_lr.png", "tev_curves.png"} <= artifacts
    # Artifacts sit beside the database in the storage folder, not in ./mlruns of the caller.
    assert list((storage / "mlartifacts").rglob("summary.md")) and not Path("mlruns").exists()
    trials = pd.read_csv(next(storage.glob("tiny-*")) / "trials.csv")
    assert len(children) == len(trials) == 6  # a range test and max_trials 2, x 2 variants
    ranged = trials[trials["lr_schedule"] == "range"]
    assert sorted(ranged["variant"]) == ["baseline", "mlra"] and (ranged["lr"] == 30.0).all()
    assert ((ranged["range_lr"] > 1e-3) & (ranged["range_lr"] <= 30.0)).all()
    assert trials[trials["lr_schedule"] != "range"]["range_lr"].isna().all()
    for child in children:
        tags = child.data.tags
        assert tags["mlflow.parentRunId"] == parent.info.run_id
        assert tags["variant"] in ("baseline", "mlra")
        assert tags["stop_reason"] in ("completed", "blowup", "nonfinite", "no_progress", "tev", "range_end")
        assert tags["diverged"] in ("0", "1") and int(tags["stop_step"]) > 0
        # The outcome tag and trials.csv say the same, for every member.
        reason, stable = tags["stop_reason"], tags["stop_reason"] == "completed" and tags["diverged"] == "0"
        assert tags["outcome"] == ("stopped_by_tev" if reason == "tev" else "stable" if stable else "diverged")
        assert trials.set_index("trial_id").loc[tags["member_id"], "outcome"] == tags["outcome"]
        assert float(child.data.params["lr"]) > 0 and child.data.params["n_layer"] == "2"
        # The answer charts' points: log10 LR and, under the variant's name, failed and val_loss;
        # a range test's LR is where its sweep began, so it has none.
        answer = {k: v for k, v in child.data.metrics.items() if k.startswith("answer/")}
        if tags["stop_reason"] == "range_end" or child.data.params.get("lr_schedule") == "range":
            assert answer == {}
        else:
            lr, variant = float(child.data.params["lr"]), tags["variant"]
            assert answer["answer/log10_lr"] == pytest.approx(math.log10(lr))
            assert answer[f"answer/{variant} failed"] == float(tags["outcome"] != "stable")
            assert set(answer) <= {"answer/log10_lr", f"answer/{variant} failed", f"answer/{variant} val_loss"}
        history = client.get_metric_history(child.info.run_id, "loss")
        assert [m.step for m in history][:1] == [10] and all(math.isfinite(m.value) for m in history)
    summary_csv = pd.read_csv(next(storage.glob("tiny-*")) / "summary.csv").set_index("variant")
    for variant, row in summary_csv.iterrows():
        # The fit and the bracket count the fixed-LR trials; the range test stands beside them.
        assert row["trials"] == 2
        assert row["range_test_lr"] == pytest.approx(ranged.set_index("variant").loc[variant, "range_lr"])
        assert parent.data.metrics[f"range_test_lr/{variant}"] == pytest.approx(row["range_test_lr"])
        for key in ("max_stable_lr", "max_stable_lr_low", "max_stable_lr_high"):
            if pd.isna(row[key]):  # no boundary between the LRs tried: no metric, never NaN
                assert f"{key}/{variant}" not in parent.data.metrics
            else:
                assert parent.data.metrics[f"{key}/{variant}"] == pytest.approx(row[key])


def test_tune_reports_the_best_configuration_and_stable_lr_per_configuration():

    from tunestab.strategies.tune import best_configs

    space = SimpleNamespace(params=[SimpleNamespace(name="lr"), SimpleNamespace(name="mlra_rank")])
    table = pd.DataFrame(
        [
            {"variant": "mlra", "mlra_rank": 4, "lr": 0.1, "stop_reason": "completed", "diverged": 0, "val_loss": 3.2},
            {"variant": "mlra", "mlra_rank": 4, "lr": 0.3, "stop_reason": "completed", "diverged": 0, "val_loss": 3.0},
            {"variant": "mlra", "mlra_rank": 8, "lr": 0.2, "stop_reason": "completed", "diverged": 0, "val_loss": 3.1},
            {"variant": "mlra", "mlra_rank": 8, "lr": 0.9, "stop_reason": "tev", "diverged": 0, "val_loss": None},
        ]
    )
    best, per = best_configs(table, space)
    assert best == {"variant": "mlra", "mlra_rank": 4, "lr": 0.3, "val_loss": 3.0}
    assert dict(zip(per["mlra_rank"], per["max_stable_lr"])) == {4: 0.3, 8: 0.2}


def test_lr_sensitivity_follows_wortsman_with_the_l0_clip_and_seed_mean():

    from tunestab.strategies.sweep import lr_sensitivity

    space = SimpleNamespace(params=[SimpleNamespace(name="lr"), SimpleNamespace(name="seed")])
    rows = []
    # a: stable at all three LRs; two seeds whose losses average to 3.0, 2.5, 2.8.
    for lr, losses in ((0.1, (3.1, 2.9)), (0.3, (2.4, 2.6)), (1.0, (2.8, 2.8))):
        for seed, loss in enumerate(losses):
            rows.append(
                {
                    "variant": "a",
                    "lr": lr,
                    "seed": seed,
                    "stop_reason": "completed",
                    "diverged": 0,
                    "val_loss": loss,
                    "loss_init": 5.5,
                }
            )
    # b: learns at 0.1, diverges at 0.3 (val_loss = l0) and is stopped by TEV at 1.0 (no val_loss).
    rows += [
        {
            "variant": "b",
            "lr": 0.1,
            "seed": 0,
            "stop_reason": "completed",
            "diverged": 0,
            "val_loss": 3.0,
            "loss_init": 5.5,
        },
        {
            "variant": "b",
            "lr": 0.3,
            "seed": 0,
            "stop_reason": "blowup",
            "diverged": 1,
            "val_loss": 5.5,
            "loss_init": 5.5,
        },
        {"variant": "b", "lr": 1.0, "seed": 0, "stop_reason": "tev", "diverged": 0, "val_loss": None, "loss_init": 5.5},
    ]
    s = lr_sensitivity(pd.DataFrame(rows), space).set_index("variant")
    assert s.loc["a", "lr_sensitivity"] == pytest.approx((3.0 + 2.5 + 2.8) / 3 - 2.5)
    assert s.loc["a", "best_lr"] == 0.3 and s.loc["a", "lrs"] == 3
    assert s.loc["b", "lr_sensitivity"] == pytest.approx((3.0 + 5.5 + 5.5) / 3 - 3.0)
    assert s.loc["b", "lr_sensitivity"] > s.loc["a", "lr_sensitivity"]


def test_sweep_cells_average_seeds_and_count_divergences_per_cell():

    from tunestab.strategies.sweep import sweep_cells
    from tunestab.tables import spearman

    space = SimpleNamespace(params=[SimpleNamespace(name="n_layer"), SimpleNamespace(name="seed")])
    rows = [
        {
            "trial_id": f"a{seed}",
            "variant": "a",
            "n_layer": 6,
            "seed": seed,
            "stop_reason": "completed",
            "diverged": 0,
            "val_loss": math.log(ppl),
            "tev_mean": tev,
            "tev_std": 0.1,
            "tev_stop_step": None,
        }
        for seed, ppl, tev in ((0, 20.0, 1.0), (1, 30.0, 2.0))
    ]
    rows += [
        {
            "trial_id": "a2",
            "variant": "a",
            "n_layer": 6,
            "seed": 2,
            "stop_reason": "blowup",
            "diverged": 1,
            "val_loss": 5.5,
            "tev_mean": 9.0,
            "tev_std": 5.0,
            "tev_stop_step": 40,
        },
        {
            "trial_id": "b0",
            "variant": "a",
            "n_layer": 12,
            "seed": 0,
            "stop_reason": "tev",
            "diverged": 0,
            "val_loss": None,
            "tev_mean": 3.0,
            "tev_std": 2.0,
            "tev_stop_step": 30,
        },
    ]
    cells = sweep_cells(pd.DataFrame(rows), space, {"a0": 0.5, "a1": 1.0, "a2": -1.0}).set_index("n_layer")
    six = cells.loc[6]
    assert six["seeds"] == 3 and six["diverged"] == 1 and six["tev_flagged"] == 1
    # mu_TEV and perplexity over the two runs that did not diverge; rho over all three.
    assert six["tev_mean"] == 1.5 and six["val_ppl"] == pytest.approx(25.0) and six["spearman_tev_gradvar"] == 0.5 / 3
    assert cells.loc[12, "diverged"] == 1 and math.isnan(cells.loc[12, "val_ppl"])
    assert spearman([1, 2, 3, 4], [1, 4, 9, 100]) == 1.0 and spearman([1, 2, 3], [3, 2, 1]) == -1.0
    assert math.isnan(spearman([1, 2], [2, 1]))


def test_params_vs_loss_plot_is_written(tmp_path):
    from tunestab.plots import plot_params_vs_loss

    table = pd.DataFrame(
        [
            {
                "variant": "mlra",
                "mlra_rank": r,
                "lr": lr,
                "stop_reason": sr,
                "diverged": 0,
                "val_loss": vl,
                "loss_init": 5.5,
            }
            for r, lr, sr, vl in ((4, 0.1, "completed", 3.2), (16, 0.3, "completed", 3.0), (32, 2.0, "tev", None))
        ]
    )
    plot_params_vs_loss(table, ["mlra_rank"], tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_resume_after_sigkill_finishes_the_search_without_duplicate_mlflow_runs(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    import ray

    space = write_space(
        tmp_path,
        trial={**TINY["trial"], "steps": 300, "checkpoint_every": 100, "eval_every": 300},
        resources={"max_concurrent": 1},
    )
    storage = tmp_path / "results"
    log = open(tmp_path / "search.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tunestab.search", "--space", space, "--storage", str(storage)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        # Kill the search once one trial has finished and the next is past its first checkpoint.
        deadline = time.time() + 300
        while time.time() < deadline:
            assert proc.poll() is None, (tmp_path / "search.log").read_text()[-3000:]
            # The state file is written after the search has created its MLflow tables; reading
            # the database before that would race the search's own schema migration.
            if list(storage.glob(f"tiny-*/{run_dir.STATE_FILE}")):
                _, _, children = mlflow_runs(storage, "tiny")
                done = [r for r in children if r.info.status == "FINISHED"]
                going = [r for r in children if r.info.status == "RUNNING" and r.data.metrics.get("step", 0) >= 110]
                if done and going:
                    break
            time.sleep(0.5)
        else:
            pytest.fail("the search never got one trial done and one past a checkpoint")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    in_flight = going[0].data.tags["member_id"]

    try:
        assert search.main(["--space", space, "--storage", str(storage), "--resume"]) == 0
    finally:
        ray.shutdown()

    client, parents, children = mlflow_runs(storage, "tiny")
    trials = pd.read_csv(next(storage.glob("tiny-*")) / "trials.csv")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    # Every member once in MLflow, each finished, none opened twice.
    ids = [r.data.tags["member_id"] for r in children]
    assert len(ids) == len(set(ids)) == len(trials) == 4
    assert all(r.info.status == "FINISHED" for r in children)
    for r in children:
        steps = [m.step for m in client.get_metric_history(r.info.run_id, "loss")]
        assert steps == sorted(set(steps)), f"steps logged twice in {r.info.run_id}: {steps}"
    # The trial in flight continued from its checkpoint (step 100 or 200), not from scratch.
    resumed = next(r for r in children if r.data.tags["member_id"] == in_flight)
    assert resumed.data.metrics["bookkeeping/resumed_from"] in (100, 200)
    assert "resumed_from" not in resumed.data.metrics  # bookkeeping apart from the science

    # The same trials, with the same outcomes, as a search that was never interrupted.
    run_search_in_process(space, tmp_path / "uninterrupted")
    reference = pd.read_csv(next((tmp_path / "uninterrupted").glob("tiny-*")) / "trials.csv")
    columns = ["variant", "lr", "stop_reason", "diverged", "step"]
    assert trials.sort_values(["variant", "lr"])[columns].to_dict("records") == reference.sort_values(
        ["variant", "lr"]
    )[columns].to_dict("records")
    assert sorted(trials.val_loss) == pytest.approx(sorted(reference.val_loss), rel=1e-6)


@pytest.mark.slow
def test_tune_strategy_reports_best_configuration_to_mlflow(tmp_path, capsys):
    space = write_space(
        tmp_path,
        strategy="tune",
        variants=["mlra"],
        params={"lr": {"loguniform": [1e-3, 0.3]}, "mlra_rank": {"int": [2, 16]}},
        tune={"sampler": "tpe", "num_samples": 3, "seed": 1},
    )
    storage = tmp_path / "results"
    run_search_in_process(space, storage)
    assert "Best configuration: {'variant': 'mlra', 'mlra_rank':" in capsys.readouterr().out

    client, (parent,), children = mlflow_runs(storage, "tiny")
    assert len(children) == 3
    ranks = {int(r.data.params["mlra_rank"]) for r in children}
    assert all(2 <= k <= 16 for k in ranks)
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"params_vs_loss.png", "max_stable_lr_per_config.csv", "trials.csv"} <= artifacts
    trials = pd.read_csv(next(storage.glob("tiny-*")) / "trials.csv")
    stable = trials[(trials.stop_reason == "completed") & (trials.diverged == 0)]
    assert parent.data.metrics["best_val_loss"] == pytest.approx(stable.val_loss.min())
    assert f"'mlra_rank': {int(stable.loc[stable.val_loss.idxmin(), 'mlra_rank'])}" in parent.data.tags["best_config"]


@pytest.mark.slow
def test_sweep_strategy_runs_the_grid_and_logs_lr_sensitivity(tmp_path):
    space = write_space(
        tmp_path,
        strategy="sweep",
        variants=["baseline", "qk_norm"],
        params={"lr": {"grid": [0.003, 0.03]}},
        scheduler={"type": "none"},
    )
    storage = tmp_path / "results"
    run_search_in_process(space, storage)

    client, (parent,), children = mlflow_runs(storage, "tiny")
    assert sorted((r.data.tags["variant"], float(r.data.params["lr"])) for r in children) == [
        ("baseline", 0.003),
        ("baseline", 0.03),
        ("qk_norm", 0.003),
        ("qk_norm", 0.03),
    ]
    assert {"lr_sensitivity.csv", "cells.csv"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    sens = pd.read_csv(next(storage.glob("tiny-*")) / "lr_sensitivity.csv").set_index("variant")
    for v in ("baseline", "qk_norm"):
        assert parent.data.metrics[f"lr_sensitivity/{v}"] == pytest.approx(sens.loc[v, "lr_sensitivity"])
        assert sens.loc[v, "lr_sensitivity"] >= 0 and sens.loc[v, "lrs"] == 2


def test_tune_over_seeds_scores_each_configuration_by_its_mean_and_spread():
    space = spec.parse(
        {
            **TINY,
            "strategy": "tune",
            "tune": {"seeds": 3},
            "params": {"mlra_rank": {"int": [2, 8]}, "lr": {"loguniform": [1e-3, 0.1]}},
        }
    )
    rows = []
    for rank, losses in ((2, [3.0, 3.1, 2.9]), (4, [2.5, 2.6, None]), (8, [2.7, 2.75, 2.65])):
        for seed, loss in enumerate(losses):
            rows.append(
                {
                    "variant": "mlra",
                    "mlra_rank": rank,
                    "lr": 0.01,
                    "seed": seed,
                    "val_loss": loss,
                    "loss_init": 5.5,
                    "stop_reason": "completed" if loss else "blowup",
                    "diverged": int(not loss),
                }
            )
    scores = config_scores(pd.DataFrame(rows), space)
    # Rank 4's diverged seed counts at l0: its mean is (2.5 + 2.6 + 5.5) / 3, worst of the three.
    assert list(scores["mlra_rank"]) == [8, 2, 4] and list(scores["seeds"]) == [3, 3, 3]
    assert scores.iloc[0]["objective_mean"] == pytest.approx(2.7) and scores.iloc[2]["diverged"] == 1
    assert separated(scores) is True  # 2.7 +- 0.05 against 3.0 +- 0.1
    close = scores.copy()
    close.loc[1, "objective_mean"] = 2.8
    assert separated(close) is False
    assert any(
        "params.seed" in p
        for p in problems_of_space(
            {**TINY, "strategy": "tune", "tune": {"seeds": 3}, "params": {"seed": {"choice": [0, 1]}}}
        )
    )


def test_the_console_says_when_it_lists_only_the_best_configurations():
    scores = pd.DataFrame({"softcap": range(SHOWN + 2), "objective_mean": [2.0 + i / 10 for i in range(SHOWN + 2)]})
    head, *rows = scores_text(scores, 3).strip().splitlines()
    assert (
        head
        == f"Configurations over 3 seeds, best mean objective first (the best {SHOWN} of {SHOWN + 2}; all in configs.csv):"
    )
    assert len(rows) == 1 + SHOWN  # the column names, then the best SHOWN
    head, *rows = scores_text(scores.head(3), 3).strip().splitlines()
    assert head == "Configurations over 3 seeds, best mean objective first:" and len(rows) == 4


def problems_of_space(raw) -> list[str]:
    with pytest.raises(spec.SpecError) as e:
        spec.parse(raw)
    return e.value.problems


def test_the_seed_repeater_runs_each_configuration_at_consecutive_seeds_and_reports_their_mean():
    from ray.tune.search import Searcher

    from tunestab.searchers import SeedRepeater

    class Fixed(Searcher):
        def __init__(self):
            super().__init__(metric="objective", mode="min")
            self.n, self.seen = 0, []

        def suggest(self, trial_id):
            self.n += 1
            return {"mlra_rank": self.n}

        def on_trial_complete(self, trial_id, result=None, error=False):
            self.seen.append(result["objective"])

    inner = Fixed()
    rep = SeedRepeater(inner, repeat=3, base_seed=5)
    configs = [rep.suggest(f"t{i}") for i in range(6)]
    assert [(c["mlra_rank"], c["seed"]) for c in configs] == [(1, 5), (1, 6), (1, 7), (2, 5), (2, 6), (2, 7)]
    assert all("__trial_index__" not in c for c in configs)
    for i, value in enumerate([3.0, 2.0, 1.0]):
        rep.on_trial_complete(f"t{i}", {"objective": value})
    assert inner.seen == [2.0]  # the first configuration's mean over its three seeds


def test_scale_report_fits_each_variant_predicts_the_target_and_logs_it_on_the_parent_run(tmp_path, capsys):
    """report.report on a scale search's results (Tune's Result objects stood in for, the MLflow
    store real): each variant's max stable LR falls as N^-0.5 for baseline and stays flat for
    qk_norm, whose attention logits do not grow with the LR; the target is measured too."""

    from tunestab import scaling
    from tunestab.tracking import start_parent
    from tunestab.tracking_store import artifact_location

    space = spec.parse(
        {
            **TINY,
            "strategy": "scale",
            "variants": ["baseline", "qk_norm"],
            "max_lr": {"seeds": 3},
            "scale": {
                "sizes": {"w16": {"d_model": 16}, "w32": {"d_model": 32}, "w48": {"d_model": 48}},
                "target": {"w64": {"d_model": 64}},
                "measure_target": True,
            },
        }
    )
    n = {
        name: scaling.non_embedding_params(space.trial_config("baseline", **f))
        for name, f in {**space.scale.sizes, **space.scale.target}.items()
    }
    edge = {
        (v, name): 0.2 * (n[name] / n["w16"]) ** (-0.5 if v == "baseline" else 0.0)
        for v in space.variants
        for name in n
    }
    steps = pd.DataFrame({"step": [10, 20], "tev_mean": [0.02, 0.021], "tev_std": [0.001, 0.001]})
    grid = []
    for (v, name), e in edge.items():
        for seed in range(4):
            for k in range(-4, 5):
                lr = e * 1.25 ** (k + 0.25 * seed)
                stable = lr < e
                logit = math.exp(2 * math.log(lr) + 0.5 * math.log(n[name]) + 5) if v == "baseline" else 30.0
                grid.append(
                    SimpleNamespace(
                        config={
                            "variant": v,
                            "lr": lr,
                            "seed": seed,
                            "size": name,
                            **space.scale.arms([v])[f"{v}@{name}"],
                        },
                        metrics={
                            "trial_id": f"{v}{name}{seed}{k}",
                            "stop_reason": "completed" if stable else "blowup",
                            "diverged": int(not stable),
                            "step": 20,
                            "loss": 2.0,
                            "val_loss": 2.0,
                            "loss_init": 5.5,
                            "tev_mean": 0.02,
                            "tev_std": 0.001,
                            "attn_logit_max": logit,
                        },
                        error=None,
                        metrics_dataframe=steps,
                    )
                )
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = start_parent(uri, "scale", "run", {}, artifacts=artifact_location(uri, str(tmp_path)))
    report.report(space, grid, uri, parent, tmp_path)

    out = capsys.readouterr().out
    t = pd.read_csv(tmp_path / "scale.csv")
    target = t[t.role == "target"].set_index("variant")
    for v in space.variants:
        measured, low, high = target.loc[v, ["max_stable_lr", "predicted_low", "predicted_high"]]
        assert low <= edge[(v, "w64")] <= high and low <= measured <= high
        assert f"{v}: the target's measured max stable LR lies inside the prediction interval: yes" in out
    assert "baseline: max stable LR ~ N^-0.5" in out
    # Three sizes: each predicted by the fit through the other two, in the table and the summary.
    fitted = t[t.role == "fit"]
    assert fitted["loso_predicted"].notna().all() and fitted["loso_inside"].all()
    assert t[t.role == "target"]["loso_predicted"].isna().all()
    assert "leave one size out, each predicted by the fit through the others: w16 " in out
    assert math.isnan(target.loc["qk_norm", "logit_predicted"])
    assert target.loc["baseline", "logit_predicted"] == pytest.approx(
        math.exp((math.log(1e4) - 0.5 * math.log(n["w64"]) - 5) / 2), rel=0.03
    )
    trials = pd.read_csv(tmp_path / "trials.csv")
    assert set(trials["size"]) == set(n) and list(trials["variant"].unique()) == ["baseline", "qk_norm"]

    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    metrics = client.get_run(parent).data.metrics
    for v in space.variants:
        assert metrics[f"predicted_max_lr/{v}"] == pytest.approx(target.loc[v, "predicted"])
        assert metrics[f"max_stable_lr/{v}/w32"] > 0
    assert "logit_predicted_max_lr/qk_norm" not in metrics and "logit_predicted_max_lr/baseline" in metrics
    assert {"frontier.png", "scale.csv", "scale.md", "p_diverge.png"} <= {a.path for a in client.list_artifacts(parent)}
