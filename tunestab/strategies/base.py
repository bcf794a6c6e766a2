"""What every strategy is: the `Strategy` interface, and the parts most strategies share.

A strategy owns everything that differs between ways of spending a search's trials: its YAML
section and checks (`parse_section`, `check`), its parameter space and searcher (`param_space`,
`searcher`), its trial budget (`num_trials`), and its tables, plots and parent-run metrics
(`table_columns`, `report`). Everything outside tunestab/strategies/ asks the space's strategy
(`of(space)`) and never branches on its name. Heavy imports (Ray, Optuna, pandas) stay inside
the methods that need them: a space file is checked without them.
"""

from __future__ import annotations

from ..outcome import metric_path
from ..sections import Draft, section


class Strategy:
    name: str = ""
    section: str | None = None
    """The YAML section this strategy reads its settings from, if it has one of its own."""
    section_type: type | None = None
    """The frozen dataclass that section builds (its fields are the section's keys)."""

    # -- the space file -------------------------------------------------------------------------
    def parse_section(self, raw: dict, draft: Draft, problems: list[str]):
        """This strategy's section of the file, checked. Every section is read whichever strategy
        a file names, so that a mistake in any of them is reported."""
        return section(raw, self.section, self.section_type, problems)

    def check(self, draft: Draft, sections: dict, problems: list[str]) -> None:
        """The rules a file must follow when it names this strategy (its params, its section)."""

    # -- what it runs ---------------------------------------------------------------------------
    def arms(self, space) -> dict[str, dict]:
        """What is bracketed and fitted separately: label -> the config fields it sets."""
        return {v: {"variant": v} for v in space.variants}

    def param_space(self, space) -> dict:
        """The Tune param_space entries this strategy adds to the space's fixed `trial` fields."""
        return {}

    def grid(self, space) -> list[dict]:
        """Every combination of the space's grids, for every variant; the LR and the seed vary
        fastest, so that a grid row (one variant and one value of every other parameter) is one
        population (tunestab/members.py)."""
        grids = [p for p in space.params if p.kind == "grid"]
        grids.sort(key=lambda p: p.name in self.member_fields)
        combos = [{}]
        for p in grids:
            combos = [{**c, p.name: v} for c in combos for v in p.values]
        return [{"variant": v, **c} for v in space.variants for c in combos]

    def searcher(self, space, storage):
        """The Tune searcher of the members (storage: Optuna's RDB storage); by default every
        combination of the space's grids (`grid`)."""
        from ..searchers import GridSearch

        return GridSearch(self.grid(space))

    member_fields: tuple[str, ...] = ("lr", "seed")
    """What the members of one population (one Tune trial) may differ in (tunestab/members.py)."""
    rounds = True
    """Whether the searcher proposes in rounds it then waits on (all of a round is grouped into
    populations), or proposes without waiting (a population ends at the first misfit)."""

    def num_trials(self, space) -> int:
        """The most members the searcher proposes (the populations' budget, tunestab/searchers.py)."""
        return len(self.grid(space))

    def trials_text(self, space) -> str:
        return f"up to {self.num_trials(space)}"

    def progress_params(self, space) -> list[str]:
        """Config columns of Tune's progress table beyond the variant and the searched params."""
        return []

    def group_by(self, space) -> tuple[str, ...]:
        """The run tags a search's MLflow view groups its trials by."""
        return ("variant",)

    def dry_run(self, space) -> list[str]:
        """Lines `--dry-run` prints about this strategy's plan."""
        return []

    # -- what it reports ------------------------------------------------------------------------
    def table_columns(self, space) -> dict:
        """Columns of the trial table of its own: name -> f(config, metrics)."""
        return {}

    def fits_boundary(self, space) -> bool:
        """Whether P(diverge | LR) is fitted per arm: where the trials differ in LR and seed
        alone (not in a depth or a rank as well, whose trials would be pooled into one curve)."""
        return space.param("lr") is not None and all(p.name in ("lr", "seed") for p in space.params)

    def report(self, space, every, grid, out) -> None:
        """The summary every strategy shares (tunestab/report.py's `Report` collects it): the
        trial table, max stable LR per arm, ratios between variants, and the common plots."""
        shared_report(self, space, every, grid, out)

    def arm_table(self, space, every):
        """The trial table with `variant` holding each row's arm."""
        return every

    ratios = True
    """Whether the summary compares variants' max stable LRs."""


