"""The `max_lr` strategy: per variant, find where the LR starts to diverge, then spend seeds there.

**1. Bracket** (one seed, the space's `trial.seed`). Each variant keeps a bracket [largest
stable LR, smallest divergent LR] in log-LR. Until it is narrow enough (divergent / stable <=
`ratio`), it runs rounds of `slots` trials at the points that split the bracket the earlier
rounds left evenly in log space, side by side; the next round starts when the whole round has
finished. A round's LRs never depend on when its own trials finish, so a search proposes the same
trials at any concurrency and in any finishing order. Before any outcome is known, the ends of the
searched range stand in for the bracket: a trial at the top of the range is not spent to learn
that it diverges, nor one at the bottom to learn that it does not. The bracket is taken
conservatively: the smallest divergent LR bounds it from above, and only stable LRs below that
count.

**2. Boundary seeds.** One seed says where *that seed* diverges. Around the bracket's centre, `seeds`
further seeds (trial.seed + 1, + 2, ...) each run a grid of `points` LRs `step` apart; seed j's grid is
offset by j/seeds of a step, so together the seeds sample the boundary `seeds` times finer than
one grid would. While any trial at the lowest grid level diverged, a level is added below; while
any at the highest completed, one is added above (at most `EXTEND` each way), so that the fit sees
the boundary from both sides. tunestab/boundary.py fits P(diverge | LR) to all of a variant's
trials and reads the max stable LR, with its interval, where it crosses 10%.

**0. An LR range test** (with `range_test`; Smith's test, as fastai's `lr_find`). Before the
bracket, one run per variant whose LR climbs exponentially from the range's low end to its high
end (`lr_schedule: range`, tunestab/loop.py) reports `range_lr`, where its loss passed l0. The
bracket's first `slots` trials then sit just below it, at range_lr / range_margin^(i / slots),
i = 1 ... slots (a ramp fails later than a run held at one LR), instead of splitting the whole
range; from their outcomes the bracket narrows as usual, with the whole range behind it, so an
estimate far off costs a round, not the answer. The range run is not an outcome at a fixed LR:
the bracket and the fit never see it.

A trial that failed (an error, not a divergence) says nothing about the LR and is left out.
This module is the design alone, pure Python: tunestab/searchers.py drives it from Optuna and
Ray Tune (`BracketSampler`, `BracketSearch`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# Grid levels a variant's boundary grid may grow by on each side.
EXTEND = 3


@dataclass(frozen=True)
class Bracket:
    stable: float | None
    """Largest LR seen stable below the smallest divergent one (None: none yet)."""
    divergent: float | None
    """Smallest LR seen diverging (None: none yet)."""

    def bounds(self, lo: float, hi: float) -> tuple[float, float]:
        """The bracket with the searched range's ends standing in for unknown sides."""
        return (self.stable if self.stable is not None else lo, self.divergent if self.divergent is not None else hi)


def bracket(outcomes: list[tuple[float, bool]]) -> Bracket:
    """outcomes: (lr, stable?) of finished trials."""
    divergent = min((lr for lr, ok in outcomes if not ok), default=None)
    stable = max((lr for lr, ok in outcomes if ok and (divergent is None or lr < divergent)), default=None)
    return Bracket(stable, divergent)


def is_done(outcomes, lo: float, hi: float, ratio: float, max_trials: int) -> bool:
    if len(outcomes) >= max_trials:
        return True
    b = bracket(outcomes)
    s, d = b.bounds(lo, hi)
    # Narrow enough, or the range's end is known to be stable (nothing above it is searched).
    return d / s <= ratio or (b.divergent is None and b.stable is not None and b.stable >= hi / ratio)


def split(outcomes, lo: float, hi: float, slots: int) -> list[float]:
    """A round's LRs: `slots` points that split the bracket these outcomes leave into slots + 1
    equal parts in log-LR, lowest first. With populations a round is one trial per variant, so
    an even grid is what a round of any size should be (one point splits it in the middle: a
    bisection)."""
    s, d = bracket(outcomes).bounds(lo, hi)
    return [s * (d / s) ** (i / (slots + 1)) for i in range(1, slots + 1)]


