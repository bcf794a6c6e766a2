"""`scale`: `max_lr` at several model sizes, then per variant a fit of log max stable LR against
log parameter count and a prediction, with an interval, at a larger size (tunestab/scaling.py).

Each (variant, size) is an arm, bracketed and fitted on its own like a variant. The searcher
labels it `variant@size` (outcome.arm_label) and gives each trial its variant, its `size` and the
size's fields; the table's `variant` column holds the arm for the summary and the fit.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from ..config import ConfigError, config_from
from ..outcome import ATTN_LOGIT_MAX, SIZE, arm_label
from ..sections import number
from .base import shared_report
from .max_lr import MaxLR

# Fields a size may not set: each size is measured at every variant, lr and seed by max_lr.
NOT_SIZE_FIELDS = ("variant", "lr", "seed", "lr_schedule", "lr_range_start")


@dataclass(frozen=True)
class Scale:
    """The `scale` section: the sizes to measure and the one to predict."""

    sizes: dict = field(default_factory=dict)
    """Measured sizes: name -> the TrialConfig fields that make it (d_model, n_layer, n_head, ...)."""
    target: dict = field(default_factory=dict)
    """The one size to predict: name -> its fields."""
    measure_target: bool = False
    """Also run max_lr at the target; the fit never sees it, so it checks the prediction."""
    logit_threshold: float = 1.0e4
    """Wortsman et al.'s second predictor: the largest LR at which the max attention logit,
    extrapolated to the target size, stays below this (their runs above 1e4 diverged)."""
    # scaling.CURVATURE_PRIOR, written out: reading a space loads no numpy (tests/test_spec.py).
    curvature_prior: float = 0.06
    """The prior sd of a curvature term in ln N that the fit carries beside the line
    (tunestab/scaling.py, "Model form"): how far the frontier may bend from a power law. 0.06
    bends it by the 12% the committed scale runs' w96 points missed their lines by; 0 fits the
    straight line alone."""

    @property
    def every_size(self) -> dict:
        """The measured sizes, then the target: name -> fields."""
        return {**self.sizes, **self.target}

    def arms(self, variants) -> dict[str, dict]:
        """`variant@size` -> its fields (the variant included), in order: sizes, then the target
        when it is measured."""
        sizes = self.every_size if self.measure_target else self.sizes
        return {arm_label(v, name): {"variant": v, **fields} for v in variants for name, fields in sizes.items()}


class ScaleStrategy(MaxLR):
    name = "scale"
    section = "scale"
    section_type = Scale
    other_params_hint = " or in `scale.sizes`"
    labels_arms = True
    ratios = False

    def parse_section(self, raw, draft, problems):
        """Sizes and target are mappings of name -> TrialConfig fields, each checked with every
        variant."""
        value = raw.get("scale") or {}
        if not isinstance(value, dict):
            problems.append(f"scale: expected a mapping, got {type(value).__name__}")
            return Scale()
        known = ("sizes", "target", "measure_target", "logit_threshold", "curvature_prior")
        for k in value:
            if k not in known:
                problems.append(f"scale.{k}: unknown key (known: {', '.join(known)})")
        out = {}
        for key in ("sizes", "target"):
            sizes = value.get(key) or {}
            if not isinstance(sizes, dict) or not all(isinstance(f, dict) for f in sizes.values()):
                problems.append(f"scale.{key}: expected a mapping of size name -> TrialConfig fields, got {sizes!r}")
                sizes = {}
            for name, fields in sizes.items():
                where = f"scale.{key}.{name}"
                if not isinstance(name, str) or not name or any(c in name for c in "@/\\ "):
                    problems.append(f"{where}: a size name is a word without @, slashes or spaces")
                if not fields:
                    problems.append(f"{where}: names no TrialConfig field")
                for f in fields:
                    if f in NOT_SIZE_FIELDS:
                        problems.append(f"{where}.{f}: a size cannot set {f} (the search does)")
                    elif draft.param(f) is not None:
                        problems.append(f"{where}.{f}: also searched under params.{f}; keep one")
                if draft.trial_ok and not any(f in NOT_SIZE_FIELDS for f in fields):
                    for variant in draft.variants or ["baseline"]:
                        try:
                            config_from({**draft.trial, "variant": variant, **fields}, "size")
                        except ConfigError as e:
                            problems.extend(f"{where}: with variant {variant}: {q}" for q in e.problems)
                            break
            out[key] = dict(sizes)
        measure = value.get("measure_target", False)
        if not isinstance(measure, bool):
            problems.append(f"scale.measure_target: expected true or false, got {measure!r}")
            measure = False
        threshold = value.get("logit_threshold", Scale.logit_threshold)
        if not number(threshold) or threshold <= 0:
            problems.append(f"scale.logit_threshold: expected a number > 0, got {threshold!r}")
            threshold = Scale.logit_threshold
        tau = value.get("curvature_prior", Scale.curvature_prior)
        if not number(tau) or not 0 <= tau < math.inf:
            problems.append(f"scale.curvature_prior: expected a number >= 0 (0: a straight line), got {tau!r}")
            tau = Scale.curvature_prior
        return Scale(out["sizes"], out["target"], measure, float(threshold), float(tau))

    def check(self, draft, sections, problems):
        scale = sections["scale"]
        seen: list[tuple[object, str]] = []
        for name, fields in scale.every_size.items():
            try:
                cfg = config_from({**draft.trial, "variant": (draft.variants or ["baseline"])[0], **fields}, "size")
            except ConfigError:
                continue  # reported by parse_section
            same = next((other for c, other in seen if c == cfg), None)
            if same is not None:
                problems.append(f"scale: sizes {same} and {name} make the same model")
            seen.append((cfg, name))
        if len(scale.sizes) < 2:
            problems.append(
                f"scale.sizes: the scale strategy fits a line through two sizes or more, got {len(scale.sizes)}"
            )
        if len(scale.target) != 1:
            problems.append(f"scale.target: expected one size to predict, got {len(scale.target)}")
        overlap = set(scale.sizes) & set(scale.target)
        if overlap:
            problems.append(f"scale.target: {sorted(overlap)} is also a measured size")
        super().check(draft, sections, problems)

    def arms(self, space):
        return space.scale.arms(space.variants)

    def progress_params(self, space):
        # The fields that tell the sizes apart (d_model, n_layer, ...).
        return list(dict.fromkeys(k for f in space.scale.every_size.values() for k in f))

    def group_by(self, space):
        return ("variant", SIZE)

    def dry_run(self, space):
        from ..scaling import non_embedding_params

        target = next(iter(space.scale.target))
        lines = []
        for name, fields in space.scale.every_size.items():
            role = (
                "target, measured too"
                if name == target and space.scale.measure_target
                else "target, predicted"
                if name == target
                else "measured"
            )
            lines.append(
                f"  size {name} ({role}): {fields}, {non_embedding_params(space.trial_config(space.variants[0], **fields)):,} "
                f"parameters without embeddings ({space.variants[0]})"
            )
        return lines

    def table_columns(self, space):
        # Which size a trial trained, and its final max attention logit (the second predictor's input).
        return {
            **super().table_columns(space),
            SIZE: lambda c, m: c.get(SIZE),
            ATTN_LOGIT_MAX: lambda c, m: m.get(ATTN_LOGIT_MAX),
        }

    def arm_table(self, space, every):
        """`variant` as the arm, `variant@size`: what max_lr bracketed separately, and what the
        boundary fit and the summary take one by one."""
        return every.assign(variant=[arm_label(v, s) for v, s in zip(every["variant"], every[SIZE])])

    def report(self, space, every, grid, out):
        from .. import run_dir

        table, grid, fits = shared_report(self, space, every, grid, out)
        st, frontiers = scale_table(space, table, fits)
        verdicts = scale_verdicts(st)
        md = scale_markdown(st, frontiers, space.scale.logit_threshold, space.scale.curvature_prior)
        out.table(run_dir.SCALE_CSV, st)
        out.text(run_dir.SCALE_MD, md + "\n")
        if st["max_stable_lr"].notna().any():
            out.plot(run_dir.FRONTIER_PNG, plot_frontier, st, frontiers)
        for _, r in st[st["role"] == "target"].iterrows():
            for key, col in (
                ("predicted_max_lr", "predicted"),
                ("predicted_max_lr_low", "predicted_low"),
                ("predicted_max_lr_high", "predicted_high"),
                ("logit_predicted_max_lr", "logit_predicted"),
            ):
                out.metric(f"{key}/{r['variant']}", r[col])
        for v, fr in frontiers.items():
            if fr is not None:
                for suffix in ("", "_low", "_high"):
                    out.metric(f"lr_scaling_exponent{suffix}/{v}", getattr(fr, f"alpha{suffix}"))
        out.say(f"Max stable LR against model size, and at {next(iter(space.scale.target))}:\n\n{md}\n")
        for v, verdict in verdicts.items():
            out.say(
                f"{v}: the target's measured max stable LR lies inside the prediction interval: "
                f"{'yes' if verdict['inside'] else 'no'}; the interval is within one sqrt(2) step either side: "
                f"{'yes' if verdict['narrow'] else 'no'}"
            )


SCALE_TABLE_COLUMNS = [
    "variant",
    "size",
    "role",
    "n_params",
    "max_stable_lr",
    "max_stable_lr_low",
    "max_stable_lr_high",
    "predicted",
    "predicted_low",
    "predicted_high",
    "logit_predicted",
    "loso_predicted",
    "loso_low",
    "loso_high",
    "loso_inside",
]


def scale_table(space, table, fits: dict):
    """The scale strategy's answer. table: by_arm's table (range tests left out); fits: arm ->
    Boundary. Per variant and size (the target last): N without embeddings, the measured max
    stable LR with its interval (at the target only with scale.measure_target), and the fit's
    value there with its interval; at the target, Wortsman's logit predictor too. Returns the
    table and variant -> scaling.Frontier (None where fewer than two sizes have an interval)."""
    import numpy as np
    import pandas as pd

    from .. import scaling
    from ..tables import ran, stable_mask

    sizes, target = space.scale.sizes, next(iter(space.scale.target))
    lo, hi = space.param("lr").values
    rows, frontiers = [], {}
    for v in space.variants:
        n = {
            name: scaling.non_embedding_params(space.trial_config(v, **fields))
            for name, fields in space.scale.every_size.items()
        }
        used = [name for name in sizes if fits.get(arm_label(v, name)) is not None and fits[arm_label(v, name)].samples]
        fr = scaling.fit_frontier(
            [math.log(n[x]) for x in used],
            [fits[arm_label(v, x)].samples for x in used],
            math.log(n[target]),
            others=[math.log(n[x]) for x in sizes],
            rng=np.random.default_rng(zlib.crc32(str(v).encode())),
            curvature_prior=space.scale.curvature_prior,
        )
        frontiers[v] = fr
        completed = []
        for name in sizes:
            t = ran(table[table["variant"] == arm_label(v, name)])
            t = t[stable_mask(t)]
            completed.append(
                (math.log(n[name]), t["lr"].astype(float).tolist(), t["attn_logit_max"].astype(float).tolist())
            )
        logit = scaling.logit_predictor(completed, math.log(n[target]), lo, hi, space.scale.logit_threshold)
        # Each fitted size as the line through the other sizes predicted it (three sizes or more).
        held_out = dict(zip(used, fr.loso)) if fr else {}
        for i, name in enumerate([*sizes, target]):
            f = fits.get(arm_label(v, name))
            pred = (fr.at[i] if name != target else (fr.predicted, fr.low, fr.high)) if fr else (math.nan,) * 3
            loso = held_out.get(name, (math.nan,) * 3 + (None, None))
            rows.append(
                {
                    "variant": v,
                    "size": name,
                    "role": "target" if name == target else "fit",
                    "n_params": n[name],
                    "max_stable_lr": f.lr if f else math.nan,
                    "max_stable_lr_low": f.low if f else math.nan,
                    "max_stable_lr_high": f.high if f else math.nan,
                    "predicted": pred[0],
                    "predicted_low": pred[1],
                    "predicted_high": pred[2],
                    "logit_predicted": logit if name == target else math.nan,
                    "loso_predicted": loso[0],
                    "loso_low": loso[1],
                    "loso_high": loso[2],
                    "loso_inside": loso[4],
                }
            )
    return pd.DataFrame(rows, columns=SCALE_TABLE_COLUMNS), frontiers


# The validation's goal (issue 18): the prediction interval no wider than one sqrt(2) step either side.
SQRT2_STEP = math.sqrt(2)


def scale_verdicts(t) -> dict[str, dict]:
    """Per variant with a measured target: is the measured max stable LR inside the prediction
    interval, and is the interval within one sqrt(2) step either side of the prediction?"""
    out = {}
    for _, r in t[(t["role"] == "target") & t["max_stable_lr"].notna() & t["predicted"].notna()].iterrows():
        out[r["variant"]] = {
            "inside": bool(r["predicted_low"] <= r["max_stable_lr"] <= r["predicted_high"]),
            "narrow": bool(
                r["predicted_high"] / r["predicted"] <= SQRT2_STEP * (1 + 1e-9)
                and r["predicted"] / r["predicted_low"] <= SQRT2_STEP * (1 + 1e-9)
            ),
        }
    return out


def scale_markdown(t, frontiers: dict, threshold: float, curvature_prior: float) -> str:
    from ..tables import fmt, interval

    lines = [
        "| variant | size | parameters (no embeddings) | measured max stable LR | 90% interval | "
        "fit through the measured sizes | 90% interval | logit predictor |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for _, r in t.iterrows():
        size = f"**{r['size']}** (target)" if r["role"] == "target" else r["size"]
        lines.append(
            f"| {r['variant']} | {size} | {r['n_params']:,} | {fmt(r['max_stable_lr'])} | "
            f"{interval(r['max_stable_lr_low'], r['max_stable_lr_high'])} | {fmt(r['predicted'])} | "
            f"{interval(r['predicted_low'], r['predicted_high'])} | "
            f"{fmt(r['logit_predicted']) if r['role'] == 'target' else ''} |"
        )
    lines.append("")
    for v, fr in frontiers.items():
        if fr is None:
            lines.append(f"- {v}: no fit (fewer than two sizes have a max stable LR with an interval)")
            continue
        fit = (
            f"chi^2/dof about the line {fr.birge**2:.2f}"
            if not math.isnan(fr.birge)
            else "two sizes: no check of the line"
        )
        lines.append(
            f"- {v}: max stable LR ~ N^{fr.alpha:.2f} [{fr.alpha_low:.2f}, {fr.alpha_high:.2f}] from "
            f"{fr.sizes} sizes; {fit}" + (" (interval widened by its square root)" if fr.birge > 1 else "")
        )
        if curvature_prior:
            lines.append(
                f"  - a curvature term in ln N beside the line: kappa {fr.curvature:+.3f} +- {fr.curvature_sd:.3f} "
                f"(prior sd {curvature_prior:g}; it widens the intervals the farther they extrapolate)"
            )
        if fr.loso:
            held = t[(t["variant"] == v) & t["loso_predicted"].notna()]
            checks = "; ".join(
                f"{r['size']} {fmt(r['loso_predicted'])} {interval(r['loso_low'], r['loso_high'])} against "
                f"{fmt(r['max_stable_lr'])}: {'inside' if r['loso_inside'] else 'OUTSIDE'}"
                for _, r in held.iterrows()
            )
            lines.append(f"  - leave one size out, each predicted by the fit through the others: {checks}")
    lines.append(
        f"- logit predictor: the lowest LR at which the max attention logit, extrapolated to the target "
        f"size, reaches {threshold:g} ('-': it does not within the searched range)"
    )
    return "\n".join(lines)


def plot_frontier(t, frontiers: dict, path: Path) -> None:
    """The stability frontier: max stable LR against N (log-log) per variant, measured sizes with
    their intervals, the fitted line with its band out to the target, the region above the line
    (divergent) shaded, and the prediction at the target (star; diamond: the logit predictor)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7.5, 5))
    top = np.nanmax(t[["max_stable_lr_high", "predicted_high", "max_stable_lr"]].to_numpy(dtype=float)) * 3
    from ..plots import variant_colours

    colours = variant_colours(t["variant"])
    for v, g in t.groupby("variant", sort=False):
        c = colours[v]
        fit, target = g[g["role"] == "fit"], g[g["role"] == "target"]
        ax.errorbar(
            fit["n_params"],
            fit["max_stable_lr"],
            yerr=[fit["max_stable_lr"] - fit["max_stable_lr_low"], fit["max_stable_lr_high"] - fit["max_stable_lr"]],
            fmt="o",
            color=c,
            capsize=3,
            label=f"{v}: measured",
        )
        if target["max_stable_lr"].notna().any():
            ax.errorbar(
                target["n_params"],
                target["max_stable_lr"],
                yerr=[
                    target["max_stable_lr"] - target["max_stable_lr_low"],
                    target["max_stable_lr_high"] - target["max_stable_lr"],
                ],
                fmt="s",
                mfc="none",
                color=c,
                capsize=3,
                label=f"{v}: measured at the target (not fitted)",
            )
        fr = frontiers.get(v)
        if fr is not None:
            n, mid, low, high = (np.array(a) for a in zip(*fr.line))
            ax.plot(n, mid, color=c, lw=1.2)
            ax.fill_between(n, low, high, color=c, alpha=0.18)
            ax.fill_between(n, mid, top, color=c, alpha=0.06)  # above the frontier: divergent
            ax.errorbar(
                target["n_params"],
                [fr.predicted],
                yerr=[[fr.predicted - fr.low], [fr.high - fr.predicted]],
                fmt="*",
                ms=12,
                color=c,
                capsize=4,
                label=f"{v}: predicted {fr.predicted:.3g}",
            )
        if target["logit_predicted"].notna().any():
            ax.plot(
                target["n_params"],
                target["logit_predicted"],
                "D",
                mfc="none",
                color=c,
                ms=8,
                label=f"{v}: attention-logit predictor",
            )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_ylim(top=top)
    ax.set_xlabel("parameters without embeddings, N")
    ax.set_ylabel("max stable learning rate")
    ax.set_title("Stability frontier (shaded above a variant's line: divergent; band: 90% interval)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