def shared_report(strategy: Strategy, space, every, grid, out):
    """The common report, into `out`. Returns what a strategy's own part builds on: the arm table
    without range tests, Tune's results without range tests, and the fits per arm (or None)."""
    import pandas as pd

    from .. import plots, run_dir, tables

    table, ranged = tables.split_range_tests(strategy.arm_table(space, every))
    names = list(strategy.arms(space))
    if len(ranged):
        grid = [r for r in grid if r.config.get("lr_schedule") != "range"]
    p = space.max_lr.p_diverge
    fits = tables.boundaries(table, names, p) if strategy.fits_boundary(space) else None
    s = tables.summary(table, names, fits)
    if "lr_schedule" in every:  # the space runs LR range tests (table_columns)
        # Where each variant's range test failed, beside the answer it led to.
        s["range_test_lr"] = [ranged[ranged["variant"] == v]["range_lr"].max() for v in s["variant"]]
    md = tables.summary_markdown(s, p)
    brackets = {r["variant"]: (r["largest_stable_lr"], r["smallest_divergent_lr"]) for _, r in s.iterrows()}
    rat = tables.ratios(fits, brackets) if fits and strategy.ratios else None
    out.table(run_dir.TRIALS_CSV, every)
    out.table(run_dir.SUMMARY_CSV, s)
    out.text(
        run_dir.SUMMARY_MD, md + "\n" + (f"\n{tables.ratios_markdown(rat)}\n" if rat is not None and len(rat) else "")
    )
    if rat is not None and len(rat):
        out.table(run_dir.RATIOS_CSV, rat)
    if fits and any(f.found for f in fits.values()):
        out.plot(run_dir.P_DIVERGE_PNG, plots.plot_p_diverge, table, fits)
    if len(table):
        out.plot(run_dir.LOSS_VS_LR_PNG, plots.plot_loss_vs_lr, table)
        out.plot(run_dir.TEV_CURVES_PNG, plots.plot_tev_curves, grid)
        # Architecture parameters worth a picture: numeric, searched, and not the LR or the seed.
        arch = [
            q.name
            for q in space.params
            if q.name not in ("lr", "seed")
            and pd.api.types.is_numeric_dtype(table[q.name])
            and table[q.name].nunique() > 1
        ]
        if arch:
            out.plot(run_dir.PARAMS_VS_LOSS_PNG, plots.plot_params_vs_loss, table, arch)
    keys = ("max_stable_lr", "max_stable_lr_low", "max_stable_lr_high", "largest_stable_lr", "smallest_divergent_lr")
    for key in (*keys, "range_test_lr"):
        if key in s:
            for _, r in s.iterrows():
                out.metric(f"{key}/{metric_path(r['variant'])}", r[key])
    if rat is not None:
        for _, r in rat.iterrows():
            for suffix in ("", "_low", "_high"):
                out.metric(f"lr_ratio{suffix}/{r['variant']}_vs_{r['reference']}", r[f"ratio{suffix}"])

    out.say(f"\n{space.name} ({space.strategy}): {len(table)} trials\n\n{md}\n")
    if fits and any(not f.has_interval for f in fits.values()):
        from ..boundary import MIN_SEEDS

        out.say(
            f"(With fewer than {MIN_SEEDS} seeds the answer is the bracket [largest stable, smallest "
            f"divergent]: a fitted point needs {MIN_SEEDS} seeds or more to tell how the boundary varies "
            f"between seeds, and without them it can sit below an LR that trained stably. Set max_lr.seeds.)\n"
        )
    if rat is not None and len(rat):
        out.say(f"Ratios of max stable LRs, with 90% intervals:\n\n{tables.ratios_markdown(rat)}\n")
    return table, grid, fits
