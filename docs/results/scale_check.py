"""The committed scale runs, fitted again from their per-trial tables: each run's prediction at
its target with the straight line alone (the fit before issue 30) and with the curvature term
(tunestab/scaling.py, "Model form"), the target's measurement beside them, and the
leave-one-size-out check of each fit. The boundary fits and the frontier fit are the `scale`
strategy's own (tunestab/tables.py `boundaries`, tunestab/scaling.py `fit_frontier`), with the
same random streams, so the straight-line figures repeat the runs' printed ones.

    python docs/results/scale_check.py    # a few seconds
"""

import math
import zlib
from pathlib import Path

import numpy as np
import pandas as pd

from tunestab import scaling
from tunestab.outcome import arm_label
from tunestab.tables import boundaries

HERE = Path(__file__).resolve().parent
RUNS = ("scale_cpu", "scale_cpu_qk_norm", "scale_cpu_qk_norm_l0", "scale_cpu_qk_norm_l0_s8")


def check(run: str) -> list[str]:
    trials = pd.read_csv(HERE / f"{run}_trials.csv")
    answer = pd.read_csv(HERE / f"{run}_scale.csv")
    lines = []
    for v, rows in answer.groupby("variant", sort=False):
        fitted = rows[rows["role"] == "fit"]
        target = rows[rows["role"] == "target"].iloc[0]
        t = trials[trials["variant"] == v].assign(variant=lambda d: [arm_label(v, s) for s in d["size"]])
        fits = boundaries(t, [arm_label(v, s) for s in rows["size"]])
        used = [s for s in fitted["size"] if fits[arm_label(v, s)].samples]
        n = dict(zip(rows["size"], rows["n_params"]))
        measured = fits[arm_label(v, target["size"])]
        lines.append(
            f"{run}, {v}: target {target['size']} measured {measured.lr:.3g} [{measured.low:.3g}, {measured.high:.3g}]"
        )
        for tau in (0.0, scaling.CURVATURE_PRIOR):
            f = scaling.fit_frontier(
                [math.log(n[s]) for s in used],
                [fits[arm_label(v, s)].samples for s in used],
                math.log(n[target["size"]]),
                rng=np.random.default_rng(zlib.crc32(str(v).encode())),
                curvature_prior=tau,
            )
            inside = f.low <= measured.lr <= f.high
            lines.append(
                f"  {'straight line' if tau == 0 else f'curvature prior {tau}'}: predicted {f.predicted:.3g} "
                f"[{f.low:.3g}, {f.high:.3g}] ({f.predicted / f.low:.2f}x below, {f.high / f.predicted:.2f}x above), "
                f"kappa {f.curvature:+.3f} +- {f.curvature_sd:.3f}; the measurement "
                f"{'inside' if inside else 'OUTSIDE'}"
            )
            lines += [
                f"    leave {s} out: predicted {p:.3g} [{lo:.3g}, {hi:.3g}], measured {m:.3g}: "
                f"{'inside' if ok else 'OUTSIDE'}"
                for s, (p, lo, hi, m, ok) in zip(used, f.loso)
            ]
    return lines


if __name__ == "__main__":
    for run in RUNS:
        print("\n".join(check(run)))
