"""The per-worker loop: schedules, divergence handling, checkpoints and resume, Ray Train DDP."""

import io
import json
import math
import socket

import pytest

from tunestab import train
from tunestab.config import TrialConfig
from tunestab.train import Divergence, LocalSession, lr_at, main, run

TINY = dict(n_layer=2, n_head=2, d_model=32, seq_len=32, batch_size=8, steps=40, warmup_steps=5,
            report_every=10, eval_every=20, eval_batches=2)


def tiny(**kw) -> TrialConfig:
    return TrialConfig(**{**TINY, **kw})


def all_finite(report: dict) -> bool:
    return all(math.isfinite(v) for v in report.values() if isinstance(v, (int, float)))


def reports_of(argv, capsys) -> tuple[int, list[dict]]:
    rc = main(argv)
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    return rc, lines


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    cfg = tiny(lr=1.0, warmup_steps=10, steps=110, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55)  # halfway through the cosine
    assert lr_at(109, cfg) == pytest.approx(0.1, abs=1e-3)
    assert all(lr_at(s, cfg) >= lr_at(s + 1, cfg) for s in range(10, 109))


def test_divergence_rule():
    cfg = tiny(warmup_steps=20, blowup_window=2, blowup_margin=0.0)
    d = Divergence(cfg, loss0=5.0)
    assert d.after_report(10, 9.0, False) is None  # above l0, but still warming up
    assert d.after_report(20, 9.0, False) is None  # the last warm-up step
    assert d.after_report(30, 4.0, False) is None  # warm-up losses never enter the window
    assert d.after_report(40, 5.5, False) is None  # smoothed 4.75: one bad report is not a blow-up
    assert d.after_report(50, 6.0, False) == "blowup"  # smoothed 5.75 > l0
    assert Divergence(cfg, 5.0).after_report(10, 1.0, True) == "nonfinite"
    assert d.at_end(5.0) == "no_progress" and d.at_end(4.9) is None


def test_train_step_reports_the_global_gradient_norm_before_clipping():
    import torch

    from tunestab.model import GPT

    cfg = tiny(vocab_size=97, grad_clip=0.5).resolved()
    torch.manual_seed(0)
    model = GPT(cfg)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    x = torch.randint(0, 97, (4, 32))
    _, loss = model(x, x)
    loss.backward()
    expected = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters())).item()
    opt.zero_grad()
    no_autocast = lambda: torch.autocast("cpu", enabled=False)  # noqa: E731
    _, grad_norm, probes = train.train_step(model, model, opt, x, x, cfg, no_autocast, probe=True)
    assert grad_norm.item() == pytest.approx(expected, rel=1e-5) and expected > 0.5  # unclipped value
    assert "tev_mean" in probes and "layer_1/out_norm_qkv" in probes


def test_a_run_completes_and_reports_every_metric(capsys):
    rc, reports = reports_of(["--set", "steps=20", "--set", "n_layer=2", "--set", "d_model=32",
                              "--set", "n_head=2", "--set", "batch_size=8", "--set", "seq_len=32"], capsys)
    assert rc == 0 and [r["step"] for r in reports] == [10, 20]
    last = reports[-1]
    for name in ("loss", "val_loss", "tev_mean", "tev_std", "grad_norm", "attn_logit_max", "out_norm_qkv",
                 "out_norm_proj", "out_norm_fc1", "out_norm_fc2", "lr", "step", "tokens", "tokens_per_s",
                 "diverged", "stop_reason", "layer_1/out_norm_fc2"):
        assert name in last, name
    assert last["stop_reason"] == "completed" and last["diverged"] == 0
    assert last["val_loss"] < last["loss_init"] and last["tokens"] == 20 * 8 * 32
    assert all(all_finite(r) for r in reports)


def test_lr_10_diverges_cleanly_with_exit_code_0(capsys):
    rc, reports = reports_of(["--set", "lr=10", "--set", "n_layer=2", "--set", "d_model=32", "--set", "n_head=2",
                              "--set", "batch_size=8", "--set", "seq_len=32", "--set", "steps=200",
                              "--set", "warmup_steps=5", "--set", "report_every=5"], capsys)
    assert rc == 0
    last = reports[-1]
    assert last["diverged"] == 1 and last["stop_reason"] in ("nonfinite", "blowup")
    assert last["step"] < 200  # the trial ended at divergence, not at its budget
    assert all(all_finite(r) for r in reports)  # sentinels, never NaN or inf


