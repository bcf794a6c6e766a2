"""The search command: objectives, checks before Ray starts, the summary, and an end-to-end
search on CPU read back from a SQLite MLflow store."""

import math

import pandas as pd
import pytest
import yaml

from tunestab import search
from tunestab.analysis import summary


def test_objectives_score_how_a_trial_ended():
    done = {"stop_reason": "completed", "diverged": 0, "val_loss": 3.1, "loss_init": 5.5}
    assert search.objectives(done, 0.2) == {"stable_lr": 0.2, "objective": 3.1}
    blown = {"stop_reason": "blowup", "diverged": 1, "val_loss": 5.5, "loss_init": 5.5}
    assert search.objectives(blown, 0.9) == {"stable_lr": 0.0, "objective": 5.5}
    # Stopped by TEV: predicted divergent, scored like a divergence, never NaN.
    tev = {"stop_reason": "tev", "diverged": 0, "loss": 7.0, "loss_init": 5.5}
    assert search.objectives(tev, 0.9) == {"stable_lr": 0.0, "objective": 5.5}
    no_progress = {"stop_reason": "no_progress", "diverged": 1, "val_loss": 5.6, "loss_init": 5.5}
    assert search.objectives(no_progress, 0.5)["stable_lr"] == 0.0


def test_summary_brackets_each_variant_conservatively():
    table = pd.DataFrame([
        {"variant": "a", "lr": 0.1, "stop_reason": "completed", "diverged": 0, "val_loss": 3.0},
        {"variant": "a", "lr": 0.3, "stop_reason": "completed", "diverged": 0, "val_loss": 2.9},
        {"variant": "a", "lr": 0.5, "stop_reason": "tev", "diverged": 0, "val_loss": None},
        {"variant": "a", "lr": 0.9, "stop_reason": "blowup", "diverged": 1, "val_loss": 5.5},
        {"variant": "b", "lr": 0.2, "stop_reason": "error", "diverged": 0, "val_loss": None},
    ])
    s = summary(table, ["a", "b"]).set_index("variant")
    assert s.loc["a", "max_stable_lr"] == 0.3 and s.loc["a", "smallest_divergent_lr"] == 0.5
    assert s.loc["a", "best_val_loss"] == 2.9 and s.loc["a", "tev_stops"] == 1 and s.loc["a", "diverged"] == 1
    assert pd.isna(s.loc["b", "max_stable_lr"]) and math.isnan(s.loc["b", "best_val_loss"])


TINY = {
    "name": "tiny", "strategy": "max_lr", "variants": ["baseline", "mlra"],
    "trial": {"n_layer": 2, "n_head": 2, "d_model": 32, "seq_len": 32, "batch_size": 4, "steps": 20,
              "warmup_steps": 5, "report_every": 10, "eval_every": 20, "checkpoint_every": 0, "eval_batches": 2},
    "params": {"lr": {"loguniform": [1e-3, 30.0]}},
    "max_lr": {"ratio": 1.25, "slots": 1, "max_trials": 2},
    "resources": {"max_concurrent": 2},
}


def write_space(tmp_path, **changes) -> str:
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump({**TINY, **changes}))
    return str(path)


@pytest.mark.parametrize("args, fragment", [
    (["--storage", "/proc/no-such-place"], "storage: cannot write"),
    (["--tracking-uri", "http://127.0.0.1:9"], "tracking_uri: tracking server http://127.0.0.1:9 is not reachable"),
    (["--tracking-uri", "file:./mlruns"], "MLflow 3 refuses the file store"),
    (["--max-concurrent", "0"], "--max-concurrent: must be >= 1"),
])
def test_bad_input_exits_2_with_one_message_before_ray(tmp_path, capsys, args, fragment):
    import ray

    argv = ["--space", write_space(tmp_path)] + (["--storage", str(tmp_path / "s")] if "--storage" not in args else []) + args
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


@pytest.mark.slow
def test_end_to_end_search_writes_parent_and_child_runs_to_mlflow(tmp_path, capsys):
    import ray
    from mlflow.tracking import MlflowClient

    storage = tmp_path / "results"
    try:
        assert search.main(["--space", write_space(tmp_path), "--storage", str(storage)]) == 0
    finally:
        ray.shutdown()
    out = capsys.readouterr().out
    assert "| baseline |" in out and "| mlra |" in out and "mlflow ui --backend-store-uri" in out

    client = MlflowClient(f"sqlite:///{storage / 'mlflow.db'}")
    exp = client.get_experiment_by_name("tiny")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"space.yaml", "summary.md", "summary.csv", "trials.csv", "loss_vs_lr.png", "tev_curves.png"} <= artifacts
    trials = pd.read_csv(next(storage.glob("tiny-*")) / "trials.csv")
    assert len(children) == len(trials) == 4  # max_trials 2 x 2 variants
    for child in children:
        tags = child.data.tags
        assert tags["mlflow.parentRunId"] == parent.info.run_id
        assert tags["variant"] in ("baseline", "mlra")
        assert tags["stop_reason"] in ("completed", "blowup", "nonfinite", "no_progress", "tev")
        assert tags["diverged"] in ("0", "1") and int(tags["stop_step"]) > 0
        assert float(child.data.params["lr"]) > 0 and child.data.params["n_layer"] == "2"
        history = client.get_metric_history(child.info.run_id, "loss")
        assert [m.step for m in history][:1] == [10] and all(math.isfinite(m.value) for m in history)
    stable = trials[(trials.stop_reason == "completed") & (trials.diverged == 0)]
    for variant in stable.variant.unique():
        assert parent.data.metrics[f"max_stable_lr/{variant}"] == stable[stable.variant == variant].lr.max()


def test_tune_reports_the_best_configuration_and_stable_lr_per_configuration():
    from types import SimpleNamespace

    from tunestab.analysis import best_configs

    space = SimpleNamespace(params=[SimpleNamespace(name="lr"), SimpleNamespace(name="mlra_rank")])
    table = pd.DataFrame([
        {"variant": "mlra", "mlra_rank": 4, "lr": 0.1, "stop_reason": "completed", "diverged": 0, "val_loss": 3.2},
        {"variant": "mlra", "mlra_rank": 4, "lr": 0.3, "stop_reason": "completed", "diverged": 0, "val_loss": 3.0},
        {"variant": "mlra", "mlra_rank": 8, "lr": 0.2, "stop_reason": "completed", "diverged": 0, "val_loss": 3.1},
        {"variant": "mlra", "mlra_rank": 8, "lr": 0.9, "stop_reason": "tev", "diverged": 0, "val_loss": None},
    ])
    best, per = best_configs(table, space)
    assert best == {"variant": "mlra", "mlra_rank": 4, "lr": 0.3, "val_loss": 3.0}
    assert dict(zip(per["mlra_rank"], per["max_stable_lr"])) == {4: 0.3, 8: 0.2}
