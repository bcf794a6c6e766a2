"""The per-worker loop: schedules, divergence handling, micro-batches, probes, throughput and
resume (without Ray; the Ray Train path is tests/test_trainer.py)."""

import io
import math

import pytest
import torch

from tunestab import compute
from tunestab.config import TrialConfig
from tunestab.data import cache_dir
from tunestab.loop import Divergence, lr_at, run, train_step
from tunestab.session import LocalSession

TINY = dict(
    n_layer=2,
    n_head=2,
    d_model=32,
    seq_len=32,
    batch_size=8,
    steps=40,
    warmup_steps=5,
    report_every=10,
    eval_every=20,
    eval_batches=2,
)


def tiny(**kw) -> TrialConfig:
    return TrialConfig(**{**TINY, **kw})


def all_finite(report: dict) -> bool:
    return all(math.isfinite(v) for v in report.values() if isinstance(v, (int, float)))


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


def test_a_range_test_climbs_exponentially_from_its_start_to_lr():
    cfg = tiny(lr_schedule="range", lr_range_start=1e-4, lr=1.0, steps=101, warmup_steps=10)
    assert lr_at(0, cfg) == pytest.approx(1e-4)  # no warm-up: the ramp is its own
    assert lr_at(50, cfg) == pytest.approx(1e-2)  # halfway in steps, halfway in log LR
    assert lr_at(100, cfg) == pytest.approx(1.0)
    ratios = [lr_at(s + 1, cfg) / lr_at(s, cfg) for s in range(100)]
    assert max(ratios) == pytest.approx(min(ratios)) and ratios[0] > 1


def test_a_range_test_ends_when_the_loss_comes_back_above_l0():
    d = Divergence(tiny(lr_schedule="range", lr=1.0, warmup_steps=0, blowup_window=3), loss0=5.0)
    assert d.after_report(10, 5.02, False) is None  # at l0 by noise before learning anything
    assert d.after_report(20, 4.0, False) is None
    assert d.after_report(30, 4.9, False) is None  # worse than its best, still below l0
    assert d.after_report(40, 5.1, False) == "range_end"
    assert d.at_end(5.5) is None  # a ramp that reached its top LR just completes
    # The lowest loss so far survives a restart (it is in the checkpoint).
    resumed = Divergence(d.cfg, loss0=5.0, recent=d.recent, best=d.best)
    assert resumed.after_report(50, 5.1, False) == "range_end"


def test_a_range_test_reports_the_lr_it_ended_at():
    """From a tiny LR to an absurd one: the loss falls, then passes l0 on the way up, and the run
    stops there, before the top, with range_lr the LR of that report's last step."""
    session = LocalSession(out=io.StringIO())
    cfg = tiny(lr_schedule="range", lr_range_start=1e-4, lr=100.0, steps=200, report_every=5, grad_clip=0.0)
    last = run(cfg, session)
    assert last["stop_reason"] in ("range_end", "nonfinite") and last["step"] < 200
    assert last["range_lr"] == pytest.approx(lr_at(last["step"] - 1, cfg))
    assert min(r["loss"] for r in session.reports) < last["loss_init"]  # it learned before it broke
    assert all("range_lr" not in r for r in session.reports[:-1]) and all_finite(last)


def test_train_step_reports_the_global_gradient_norm_before_clipping():
    cfg = tiny(vocab_size=97, grad_clip=0.5).resolved()
    s = compute.setup(cfg, torch.device("cpu"))
    x = torch.randint(0, 97, (4, 32))
    _, loss = s.model(x, x)
    loss.backward()
    expected = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in s.model.parameters())).item()
    s.optimizer.zero_grad()
    _, grad_norm, probes = train_step(s, x, x, cfg, probe=True)
    assert grad_norm.item() == pytest.approx(expected, rel=1e-5) and expected > 0.5  # unclipped value
    assert "tev_mean" in probes and "layer_1/out_norm_qkv" in probes


def test_grad_var_embed_is_the_variance_of_the_gradient_before_clipping():
    cfg = tiny(vocab_size=97, grad_clip=1e-3, probe_grad_var=True).resolved()
    s = compute.setup(cfg, torch.device("cpu"))
    x = torch.randint(0, 97, (4, 32))
    _, loss = s.model(x, x)
    loss.backward()
    raw = s.model.wte.weight.grad[:97].double().var(correction=0).item()
    s.optimizer.zero_grad()
    _, grad_norm, probes = train_step(s, x, x, cfg, probe=True)
    assert grad_norm.item() > 100 * cfg.grad_clip  # the clip shrinks the gradient 100-fold or more
    assert probes["grad_var_embed"].item() == pytest.approx(raw, rel=1e-4)


