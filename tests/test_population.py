"""Populations: one worker trains several members of one variant and size in lockstep, each on
its own numbers (tunestab/loop.py, `run_population`). A member's reports are those of the same
configuration trained alone."""

import io

import pytest
import torch
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
    # From then on it costs nothing more: no step, no report.
    assert all(list(r["members"]) == ["calm"] for r in session.reports[len(got["nan"]) :])
    same_numbers(got["calm"], alone(cfgs["calm"]))
    same_numbers(got["nan"], alone(cfgs["nan"]))


def test_a_stopped_member_ends_at_its_verdict_step_and_the_others_train_on():
    cfgs = {"a": tiny(steps=30, report_every=5), "b": tiny(steps=30, report_every=5, seed=1)}
    session = LocalSession(out=io.StringIO(), stop={"b": 10})
    run_population(cfgs, session)
    got = by_member(session)
    assert [r["step"] for r in got["b"]] == [5, 10]
    assert [r["active"] for r in session.reports] == [2, 2, 1, 1, 1, 1]
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


# --------------------------------------------------------------------------------------------
# the driver: searchers propose populations, members are the results


def drain(searcher, prefix="t"):
    """Every population the searcher proposes before it waits: [(trial id, config)]."""
    out = []
    while True:
        config = searcher.suggest(f"{prefix}{len(out)}")
        if config is None or config == "FINISHED":
            return out, config
        out.append((f"{prefix}{len(out)}", config))


def test_a_bracket_round_is_one_population_per_variant_and_members_complete_the_study(tmp_path):
    """The max_lr bracket proposes a round of `slots` LRs per variant and waits: each variant's
    round is one trial; completing the trial completes each member's Optuna trial with its own
    objective, and the next round follows from them, until the bracket is done."""
    from tunestab.bracket import Design
    from tunestab.searchers import BracketSearch, PopulationSearch

    thresholds = {"baseline": 0.05, "qk_norm": 0.4}
    design = Design(1e-3, 1.0, 1.5, slots=3, max_trials=9, seeds=0)
    import optuna

    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 's.db'}")
    inner = BracketSearch(list(thresholds), design, storage=storage, study_name="s")
    search = PopulationSearch(inner, size=32, budget=100)
    rounds = 0
    while True:
        populations, end = drain(search, f"r{rounds}-")
        if end == "FINISHED":
            break
        rounds += 1
        assert sorted(c["variant"] for _, c in populations) == sorted(thresholds)
        for trial_id, config in populations:
            assert len(config["members"]) == 3 and config["lr"] is None
            finals = {}
            for mid, own in config["members"].items():
                stable = own["lr"] < thresholds[config["variant"]]
                finals[mid] = {"step": 300, "stop_reason": "completed" if stable else "blowup"}
                finals[mid]["stable_lr"] = own["lr"] if stable else 0.0
            search.on_trial_complete(trial_id, {f"members/{m}/{k}": v for m, r in finals.items() for k, v in r.items()})
    assert 2 <= rounds <= 3
    trials = inner._ot_study.get_trials()
    assert len(trials) == rounds * 3 * 2 and all(t.state.name == "COMPLETE" for t in trials)


def test_optuna_configurations_at_several_seeds_are_a_population_each():
    """The tune strategy: Optuna proposes without waiting, so a population ends at the first
    member of another configuration, which starts the next; the budget counts members."""
    from ray.tune.search import Searcher

    from tunestab.searchers import PopulationSearch, SeedRepeater

    class Configs(Searcher):
        def __init__(self):
            super().__init__(metric="objective", mode="min")
            self.n = 0

        def suggest(self, trial_id):
            self.n += 1
            return {"variant": "mlra", "mlra_rank": self.n, "lr": 0.01}

    search = PopulationSearch(SeedRepeater(Configs(), 3), size=32, budget=7, member_fields=("seed",), rounds=False)
    populations, end = drain(search)
    assert end == "FINISHED"
    assert [(c["mlra_rank"], [m["seed"] for m in c["members"].values()]) for _, c in populations] == [
        (1, [0, 1, 2]),
        (2, [0, 1, 2]),
        (3, [0]),
    ]
    assert all(c["lr"] == 0.01 for _, c in populations)  # not a member field here: shared


