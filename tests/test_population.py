"""Populations: one worker trains several members of one variant and size in lockstep, each on
its own numbers (tunestab/loop.py, `run_population`). A member's reports are those of the same
configuration trained alone."""

import io

import pytest
from test_loop import tiny

from tunestab.config import VARIANTS, ConfigError
from tunestab.loop import run, run_population
from tunestab.session import LocalSession

NUMBERS = ("loss", "val_loss", "grad_norm", "tev_mean", "tev_std", "attn_logit_max", "loss_max", "stop_reason")


def alone(cfg) -> list[dict]:
    session = LocalSession(out=io.StringIO())
    run(cfg, session)
    return session.reports


def by_member(session: LocalSession) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for report in session.reports:
        for mid, metrics in report["members"].items():
            out.setdefault(mid, []).append(metrics)
    return out


def same_numbers(a: list[dict], b: list[dict]) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b):
        assert {k: x.get(k) for k in NUMBERS} == {k: y.get(k) for k in NUMBERS}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_each_member_reports_what_it_reports_alone(variant):
    """fp32, 20 steps at a non-spiking LR, two seeds and two LRs in one population: every
    number of every report equals the lone run's, exactly (the interleaved engine runs each
    member's own ops, with its own random state)."""
    cfgs = {
        "a": tiny(variant=variant, steps=20, report_every=5, eval_every=10, lr=3e-3, seed=0),
        "b": tiny(variant=variant, steps=20, report_every=5, eval_every=10, lr=1e-3, seed=1),
    }
    session = LocalSession(out=io.StringIO())
    run_population(cfgs, session)
    got = by_member(session)
    for mid, cfg in cfgs.items():
        same_numbers(got[mid], alone(cfg))


def test_a_member_that_goes_nonfinite_changes_no_other_members_numbers():
    cfgs = {
        "calm": tiny(steps=20, report_every=5, lr=3e-3),
        "nan": tiny(steps=20, report_every=5, lr=1e30, grad_clip=0.0, warmup_steps=0, seed=3),
    }
    session = LocalSession(out=io.StringIO())
    last = run_population(cfgs, session)
    got = by_member(session)
    assert last["nan"]["stop_reason"] == "nonfinite" and len(got["nan"]) < len(got["calm"])
    assert all(r["active"] == 1 for r in session.reports[len(got["nan"]) :])  # it costs nothing more
    same_numbers(got["calm"], alone(cfgs["calm"]))
    same_numbers(got["nan"], alone(cfgs["nan"]))


def test_a_stopped_member_ends_at_its_verdict_step_and_the_others_train_on():
    cfgs = {"a": tiny(steps=30, report_every=5), "b": tiny(steps=30, report_every=5, seed=1)}
    session = LocalSession(out=io.StringIO(), stop={"b": 10})
    run_population(cfgs, session)
    got = by_member(session)
    assert [r["step"] for r in got["b"]] == [5, 10]
    assert [r["step"] for r in got["a"]] == [5, 10, 15, 20, 25, 30]
    same_numbers(got["a"], alone(cfgs["a"]))


def test_a_population_whose_members_all_ended_ends():
    session = LocalSession(out=io.StringIO(), stop={"a": 10, "b": 5})
    run_population({"a": tiny(steps=40, report_every=5), "b": tiny(steps=40, report_every=5, seed=1)}, session)
    assert [r["step"] for r in session.reports] == [5, 10]


def test_a_population_resumes_every_member_with_identical_losses(tmp_path):
    """A checkpoint holds every member still training; resumed, each reports what it reported
    uninterrupted, and a member that had ended before the checkpoint is not trained again."""
    cfgs = {
        "a": tiny(checkpoint_every=20, variant="sigma_reparam"),
        "b": tiny(checkpoint_every=20, variant="sigma_reparam", seed=1, lr=1e-3),
        "nan": tiny(checkpoint_every=20, variant="sigma_reparam", lr=1e30, grad_clip=0.0, warmup_steps=0),
    }
    full = LocalSession(checkpoint_dir=str(tmp_path / "ckpt"), out=io.StringIO())
    run_population(cfgs, full)
    resumed = LocalSession(resume_from=str(tmp_path / "ckpt" / "step_000020"), out=io.StringIO())
    run_population(cfgs, resumed)
    before, after = by_member(full), by_member(resumed)
    assert set(after) == {"a", "b"}
    for mid in ("a", "b"):
        assert [r["step"] for r in after[mid]] == [30, 40]
        same_numbers(before[mid][2:], after[mid])


def test_members_must_share_the_data_and_the_steps():
    with pytest.raises(ConfigError, match="member b: steps = 30, not 20"):
        run_population({"a": tiny(steps=20), "b": tiny(steps=30)}, LocalSession(out=io.StringIO()))
