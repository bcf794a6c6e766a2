"""`tune`: Optuna (TPE, GP or CMA-ES) over the space's parameters; objective the final validation
loss, a diverged or TEV-stopped trial scored at its initial loss (outcome.objectives). With
`tune.seeds` > 1 each configuration runs at that many seeds and Optuna sees their mean."""

from __future__ import annotations

from dataclasses import dataclass

from ..outcome import OBJECTIVE, objectives
from .base import Strategy, shared_report

SAMPLERS = ("tpe", "gp", "cmaes")


@dataclass(frozen=True)
class Tune:
    """The `tune` section."""

    sampler: str = "tpe"
    """Optuna sampler: tpe, gp or cmaes."""
    num_samples: int = 16
    """Configurations Optuna proposes in all (over all variants)."""
    seeds: int = 1
    """Seeds each configuration runs at (trial.seed, + 1, ...); Optuna sees their mean objective."""
    seed: int = 0
    """Sampler seed."""


class TuneStrategy(Strategy):
    name = "tune"
    section = "tune"
    section_type = Tune

    def parse_section(self, raw, draft, problems):
        t = super().parse_section(raw, draft, problems)
        problems += [
            f"tune.{k}: must be >= 1, got {getattr(t, k)}" for k in ("num_samples", "seeds") if getattr(t, k) < 1
        ]
        if t.sampler not in SAMPLERS:
            problems.append(f"tune.sampler: expected one of {', '.join(SAMPLERS)}, got {t.sampler!r}")
        return t

    def check(self, draft, sections, problems):
        if sections["tune"].seeds > 1 and draft.param("seed") is not None:
            problems.append("params.seed: with tune.seeds each configuration already runs at several seeds")
        if not any(p.kind in ("loguniform", "uniform", "int", "choice") for p in draft.params):
            problems.append("params: the tune strategy needs at least one range or choice to sample")
        if any(p.kind == "grid" for p in draft.params):
            problems.append("params: the tune strategy samples; use choice instead of grid")

    def param_space(self, space):
        from ray import tune

        variants = list(space.variants)
        return {
            "variant": tune.choice(variants) if len(variants) > 1 else variants[0],
            **{p.name: p.tune_domain() for p in space.params},
        }

    def searcher(self, space, storage):
        import optuna

        from ..searchers import FinalOnlyOptunaSearch, SeedRepeater

        sampler = {
            "tpe": optuna.samplers.TPESampler,
            "gp": optuna.samplers.GPSampler,
            "cmaes": optuna.samplers.CmaEsSampler,
        }[space.tune.sampler](seed=space.tune.seed)
        search = FinalOnlyOptunaSearch(
            metric=OBJECTIVE, mode="min", sampler=sampler, storage=storage, study_name=space.name
        )
        if space.tune.seeds > 1:
            return SeedRepeater(search, space.tune.seeds, space.trial_config(space.variants[0]).seed)
        return search

    # A configuration's seeds are one population; Optuna proposes the next one without waiting.
    member_fields = ("seed",)
    rounds = False

    def num_trials(self, space):
        return space.tune.num_samples * space.tune.seeds

    def fits_boundary(self, space):
        return False  # trials differ in more than LR and seed

    def report(self, space, every, grid, out):
        from .. import run_dir

        table, _, _ = shared_report(self, space, every, grid, out)
        best, per = best_configs(table, space)
        out.table(run_dir.PER_CONFIG_CSV, per)
        if best:
            out.metric("best_val_loss", best["val_loss"])
            out.tag("best_config", str(best))
        scores = verdict = None
        if space.tune.seeds > 1:
            scores = config_scores(table, space)
            verdict = separated(scores)
            out.table(run_dir.CONFIGS_CSV, scores)
            if len(scores):
                out.metric("best_objective_mean", scores.iloc[0]["objective_mean"])
                out.tag("best_config_over_seeds", str(scores.iloc[0].to_dict()))
                out.tag("best_config_separated", str(verdict))
        out.say(f"Best configuration: {best}\nLargest stable LR per configuration:\n{per.to_string(index=False)}\n")
        if scores is not None:
            out.say(
                scores_text(scores, space.tune.seeds)
                + f"The best stands outside the runner-up's seed spread (mean +- sd): "
                f"{'yes' if verdict else 'no' if verdict is not None else 'not enough configurations'}\n"
            )


# Configurations the console lists; configs.csv holds every one.
SHOWN = 10


def scores_text(scores, seeds: int) -> str:
    """The console's table of configurations over seeds, saying so when it lists only the best."""
    from ..run_dir import CONFIGS_CSV

    more = f" (the best {SHOWN} of {len(scores)}; all in {CONFIGS_CSV})" if len(scores) > SHOWN else ""
    return (
        f"Configurations over {seeds} seeds, best mean objective first{more}:\n"
        f"{scores.head(SHOWN).to_string(index=False)}\n"
    )


def best_configs(table, space):
    """For `tune`: the stable trial with the lowest val_loss, and per configuration of the
    searched parameters other than lr, the largest LR that stayed stable."""
    from ..tables import stable_mask

    keys = ["variant"] + [p.name for p in space.params if p.name != "lr"]
    stable = table[stable_mask(table)]
    best = None
    if len(stable):
        row = stable.loc[stable["val_loss"].idxmin()]
        best = {k: row[k].item() if hasattr(row[k], "item") else row[k] for k in keys + ["lr", "val_loss"]}
    per = stable.groupby(keys, dropna=False)["lr"].max().rename("max_stable_lr").reset_index()
    return best, per


def config_scores(table, space):
    """For `tune` over seeds: per configuration (the variant and the searched parameters), its
    seeds, the mean and sd over seeds of the objective Optuna saw (the final validation loss, or
    l0 for a trial that diverged or was stopped), and how many seeds diverged. Best first."""
    import pandas as pd

    from ..tables import ran, stable_mask

    keys = ["variant"] + [p.name for p in space.params if p.name != "seed"]
    t = ran(table).copy()
    # What Optuna saw of each trial (outcome.objectives), from its row.
    t["objective"] = [objectives(r, r["lr"])[OBJECTIVE] for r in t.to_dict("records")]
    rows = []
    for key, g in t.groupby(keys, dropna=False):
        rows.append(
            {
                **dict(zip(keys, key if isinstance(key, tuple) else (key,))),
                "seeds": len(g),
                "objective_mean": g["objective"].mean(),
                "objective_sd": g["objective"].std(),
                "diverged": int((~stable_mask(g)).sum()),
            }
        )
    out = pd.DataFrame(rows, columns=keys + ["seeds", "objective_mean", "objective_sd", "diverged"])
    return out.sort_values("objective_mean").reset_index(drop=True)


def separated(scores) -> bool | None:
    """Whether the best configuration stands outside the seed spread of the runner-up: its mean
    plus one sd below the runner-up's mean minus one sd. None with fewer than two configurations
    of two or more seeds."""
    ranked = scores[scores["seeds"] >= 2]
    if len(ranked) < 2:
        return None
    best, second = ranked.iloc[0], ranked.iloc[1]
    return bool(best["objective_mean"] + best["objective_sd"] < second["objective_mean"] - second["objective_sd"])