def test_a_member_stopped_by_tev_keeps_its_verdict_report_as_a_lone_trial_would(capsys):
    """The worker hears of a stop a report or two late; what Tune keeps of the member ends at
    the verdict step, with stop_reason tev and the failed objectives, while the others go on."""
    from types import SimpleNamespace

    from tunestab.members import expand
    from tunestab.scheduler import TEVScheduler
    from tunestab.search import make_callbacks
    from tunestab.tev_rule import TEVRule

    sched = TEVScheduler(TEVRule(signal="dispersion", threshold=0.5, patience=1, min_step=0))
    _, outcome, _ = make_callbacks(sched, None)
    config = {"variant": "baseline", "members": {"t-0": {"lr": 0.01, "seed": 0}, "t-1": {"lr": 0.3, "seed": 0}}}
    trial = SimpleNamespace(trial_id="t", config=config, last_result=None)

    def report(step, spread):
        return {"step": step, "tev_mean": 1.0, "tev_std": spread, "loss": 3.0, "stop_reason": "running"}

    spreads = {"t-0": [0.1, 0.1, 0.1], "t-1": [0.1, 0.9, 0.95]}
    lone_decisions = []
    for i, step in enumerate((10, 20, 30)):
        result = {"step": step, "members": {m: report(step, spreads[m][i]) for m in spreads}}
        flat = {f"members/{m}/{k}": v for m, r in result["members"].items() for k, v in r.items()}
        assert sched.on_trial_result(None, trial, {"step": step, **flat}) == "CONTINUE"  # the trial runs on
        outcome.on_trial_result(0, [], trial, result)
        trial.last_result = result
        lone = TEVScheduler(sched.rule)
        lone_decisions = [
            lone.on_trial_result(None, SimpleNamespace(trial_id="x", config={}), report(s, v))
            for s, v in zip((10, 20, 30), spreads["t-1"])
        ]
    kept = trial.last_result["members"]
    assert kept["t-1"]["step"] == 20 and kept["t-1"]["stop_reason"] == "tev" and kept["t-1"]["stable_lr"] == 0.0
    assert lone_decisions[:2] == ["CONTINUE", "STOP"]  # alone, Tune stops it at step 20 too
    assert kept["t-0"]["step"] == 30 and kept["t-0"]["stop_reason"] == "running"
    assert trial.last_result["outcomes"] == "running 1, tev 1"
    # One console line when it ends, and none again for the reports the worker made after it.
    out = capsys.readouterr().out
    assert out.count("tunestab: t-1 (baseline, lr 0.3, seed 0) stopped by the TEV scheduler") == 1
    assert "at step 20" in out and "t-0" not in out and "Traceback" not in out
    members = expand([SimpleNamespace(config=config, metrics=trial.last_result, error=None, path=None)])
    assert [(m.member_id, m.config["lr"], m.metrics["step"]) for m in members] == [("t-0", 0.01, 30), ("t-1", 0.3, 20)]


def test_the_last_report_ends_every_member_and_writes_no_checkpoint(tmp_path):
    session = LocalSession(checkpoint_dir=str(tmp_path), out=io.StringIO())
    run_population(
        {"a": tiny(steps=20, checkpoint_every=10), "b": tiny(steps=20, checkpoint_every=10, seed=1)}, session
    )
    assert [r["active"] for r in session.reports] == [2, 2]  # both trained to the end, and ended there
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000010"]  # none at the end, as for a lone trial


