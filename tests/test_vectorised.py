"""The vectorised engine (tunestab/vectorised.py): a population stepped as one model with a
member dimension gives each member the numbers it gets alone, to float rounding, and keeps every
guarantee of the interleaved engine (tests/test_population.py)."""

import dataclasses
import io

import pytest
import torch
from test_loop import tiny
from test_population import alone, by_member

from tunestab.checkpoint import CHECKPOINT_FILE
from tunestab.config import VARIANTS, ConfigError
from tunestab.loop import engine_for, run_population
from tunestab.session import LocalSession

NUMBERS = ("loss", "val_loss", "grad_norm", "tev_mean", "tev_std", "attn_logit_max", "loss_max", "tev_dispersion")
# The largest relative gap seen over the eight variants, 20 steps, fp32: 3.1e-5 (qk_fc_norm's
# attention-logit maximum at step 20); losses agreed to 6e-6. Batched kernels sum in another
# order than a lone model's, so this is a tolerance, not the interleaved engine's equality.
REL = 1e-4
TIMES = ("tokens_per_s", "mfu", "loop_s")  # measured, so never repeated


def vectorised(**kw):
    return tiny(engine="vectorised", **kw)


def interleaved(cfg):
    return dataclasses.replace(cfg, engine="interleaved")


def close(got: list[dict], want: list[dict], rel: float = REL) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for x, y in zip(got, want):
        assert x["stop_reason"] == y["stop_reason"]
        assert set(x) >= {k for k in NUMBERS if k in y}
        for k in NUMBERS:
            if k in y:
                assert x[k] == pytest.approx(y[k], rel=rel, abs=1e-9), (x["step"], k)


def population(cfgs: dict, **session) -> LocalSession:
    s = LocalSession(out=io.StringIO(), **session)
    run_population(cfgs, s)
    return s


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_each_member_reports_what_it_reports_alone(variant):
    """fp32, 20 steps at non-spiking LRs, two seeds and two LRs: every number of every report
    is the lone run's (interleaved, the reference engine), to REL."""
    cfgs = {
        "a": vectorised(variant=variant, steps=20, report_every=5, eval_every=10, lr=3e-3, seed=0),
        "b": vectorised(variant=variant, steps=20, report_every=5, eval_every=10, lr=1e-3, seed=1),
    }
    got = by_member(population(cfgs))
    for mid, cfg in cfgs.items():
        close(got[mid], alone(interleaved(cfg)))


def test_a_nonfinite_member_changes_no_other_members_numbers():
    """While a member goes NaN beside it, a member's numbers are bit for bit those it has beside
    a calm member; the NaN member ends `nonfinite` and is dropped, and the other trains on."""
    calm = vectorised(steps=20, report_every=5, lr=3e-3)
    nan = vectorised(steps=20, report_every=5, lr=1e30, grad_clip=0.0, warmup_steps=0, seed=3)
    beside_nan = population({"calm": calm, "nan": nan})
    beside_calm = population({"calm": calm, "other": vectorised(steps=20, report_every=5, lr=1e-3, seed=3)})
    got = by_member(beside_nan)
    assert got["nan"][-1]["stop_reason"] == "nonfinite" and len(got["nan"]) < len(got["calm"])
    assert all(list(r["members"]) == ["calm"] for r in beside_nan.reports[len(got["nan"]) :])
    shared = len(got["nan"])  # reports while both trained
    untimed = [{k: v for k, v in r.items() if k not in TIMES} for r in got["calm"][:shared]]
    assert untimed == [{k: v for k, v in r.items() if k not in TIMES} for r in by_member(beside_calm)["calm"][:shared]]
    close(got["calm"], alone(interleaved(calm)))