@dataclass(frozen=True)
class Design:
    """How `max_lr` spends one variant's trials: the space's `max_lr` section (search_spaces/README.md),
    with the searched LR range and the bracketing seed, which the space's `params.lr` and
    `trial.seed` fill in (`FROM_SPACE`; they are not keys of the section)."""

    lo: float = 0.0
    hi: float = 0.0
    """The searched LR range."""
    ratio: float = 1.41
    """Bracketing ends when smallest divergent / largest stable LR is at most this."""
    slots: int = 2
    """Bracketing trials per round: each round splits the bracket the earlier rounds left into
    slots + 1 parts, and runs side by side."""
    max_trials: int = 12
    """Bracketing trials per variant at most, bracket or not."""
    seed: int = 0
    """The bracketing seed; boundary seeds are seed + 1 ... seed + seeds."""
    seeds: int = 4
    """Boundary seeds: each runs `points` LRs around the bracket (0: the bracket alone, no interval)."""
    points: int = 4
    """LRs per boundary seed, `step` apart; more are added where the boundary lies past them."""
    step: float = 1.41
    """Ratio between a boundary seed's neighbouring LRs."""
    p_diverge: float = 0.1
    """The max stable LR is where the fitted P(diverge | LR) crosses this."""
    range_test: bool = False
    """Start each variant with an LR range test (one run, the LR climbing from the range's low
    to its high end, ended where its loss passes l0); the bracket starts from where it failed."""
    range_margin: float = 4.0
    """After a range test failing at r, the first bracketing trials sit at r / range_margin^(i /
    slots), i = 1 ... slots."""

    FROM_SPACE = ("lo", "hi", "seed")

    def grid_lr(self, centre: float, level: int, j: int) -> float:
        """Boundary seed j's LR at grid level `level` (0 ... points - 1 around the centre)."""
        offset = level - (self.points - 1) / 2 + (j + 0.5) / self.seeds - 0.5
        return min(self.hi, max(self.lo, centre * self.step**offset))

    def problems(self) -> list[str]:
        """The section's bad values, each with its key."""
        out = [
            f"max_lr.{k}: must be > 1, got {getattr(self, k)}"
            for k in ("ratio", "step", "range_margin")
            if getattr(self, k) <= 1
        ]
        if self.seeds < 0:
            out.append(f"max_lr.seeds: must be >= 0, got {self.seeds}")
        if self.points < 2:
            out.append(f"max_lr.points: must be >= 2, got {self.points}")
        if not 0 < self.p_diverge < 0.5:
            out.append(f"max_lr.p_diverge: must be in (0, 0.5), got {self.p_diverge}")
        out += [
            f"max_lr.{k}: must be >= 1, got {getattr(self, k)}" for k in ("slots", "max_trials") if getattr(self, k) < 1
        ]
        return out

    def max_trials_per_arm(self) -> int:
        """The range test, the bracket, then each boundary seed's grid at its largest."""
        return int(self.range_test) + self.max_trials + self.seeds * (self.points + 2 * EXTEND)


WAIT = "wait"  # next_trial: nothing to start until a trial in flight finishes
DONE = "done"  # next_trial: this variant has every trial it needs
RANGE = "range"  # lr_schedule of an LR range test run
RUNNING = "running"  # a variant's range test has not reported its range_lr yet


