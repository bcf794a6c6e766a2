"""The report's plots mean one thing per colour and per marker: a variant has the same colour in
every plot, an outcome (stable, diverged, stopped_by_tev) the same marker or line style, and a
failed run is drawn where the title says, at its initial loss."""

import math
from types import SimpleNamespace

import matplotlib
import pandas as pd
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
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


def tev_grid(table):
    """Tune results for the table's runs, each with the same two TEV reports."""
    steps = pd.DataFrame({"step": [10, 20], "tev_mean": [0.02, 0.03], "tev_std": [0.001, 0.002]})
    return [
        SimpleNamespace(config={"variant": r["variant"]}, metrics=r, metrics_dataframe=steps)
        for r in table.to_dict("records")
    ]


def test_tev_curves_colour_by_variant_and_style_by_outcome(figures, tmp_path):
    plots.plot_tev_curves(tev_grid(TABLE), tmp_path / "t.png")
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


def test_each_ended_run_gets_its_answer_points_under_its_arms_name():
    from tunestab.metrics import FINITE_CAP
    from tunestab.outcome import answer_metrics

    stable = answer_metrics("qk_norm", 0.01, {"stop_reason": "completed", "diverged": 0, "val_loss": 3.25})
    assert stable == {
        "answer/log10_lr": pytest.approx(-2.0),
        "answer/qk_norm failed": 0.0,
        "answer/qk_norm val_loss": 3.25,
    }
    # A TEV stop fails at its LR, as the boundary fit counts it, and has no val_loss to plot.
    tev = answer_metrics("baseline@w32", 0.1, {"stop_reason": "tev", "diverged": 0})
    assert tev == {"answer/log10_lr": pytest.approx(-1.0), "answer/baseline/w32 failed": 1.0}
    # No val_loss point from the stand-in for a non-finite one.
    blown = answer_metrics("baseline", 1.0, {"stop_reason": "nonfinite", "diverged": 1, "val_loss": FINITE_CAP})
    assert blown == {"answer/log10_lr": 0.0, "answer/baseline failed": 1.0}
    # An error says nothing about its LR; neither does a range test's start; nor a run still going.
    assert answer_metrics("baseline", 0.1, {"stop_reason": "error"}) == {}
    assert answer_metrics("baseline", 30.0, {"stop_reason": "range_end", "diverged": 1, "range_lr": 0.2}) == {}
    assert answer_metrics("baseline", 0.1, {"stop_reason": "running", "diverged": 0}) == {}


def test_the_parent_runs_answer_line_and_outcome_counts_agree_with_the_summary():
    from tunestab.tables import answer_line, outcome_counts, summary

    s = summary(TABLE, ["baseline", "qk_norm"])
    line = answer_line(s)
    # Fewer than 3 seeds: each variant's answer is its bracket, the same numbers as summary.csv.
    for r in s.to_dict("records"):
        assert f"{r['variant']} in [{r['largest_stable_lr']:.3g}, {r['smallest_divergent_lr']:.3g}]" in line
    fitted = s.assign(basis="fit", max_stable_lr=0.0123, max_stable_lr_low=0.01, max_stable_lr_high=0.015)
    ratios = pd.DataFrame(
        [
            {
                "variant": "qk_norm",
                "reference": "baseline",
                "basis": "fit",
                "ratio": 2.5,
                "ratio_low": 2.0,
                "ratio_high": 3.1,
            }
        ]
    )
    assert answer_line(fitted, ratios) == (
        "baseline 0.0123 [0.01, 0.015]; qk_norm 0.0123 [0.01, 0.015]; qk_norm/baseline 2.5x [2, 3.1]"
    )
    counts = dict(reversed(p.split(" ")) for p in outcome_counts(TABLE).split(", "))
    assert {k: int(v) for k, v in counts.items()} == TABLE[OUTCOME].value_counts().to_dict()


def outside(fig):
    """The texts of a figure (its title, each plot's title) that do not fit inside it."""
    canvas = FigureCanvasAgg(fig)  # the plot closed its figure, which left it without a canvas
    canvas.draw()
    renderer = canvas.get_renderer()
    boxes = {t.get_text(): t.get_window_extent(renderer) for t in list(fig.texts) + [ax.title for ax in fig.axes]}
    return [text for text, b in boxes.items() if text and not (b.x0 >= -1 and b.x1 <= fig.bbox.width + 1)]


def test_every_title_fits_inside_its_figure(figures, tmp_path):
    """The longest variant name with a real-sized answer: a title cut at the figure's edge hides
    the number a reader came for."""
    table = TABLE.assign(variant=TABLE["variant"].replace({"baseline": "sigma_reparam"}), softcap=30.0)
    fits = {v: boundary.fit(t["lr"], t[OUTCOME] != "stable", t["seed"]) for v, t in table.groupby("variant")}
    plots.plot_p_diverge(table, fits, tmp_path / "p.png")
    plots.plot_loss_vs_lr(table, tmp_path / "l.png")
    plots.plot_params_vs_loss(table, ["softcap"], tmp_path / "c.png")
    plots.plot_tev_curves(tev_grid(table), tmp_path / "t.png")
    assert len(figures) == 4
    for fig in figures:
        assert outside(fig) == []
