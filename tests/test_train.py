"""`python -m tunestab.train`: one trial from the command line, bad input, and what it needs
installed."""

import json
import math
import socket
import subprocess
import sys

from tunestab.train import main

SMALL = [
    "--set",
    "n_layer=2",
    "--set",
    "d_model=32",
    "--set",
    "n_head=2",
    "--set",
    "batch_size=8",
    "--set",
    "seq_len=32",
]


def all_finite(report: dict) -> bool:
    return all(math.isfinite(v) for v in report.values() if isinstance(v, (int, float)))


def reports_of(argv, capsys) -> tuple[int, list[dict]]:
    rc = main(argv)
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    return rc, lines


def test_a_run_completes_and_reports_every_metric(capsys):
    rc, reports = reports_of(
        [
            "--set",
            "steps=20",
            "--set",
            "n_layer=2",
            "--set",
            "d_model=32",
            "--set",
            "n_head=2",
            "--set",
            "batch_size=8",
            "--set",
            "seq_len=32",
        ],
        capsys,
    )
    assert rc == 0 and [r["step"] for r in reports] == [10, 20]
    last = reports[-1]
    for name in (
        "loss",
        "val_loss",
        "tev_mean",
        "tev_std",
        "grad_norm",
        "attn_logit_max",
        "out_norm_qkv",
        "out_norm_proj",
        "out_norm_fc1",
        "out_norm_fc2",
        "lr",
        "step",
        "tokens",
        "tokens_per_s",
        "diverged",
        "stop_reason",
        "layer_1/out_norm_fc2",
    ):
        assert name in last, name
    assert last["stop_reason"] == "completed" and last["diverged"] == 0
    assert last["val_loss"] < last["loss_init"] and last["tokens"] == 20 * 8 * 32
    assert all(all_finite(r) for r in reports)


def test_lr_10_diverges_cleanly_with_exit_code_0(capsys):
    rc, reports = reports_of(
        [
            "--set",
            "lr=10",
            "--set",
            "n_layer=2",
            "--set",
            "d_model=32",
            "--set",
            "n_head=2",
            "--set",
            "batch_size=8",
            "--set",
            "seq_len=32",
            "--set",
            "steps=200",
            "--set",
            "warmup_steps=5",
            "--set",
            "report_every=5",
        ],
        capsys,
    )
    assert rc == 0
    last = reports[-1]
    assert last["diverged"] == 1 and last["stop_reason"] in ("nonfinite", "blowup")
    assert last["step"] < 200  # the trial ended at divergence, not at its budget
    assert all(all_finite(r) for r in reports)  # sentinels, never NaN or inf


def test_offline_default_works_with_the_network_unreachable(monkeypatch, tmp_path, capsys):
    def refuse(*args, **kwargs):
        raise OSError("network unreachable (test)")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    rc, reports = reports_of(
        [
            "--set",
            f"data_cache={tmp_path}",
            "--set",
            "steps=10",
            "--set",
            "n_layer=1",
            "--set",
            "d_model=32",
            "--set",
            "n_head=2",
            "--set",
            "batch_size=4",
        ],
        capsys,
    )
    assert rc == 0 and reports[-1]["stop_reason"] == "completed"


def test_bad_input_is_one_clear_message_and_exit_2(capsys, tmp_path):
    missing = tmp_path / "no_such_corpus.txt"
    assert main(["--set", f"data={missing}"]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "Traceback" not in err
    assert main(["--variant", "gpt5", "--set", "mlra_rank=-1", "--set", "nonsense"]) == 2
    err = capsys.readouterr().err
    assert "--set 'nonsense'" in err and err.count("\n  - ") == 1  # the command line problem first
    assert main(["--variant", "gpt5", "--set", "mlra_rank=-1"]) == 2
    err = capsys.readouterr().err
    assert "variant:" in err and "mlra_rank:" in err


def test_the_runner_needs_neither_ray_nor_mlflow():
    """A bare CUDA image has torch and little else: the single-process runner must not import
    what only the search needs. Those packages are made unimportable in a fresh interpreter."""
    blocked = ("ray", "mlflow", "optuna", "datasets", "pandas", "matplotlib")
    # None in sys.modules is how CPython marks a module as absent: `import` raises
    # ModuleNotFoundError and importlib.util.find_spec answers None, as for one not installed.
    code = f"""
import runpy, sys
for name in {blocked!r}:
    sys.modules[name] = None
sys.argv = ["tunestab.train"] + {SMALL + ["--set", "steps=4", "--set", "report_every=2"]!r}
runpy.run_module("tunestab.train", run_name="__main__")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    reports = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert [r["step"] for r in reports] == [2, 4] and reports[-1]["stop_reason"] == "completed"


def test_bf16_autocast_runs_on_the_cpu_when_asked(capsys):
    """`--set bf16=true` runs the CUDA path's bf16 autocast on a CPU (None keeps the per-device
    default, fp32 here): the losses move off the fp32 run's, and stay finite."""
    argv = SMALL + ["--set", "steps=10", "--set", "report_every=5"]
    _, fp32 = reports_of(argv, capsys)
    _, bf16 = reports_of(argv + ["--set", "bf16=true"], capsys)
    _, default = reports_of(argv + ["--set", "bf16=none"], capsys)
    assert [r["loss"] for r in default] == [r["loss"] for r in fp32]
    assert [r["loss"] for r in bf16] != [r["loss"] for r in fp32]
    assert all(abs(b["loss"] - f["loss"]) < 0.05 * f["loss"] for b, f in zip(bf16, fp32))
    assert all(all_finite(r) for r in bf16)