def same(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-9 * max(abs(a), abs(b))


def first_lrs(d: Design, range_lr: float) -> list[float]:
    """The bracket's first LRs after a range test that failed at `range_lr`."""
    return [range_lr / d.range_margin ** ((i + 1) / d.slots) for i in range(d.slots)]


def next_bracket_lr(first: list[tuple[float, bool | None]], d: Design, range_lr: float | None = None):
    """The bracketing seed's next LR, WAIT, or None once the bracket is done.

    first: the bracketing seed's trials in the order they were proposed, (lr, stable?), stable
    None while a trial runs. Trials are proposed in rounds of `slots`: a round's LRs are chosen
    from the outcomes of the rounds before it alone, and the next round starts when all of them
    have finished. So the LRs a bracket tries do not depend on which trial finished first, or on
    how many run at once (a round's later trials are not told its earlier ones' outcomes, even when
    they are known: at concurrency 1 that costs up to `slots` - 1 trials a variant)."""
    n = len(first)
    start = n - n % d.slots  # where the round the next trial would join starts
    earlier, current = first[:start], first[start:]
    if any(ok is None for _, ok in earlier):
        return WAIT  # a round starts when the one before it has finished
    known = [(lr, ok) for lr, ok in earlier]
    if n >= d.max_trials or is_done(known, d.lo, d.hi, d.ratio, d.max_trials):
        return WAIT if any(ok is None for _, ok in current) else None
    points = split(known, d.lo, d.hi, d.slots)
    if range_lr is not None and start == 0:
        # The round after the range test: its points first (the range's ends are never tried:
        # see the module's doc).
        points = [lr for lr in first_lrs(d, range_lr) if d.lo < lr < d.hi] + points
    # A round has fewer than `slots` trials so far, and `split` gives `slots` distinct points.
    return next(lr for lr in points if not any(same(lr, t) for t, _ in current))


def next_trial(trials: list[tuple[float, int, bool | None]], d: Design, range_lr: float | None = None):
    """One variant's next trial as (lr, seed), or WAIT, or DONE.

    trials: its trials in the order they were proposed, (lr, seed, stable?), stable None while a
    trial runs; range_lr: where its LR range test failed, when the design has one (the bracket
    starts there)."""
    first = [(lr, ok) for lr, seed, ok in trials if seed == d.seed]
    nxt = next_bracket_lr(first, d, range_lr)
    if nxt is not None:
        return nxt if isinstance(nxt, str) else (nxt, d.seed)
    outcomes = [(lr, seed, ok) for lr, seed, ok in trials if ok is not None]
    pending = [(lr, seed) for lr, seed, ok in trials if ok is None]
    first = [(lr, ok) for lr, ok in first if ok is not None]
    b = bracket(first)
    if d.seeds < 1 or b.stable is None or b.divergent is None:
        # One seed only, or the boundary lies outside the searched range: nothing to place.
        return DONE
    centre = math.sqrt(b.stable * b.divergent)
    lowest, highest = 0, d.points - 1
    while True:
        todo, waiting = [], False
        for level in range(lowest, highest + 1):
            for j in range(d.seeds):
                lr, seed = d.grid_lr(centre, level, j), d.seed + 1 + j
                if any(same(lr, a) and s == seed for a, s in pending):
                    waiting = True
                elif not any(same(lr, a) and s == seed for a, s, _ in outcomes):
                    todo.append((abs(level - (d.points - 1) / 2), (lr, seed)))
        if todo:
            return min(todo)[1]  # nearest the centre first
        if waiting:
            return WAIT
        grown = False
        if (
            lowest > -EXTEND
            and d.grid_lr(centre, lowest - 1, 0) > d.lo
            and any(
                not ok
                for lr, s, ok in outcomes
                for j in range(d.seeds)
                if s == d.seed + 1 + j and same(lr, d.grid_lr(centre, lowest, j))
            )
        ):
            lowest, grown = lowest - 1, True
        if (
            highest < d.points - 1 + EXTEND
            and d.grid_lr(centre, highest + 1, d.seeds - 1) < d.hi
            and any(
                ok
                for lr, s, ok in outcomes
                for j in range(d.seeds)
                if s == d.seed + 1 + j and same(lr, d.grid_lr(centre, highest, j))
            )
        ):
            highest, grown = highest + 1, True
        if not grown:
            return DONE