def test_micro_batches_give_the_losses_of_the_whole_batch():
    """Gradient accumulation: 8 sequences as 4 micro-batches of 2 take the same steps as 8 at
    once, up to float summation order."""
    whole, micro = LocalSession(out=io.StringIO()), LocalSession(out=io.StringIO())
    run(tiny(steps=30), whole)
    run(tiny(steps=30, micro_batch_size=2), micro)
    assert [r["step"] for r in whole.reports] == [r["step"] for r in micro.reports] == [10, 20, 30]
    for a, b in zip(whole.reports, micro.reports):
        # (Per-layer probes come from the last micro-batch's forward only, so they differ.)
        for key in ("loss", "grad_norm", "tev_mean", "tev_std"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    assert micro.reports[-1]["val_loss"] == pytest.approx(whole.reports[-1]["val_loss"], rel=1e-5)


def test_the_first_step_of_each_kind_is_left_out_of_the_throughput():
    """The first step of each kind (plain, with probes) builds its compiled graph (and on a GPU
    initialises its kernels): no tokens_per_s is
    made of it, so a report whose steps all compiled carries none."""
    session = LocalSession(out=io.StringIO())
    run(tiny(steps=4, report_every=1, eval_every=4), session)
    first, *rest = session.reports
    assert "tokens_per_s" not in first  # step 1: the probe graph's first run
    assert all(r["tokens_per_s"] > 0 for r in rest)


def test_loop_s_counts_the_trials_own_time_from_the_loops_start(monkeypatch):
    """loop_s (what bench/search_overhead.py sets against a search's wall time) starts when the
    loop is entered, so loading the data counts, and grows with every report."""
    import time

    from tunestab import loop as loop_mod

    load = loop_mod.data_mod.load_splits

    def slow_load(*a, **k):
        time.sleep(0.5)
        return load(*a, **k)

    monkeypatch.setattr(loop_mod.data_mod, "load_splits", slow_load)
    session = LocalSession(out=io.StringIO())
    run(tiny(steps=4, report_every=1, eval_every=4), session)
    times = [r["loop_s"] for r in session.reports]
    assert times[0] >= 0.5 and times == sorted(times) and len(set(times)) == len(times)


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


def test_a_unigram_progress_floor_fails_a_trial_that_learned_only_token_frequencies():
    """`progress_floor: unigram`: a final validation loss no better than the unigram entropy of
    the training tokens (what a model that ignores context reaches) is `no_progress`, not a
    completed trial. The default floor stays l0, the loss at initialisation."""
    from tunestab import data

    cfg = tiny(steps=10, report_every=5, eval_every=10, lr=1e-3)  # too short to get past token frequencies
    default, floored = LocalSession(out=io.StringIO()), LocalSession(out=io.StringIO())
    run(cfg, default)
    run(tiny(steps=10, report_every=5, eval_every=10, lr=1e-3, progress_floor="unigram"), floored)
    train, _ = data.load_splits("builtin", "bytes", cache_dir(cfg), cfg.val_fraction)
    entropy = data.unigram_entropy(train)
    assert 3.0 < entropy < 3.3  # English and Python source, one byte a token
    last, ended = default.reports[-1], floored.reports[-1]
    assert entropy < last["val_loss"] < last["loss_init"]  # beats l0, not the token frequencies
    assert last["stop_reason"] == "completed" and last["loss_floor"] == last["loss_init"]
    assert ended["stop_reason"] == "no_progress" and ended["diverged"] == 1
    assert ended["loss_floor"] == pytest.approx(entropy) and ended["val_loss"] == last["val_loss"]
    d = Divergence(tiny(progress_floor="unigram"), loss0=5.5, unigram=3.1)
    assert d.at_end(3.2) == "no_progress" and d.at_end(3.0) is None


def test_unigram_entropy():
    from tunestab.data import unigram_entropy

    assert unigram_entropy([1, 1, 2, 2]) == pytest.approx(math.log(2))
    assert unigram_entropy([5] * 10) == 0


def test_a_report_summarises_every_step_since_the_last_one():
    """TEV after every step and the loss of every step: a spike between two reports shows in
    the next report's maxima, in TEV and in the loss alike."""
    from tunestab.loop import Window

    class Embedding:
        def __init__(self):
            self.rows = torch.zeros(4, 8)

        def token_embedding(self):
            return self.rows

    model, w = Embedding(), Window(torch.device("cpu"))
    spread = torch.tensor([[1.0, -1.0] * 4, [1.0, -1.0] * 4, [2.0, -2.0] * 4, [3.0, -3.0] * 4])  # TEV_i: 1, 1, 2, 3
    history = []
    for scale, loss in ((1.0, 3.0), (4.0, 9.0), (1.5, 3.5)):  # the middle step spikes
        model.rows = spread * scale
        w.add(torch.tensor(loss), torch.tensor(1.0), model, lr=0.5)
        history.append(scale * torch.tensor([1.0, 1, 2, 3]))
    m = {k: v.item() for k, v in w.maxima().items()}
    ratio = (history[0].std(correction=0) / history[0].mean()).item()  # the same at every scale
    assert m["loss_max"] == 9.0 and (w.loss_sum / w.steps).item() == pytest.approx(15.5 / 3)
    assert m["tev_dispersion_max"] == pytest.approx(ratio)
    assert m["tev_growth_max"] == pytest.approx(history[1].mean().item() - history[0].mean().item())
    assert m["tev_row_max"] == pytest.approx(3 / 1.75)  # the largest row over the mean, at any scale
    rms_step = (spread * 3.0).pow(2).mean().sqrt().item()  # the spike step: from 1x to 4x
    assert m["embed_update_max"] == pytest.approx(rms_step / 0.5)
    w.reset()
    assert "tev_growth_max" not in w.maxima() and w.prev_mean is not None  # growth needs a step after the report


def test_reports_carry_the_per_step_maxima():
    session = LocalSession(out=io.StringIO())
    run(tiny(steps=20, report_every=5), session)
    for r in session.reports:
        assert r["loss_max"] >= r["loss"] and r["tev_dispersion_max"] >= 0 and "tev_growth_max" in r