def test_a_stopped_member_leaves_and_the_others_train_on():
    """The stack is rebuilt for the members still training; their numbers do not change."""
    cfgs = {
        "a": vectorised(steps=30, report_every=5, variant="sigma_reparam"),
        "b": vectorised(steps=30, report_every=5, variant="sigma_reparam", seed=1),
        "c": vectorised(steps=30, report_every=5, variant="sigma_reparam", seed=2, lr=1e-3),
    }
    session = population(cfgs, stop={"b": 10})
    got = by_member(session)
    assert [r["step"] for r in got["b"]] == [5, 10]
    assert [r["active"] for r in session.reports] == [3, 3, 2, 2, 2, 2]
    for mid in ("a", "c"):
        close(got[mid], alone(interleaved(cfgs[mid])))


def test_a_checkpoint_resumes_in_either_engine_and_holds_each_member_alone(tmp_path):
    """A vectorised population's checkpoint has the interleaved engine's format: resumed by the
    vectorised engine every member repeats its losses exactly, resumed by the interleaved one to
    REL. Each member's tensors are saved on their own, not as the stacked population's."""
    cfgs = {
        "a": vectorised(checkpoint_every=20, variant="sigma_reparam"),
        "b": vectorised(checkpoint_every=20, variant="sigma_reparam", seed=1, lr=1e-3),
    }
    before = by_member(population(cfgs, checkpoint_dir=str(tmp_path / "ckpt")))
    ckpt = tmp_path / "ckpt" / "step_000020"
    state = torch.load(ckpt / CHECKPOINT_FILE, weights_only=True)
    for member in state["members"].values():
        assert member["optimizer"]["state"], "the stacked AdamW state reached the member's optimizer"
        for t in list(member["model"].values()) + [s["exp_avg"] for s in member["optimizer"]["state"].values()]:
            assert t.untyped_storage().nbytes() == t.numel() * t.element_size()
    same = by_member(population(cfgs, resume_from=str(ckpt)))
    other = by_member(population({m: interleaved(c) for m, c in cfgs.items()}, resume_from=str(ckpt)))
    for mid in cfgs:
        assert [r["step"] for r in same[mid]] == [30, 40]
        for x, y in zip(same[mid], before[mid][2:]):
            assert {k: x.get(k) for k in NUMBERS} == {k: y.get(k) for k in NUMBERS}
        close(other[mid], before[mid][2:])


@pytest.mark.slow  # inductor compiles the vmapped step twice (with probes and without): about 60 s on 2 cores
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_compiled_and_bf16_members_report_what_they_report_alone(bf16):
    """compile compiles the vmapped forward as a whole; under bf16 autocast too, each member's
    numbers are its lone run's, to the tolerance the interleaved engine's compiled test uses
    in bf16 (2e-2) and to REL in fp32."""
    cfgs = {
        "a": vectorised(steps=6, report_every=3, eval_every=6, compile=True, bf16=bf16, variant="qk_norm"),
        "b": vectorised(
            steps=6, report_every=3, eval_every=6, compile=True, bf16=bf16, variant="qk_norm", seed=1, lr=1e-3
        ),
    }
    got = by_member(population(cfgs))
    for mid, cfg in cfgs.items():
        close(got[mid], alone(interleaved(cfg)), rel=2e-2 if bf16 else REL)


def test_auto_vectorises_populations_on_cuda_only():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert engine_for(tiny(), cpu, 8) == "interleaved"
    assert engine_for(tiny(), cuda, 8) == "vectorised"
    assert engine_for(tiny(), cuda, 1) == "interleaved"
    assert engine_for(tiny(dropout=0.1), cuda, 8) == "interleaved"  # vmap would draw other numbers
    assert engine_for(tiny(engine="vectorised"), cpu, 1) == "vectorised"


def test_the_vectorised_engine_refuses_dropout_and_unknown_engines_by_key():
    with pytest.raises(ConfigError, match="engine: the vectorised engine runs without dropout"):
        tiny(engine="vectorised", dropout=0.1).validate()
    with pytest.raises(ConfigError, match="engine: must be one of auto, interleaved, vectorised, got 'vmap'"):
        tiny(engine="vmap").validate()


def test_members_must_share_the_engine():
    with pytest.raises(ConfigError, match="member b: engine = 'interleaved', not 'vectorised'"):
        run_population({"a": vectorised(), "b": tiny(engine="interleaved")}, LocalSession(out=io.StringIO()))