@pytest.mark.parametrize("value", [0, -3, 2.5, "many", True, None])
def test_a_bad_population_is_one_message_with_its_key_and_exit_2(tmp_path, capsys, value):
    import ray
    import yaml
    from test_search import TINY

    from tunestab import search

    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({**TINY, "resources": {"max_concurrent": 2, "population": value}}))
    assert search.main(["--space", str(space), "--storage", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "resources.population: expected auto or a whole number >= 1" in err
    assert not ray.is_initialized()


def test_the_population_size_caps_a_round_and_the_rest_waits_for_the_next_trial():
    from tunestab.searchers import GridSearch, PopulationSearch

    grid = [{"variant": v, "lr": lr, "seed": 0} for v in ("baseline", "qk_norm") for lr in (0.01, 0.1, 1.0)]
    populations, end = drain(PopulationSearch(GridSearch(grid), size=2, budget=len(grid)))
    assert end == "FINISHED"
    assert [(c["variant"], [m["lr"] for m in c["members"].values()]) for _, c in populations] == [
        ("baseline", [0.01, 0.1]),
        ("baseline", [1.0]),
        ("qk_norm", [0.01, 0.1]),
        ("qk_norm", [1.0]),
    ]
    assert [list(c["members"]) for t, c in populations][:2] == [["t0-0", "t0-1"], ["t1-0"]]  # named by their trial


@pytest.mark.slow  # inductor compiles the step twice (with probes and without): about 30 s on 2 cores
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
@torch._dynamo.config.patch(fail_on_recompile_limit_hit=True)
def test_compiled_members_report_what_they_report_alone(bf16):
    """torch.compile on each member's model, three members of one module class: no member hits
    dynamo's recompile limit (which this test turns into a failure), and each member's numbers
    are those of its compiled lone run, to float rounding: the members after the first run a
    graph dynamo built for any instance of the class, whose kernels may round differently
    (seen: 1e-7 relative in fp32), so this is a tolerance, not the eager engine's equality."""
    cfgs = {
        "a": tiny(steps=6, report_every=3, eval_every=6, compile=True, bf16=bf16, variant="qk_norm"),
        "b": tiny(steps=6, report_every=3, eval_every=6, compile=True, bf16=bf16, variant="qk_norm", seed=1, lr=1e-3),
        "c": tiny(steps=6, report_every=3, eval_every=6, compile=True, bf16=bf16, variant="qk_norm", seed=2, lr=3e-4),
    }
    session = LocalSession(out=io.StringIO())
    run_population(cfgs, session)
    got = by_member(session)
    rel = 2e-2 if bf16 else 1e-5
    for mid, cfg in cfgs.items():
        lone = alone(cfg)
        assert [r["step"] for r in got[mid]] == [r["step"] for r in lone]
        for x, y in zip(got[mid], lone):
            assert x["stop_reason"] == y["stop_reason"]
            assert (x.get("val_loss") is None) == (y.get("val_loss") is None)
            for k in ("loss", "val_loss", "grad_norm", "tev_mean", "tev_std", "attn_logit_max"):
                if y.get(k) is not None:
                    assert x[k] == pytest.approx(y[k], rel=rel), (mid, x["step"], k)


def test_the_population_searcher_restores_from_the_one_file_tune_keeps(tmp_path):
    """Tune saves a searcher to a temporary name and renames it: everything must be in that one
    file. A restored searcher goes on where the saved one stopped."""
    import os

    from tunestab.searchers import GridSearch, PopulationSearch

    grid = [{"variant": "baseline", "lr": lr, "seed": 0} for lr in (0.01, 0.1, 1.0)]
    search = PopulationSearch(GridSearch(grid), size=2, budget=3)
    drain_one = search.suggest("t0")
    search.save(str(tmp_path / "tmp_ckpt"))
    os.replace(tmp_path / "tmp_ckpt", tmp_path / "searcher.pkl")
    assert sorted(os.listdir(tmp_path)) == ["searcher.pkl"]
    again = PopulationSearch(GridSearch([]), size=2, budget=3)
    again.restore(str(tmp_path / "searcher.pkl"))
    assert [m["lr"] for m in drain_one["members"].values()] == [0.01, 0.1]
    assert [m["lr"] for m in again.suggest("t1")["members"].values()] == [1.0]
    assert again.suggest("t2") == "FINISHED" and again.members["t0"] == {"t0-0": "p0", "t0-1": "p1"}