def test_nonfinite_loss_gives_a_finite_last_report():
    session = LocalSession(out=io.StringIO())
    last = run(tiny(lr=1e30, grad_clip=0.0, warmup_steps=0, report_every=2), session)
    assert last["stop_reason"] == "nonfinite" and last["diverged"] == 1
    assert last["loss"] == last["loss_init"] == last["val_loss"]  # l0 as the sentinel
    assert all_finite(last)


def test_resume_reproduces_the_uninterrupted_losses(tmp_path):
    cfg = tiny(checkpoint_every=20, variant="sigma_reparam")  # power-iteration buffers must resume too
    full = LocalSession(checkpoint_dir=str(tmp_path / "ckpt"), out=io.StringIO())
    run(cfg, full)
    assert (tmp_path / "ckpt" / "step_000020" / "checkpoint.pt").is_file()
    resumed = LocalSession(resume_from=str(tmp_path / "ckpt" / "step_000020"), out=io.StringIO())
    run(cfg, resumed)
    assert [r["step"] for r in resumed.reports] == [30, 40]
    for a, b in zip(full.reports[2:], resumed.reports):
        assert a["loss"] == b["loss"] and a.get("val_loss") == b.get("val_loss")
    assert full.reports[-1]["val_loss"] == resumed.reports[-1]["val_loss"]


def test_offline_default_works_with_the_network_unreachable(monkeypatch, tmp_path, capsys):
    def refuse(*args, **kwargs):
        raise OSError("network unreachable (test)")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    rc, reports = reports_of(["--set", f"data_cache={tmp_path}", "--set", "steps=10", "--set", "n_layer=1",
                              "--set", "d_model=32", "--set", "n_head=2", "--set", "batch_size=4"], capsys)
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


@pytest.mark.slow
def test_two_ray_workers_follow_the_one_worker_loss_curve(tmp_path):
    # Same global batch (8 sequences): each of 2 DDP workers takes 4 of the 8 blocks a 1-worker
    # run takes, and DDP averages the gradients, so the curves differ only by float reduction order.
    cfg = tiny(checkpoint_every=10, data_cache=str(tmp_path / "cache"))
    one = LocalSession(out=io.StringIO())
    run(cfg, one)
    import ray

    try:
        result = train.run_with_ray(cfg, workers=2, use_gpu=False, storage=str(tmp_path / "ray"), name="ddp")
    finally:
        ray.shutdown()
    assert result.error is None
    # Train V2 builds metrics_dataframe from the checkpoints it kept: the last KEEP_CHECKPOINTS
    # of those at steps 10, 20 and 30 (the older one is deleted from storage).
    two = result.metrics_dataframe.set_index("step")["loss"]
    assert list(two.index) == [10, 20, 30][-train.KEEP_CHECKPOINTS:]
    one_loss = {r["step"]: r["loss"] for r in one.reports}
    for step in two.index:
        assert two[step] == pytest.approx(one_loss[step], rel=2e-3), step


@pytest.mark.slow
def test_a_restarted_ray_trial_resumes_from_its_last_checkpoint(tmp_path):
    import ray

    def crash_once_loop(config):
        import os

        from tunestab import train as t
        from tunestab.config import TrialConfig as C

        class CrashAfterStep20(t.RaySession):
            def report(self, metrics, checkpoint_dir):
                super().report(metrics, checkpoint_dir)
                if metrics["step"] == 20 and not os.path.exists(config["marker"]):
                    open(config["marker"], "w").close()
                    raise RuntimeError("injected worker failure")

        t.run(C(**config["trial"]), CrashAfterStep20())

    cfg = tiny(checkpoint_every=10, data_cache=str(tmp_path / "cache"))
    uninterrupted = LocalSession(out=io.StringIO())
    run(cfg, uninterrupted)
    marker = tmp_path / "crashed"
    try:
        result = train.run_with_ray(cfg, workers=1, use_gpu=False, storage=str(tmp_path / "ray"), name="restart",
                                    max_failures=1, loop=crash_once_loop, extra={"marker": str(marker)})
    finally:
        ray.shutdown()
    assert marker.exists() and result.error is None  # it crashed once, and recovered
    reports = result.metrics_dataframe.set_index("step")["loss"]
    # The kept checkpoints: 20 from the first worker group, 30 from the restarted one.
    assert list(reports.index) == [10, 20, 30][-train.KEEP_CHECKPOINTS:]
    assert reports[30] == pytest.approx(uninterrupted.reports[2]["loss"], rel=1e-5)


