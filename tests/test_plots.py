"""The report's plots mean one thing per colour and per marker: a variant has the same colour in
every plot, an outcome (stable, diverged, stopped_by_tev) the same marker or line style, and a
failed run is drawn where the title says, at its initial loss."""

import math
from types import SimpleNamespace

import matplotlib
import pandas as pd
import pytest
from matplotlib.colors import to_hex
from matplotlib.figure import Figure

from tunestab import boundary, plots
from tunestab.outcome import OUTCOME, Outcome, outcome

matplotlib.use("Agg")


@pytest.fixture
def figures(monkeypatch):
    """Every figure a plot function saves, kept for reading instead of written."""
    kept = []
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: kept.append(self))
    return kept


def run(variant, lr, seed, stop_reason, diverged=0):
    m = {"stop_reason": stop_reason, "diverged": diverged, "val_loss": 3.0 - lr, "loss_init": 5.5 + 0.01 * seed}
    return {"variant": variant, "lr": lr, "seed": seed, **m, OUTCOME: outcome(m).value}


TABLE = pd.DataFrame(
    [run("qk_norm", lr, s, "completed") for lr in (0.01, 0.02, 0.04) for s in (0, 1, 2)]
    + [run("qk_norm", 0.08, s, "blowup", 1) for s in (0, 1, 2)]
    + [run("qk_norm", 0.16, 0, "tev")]
    + [run("baseline", lr, s, "completed") for lr in (0.001, 0.002) for s in (0, 1, 2)]
    + [run("baseline", 0.004, s, "no_progress", 1) for s in (0, 1, 2)]
    + [run("baseline", 0.008, 1, "tev")]
)
COLOURS = plots.variant_colours(["qk_norm", "baseline"])


def labelled_lines(fig):
    return [a for ax in fig.axes for a in ax.get_lines() if not a.get_label().startswith("_")]


def test_outcome_names_how_a_run_counts():
    assert [outcome({"stop_reason": r, "diverged": d}) for r, d in [("completed", 0), ("completed", 1)]] == [
        Outcome.STABLE,
        Outcome.DIVERGED,  # no progress past the floor: the worker marks it diverged at its end
    ]
    assert outcome({"stop_reason": "tev", "diverged": 0}) == Outcome.STOPPED_BY_TEV
    assert outcome({"stop_reason": "nonfinite", "diverged": 1}) == Outcome.DIVERGED
    assert outcome({"stop_reason": "error"}) == Outcome.ERROR
    assert outcome({"stop_reason": "running", "diverged": 0}) == Outcome.RUNNING


def test_loss_against_lr_draws_each_variant_in_its_colour_and_failed_runs_at_their_initial_loss(figures, tmp_path):
    plots.plot_loss_vs_lr(TABLE, tmp_path / "x.png")
    (fig,) = figures
    lines = labelled_lines(fig)
    assert {line.get_label() for line in lines} == {
        "qk_norm: stable",
        "qk_norm: diverged",
        "qk_norm: stopped_by_tev",
        "baseline: stable",
        "baseline: diverged",
        "baseline: stopped_by_tev",
    }
    for line in lines:
        variant, o = line.get_label().split(": ")
        assert to_hex(line.get_color()) == to_hex(COLOURS[variant])
        assert line.get_marker() == plots.MARKERS[Outcome(o)]
        rows = TABLE[(TABLE.variant == variant) & (TABLE[OUTCOME] == o)]
        want = rows["val_loss"] if o == "stable" else rows["loss_init"]  # x and ^ at l0, as the title says
        assert sorted(line.get_ydata()) == pytest.approx(sorted(want))
    assert "initial loss l0" in fig.axes[0].get_title()
    # No overlapping minor labels on the LR axis.
    assert all(t.get_text() == "" for t in fig.axes[0].xaxis.get_minorticklabels())


def test_p_diverge_uses_the_same_colours_and_markers_and_green_only_for_the_answer(figures, tmp_path):
    fits = {v: boundary.fit(t["lr"], t[OUTCOME] != "stable", t["seed"]) for v, t in TABLE.groupby("variant")}
    plots.plot_p_diverge(TABLE, fits, tmp_path / "p.png")
    (fig,) = figures
    for ax in fig.axes:
        for coll in ax.collections:
            label = coll.get_label()
            if label.startswith("_"):
                continue
            variant, o = label.split(": ")
            assert {to_hex(c) for c in coll.get_facecolors()} <= {to_hex(COLOURS[variant])}
        greens = [line for line in ax.get_lines() if to_hex(line.get_color()) == to_hex(plots.ANSWER)]
        assert greens, "the answer is drawn in green"
    assert to_hex(plots.ANSWER) not in {to_hex(c) for c in plots.PALETTE}


def test_tev_curves_colour_by_variant_and_style_by_outcome(figures, tmp_path):
    steps = pd.DataFrame({"step": [10, 20], "tev_mean": [0.02, 0.03], "tev_std": [0.001, 0.002]})
    grid = [
        SimpleNamespace(config={"variant": r["variant"]}, metrics=r, metrics_dataframe=steps)
        for r in TABLE.to_dict("records")
    ]
    plots.plot_tev_curves(grid, tmp_path / "t.png")
    (fig,) = figures
    lines = labelled_lines(fig)
    assert len(lines) == 2 * len(TABLE)  # mu_TEV and sigma/mu for every run
    for line in lines:
        variant, o = line.get_label().split(": ")
        assert to_hex(line.get_color()) == to_hex(COLOURS[variant])
        assert line.get_linestyle() == {"stable": "-", "diverged": "--", "stopped_by_tev": ":"}[o]
    assert not math.isnan(lines[0].get_ydata()[0])


def test_trials_csv_and_the_summary_count_by_outcome():
    from tunestab.tables import summary

    s = summary(TABLE, ["qk_norm", "baseline"]).set_index("variant")
    # baseline's no_progress runs are diverged; each variant's TEV stop is counted apart.
    assert s.loc["baseline", "diverged"] == 3 and s.loc["baseline", "tev_stops"] == 1
    assert s.loc["qk_norm", "diverged"] == 3 and s.loc["qk_norm", "tev_stops"] == 1