def test_a_full_disk_is_a_clear_error_and_the_previous_checkpoint_still_resumes(tmp_path):
    import resource

    from tunestab.train import CheckpointError

    cfg = tiny(checkpoint_every=10)
    uninterrupted = LocalSession(out=io.StringIO())
    run(cfg, uninterrupted)

    class DiskFillsUp(LocalSession):
        """Once the step-10 checkpoint is safely stored, no file on this machine may grow past
        half a checkpoint: the kernel fails the next checkpoint's write part-way (EFBIG), as a
        full disk fails it (ENOSPC). Python ignores SIGXFSZ, so the write raises instead."""

        def report(self, metrics, checkpoint_dir):
            super().report(metrics, checkpoint_dir)
            if checkpoint_dir:
                size = (tmp_path / "ckpt" / "step_000010" / train.CHECKPOINT_FILE).stat().st_size
                resource.setrlimit(resource.RLIMIT_FSIZE, (size // 2, limits[1]))

    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    try:
        with pytest.raises(CheckpointError) as e:
            run(cfg, DiskFillsUp(checkpoint_dir=str(tmp_path / "ckpt"), out=io.StringIO()))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
    assert "checkpoint of step 20" in str(e.value) and "File too large" in str(e.value)
    assert "previous checkpoint is untouched" in str(e.value)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step_000010"]

    resumed = LocalSession(resume_from=str(tmp_path / "ckpt" / "step_000010"), out=io.StringIO())
    run(cfg, resumed)
    assert [r["step"] for r in resumed.reports] == [20, 30, 40]
    assert resumed.reports[-1]["val_loss"] == uninterrupted.reports[-1]["val_loss"]


def test_a_truncated_checkpoint_is_named_and_the_one_before_it_is_used(tmp_path, capsys):
    cfg = tiny(checkpoint_every=10)
    full = LocalSession(checkpoint_dir=str(tmp_path / "ckpt"), out=io.StringIO())
    run(cfg, full)
    latest = tmp_path / "ckpt" / "step_000030" / train.CHECKPOINT_FILE
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])

    resumed = LocalSession(resume_from=str(latest.parent), out=io.StringIO())
    run(cfg, resumed)
    assert f"skipping checkpoint {latest}" in capsys.readouterr().err
    assert [r["step"] for r in resumed.reports] == [30, 40]  # from step 20, the one before
    assert resumed.reports[-1]["val_loss"] == full.reports[-1]["val_loss"]

    # With no good checkpoint left: one message naming each file, exit 2, no training.
    for step in ("step_000010", "step_000020"):
        (tmp_path / "ckpt" / step / train.CHECKPOINT_FILE).write_bytes(b"PK\x03\x04 not a whole zip")
    args = ["--set", "n_layer=2", "--set", "d_model=32", "--set", "n_head=2", "--resume-from", str(latest.parent)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no readable checkpoint" in err
    assert all(f"step_0000{n}0/checkpoint.pt" in err for n in (1, 2, 3))


def test_a_ray_trial_falls_back_to_its_older_checkpoints_newest_first(tmp_path):
    from ray.train import Checkpoint

    run_dir = tmp_path / "trial"
    names = ["checkpoint_2026-11-23_08-10-21.259995", "checkpoint_2026-11-23_08-09-52.991071",
             "checkpoint_2026-11-23_08-11-05.000001"]  # the last: a newer upload that never registered
    for n in names:
        (run_dir / n).mkdir(parents=True)
    (run_dir / "checkpoint_manager_snapshot.json").write_text("{}")
    older = train.older_checkpoints(Checkpoint(str(run_dir / names[0])))
    assert [c.path.rsplit("/", 1)[1] for c in older] == [names[1]]
