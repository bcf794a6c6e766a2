"""Members of a population: the results users see, one per (variant, size, LR, seed, ...).

A Tune trial trains a population: members that share an architecture and size and differ only in
`MEMBER_FIELDS` (tunestab/loop.py, `run_population`). Its config holds the shared fields once and
each member's own under `members`; each report holds every member still training under
`members`. Everything after Tune reads members, not trials: the TEV scheduler, the Optuna
searchers, MLflow (a child run per member), the trial table, the plots and the fits. This module
is where a trial's config and results become its members'. Pure Python, no Ray.

What Tune keeps of a trial's result (`keep`, through the search's TrialOutcome callback) holds
every member's latest kept report, so the trial's last result holds each member's final one: a
member that ended early keeps its last report, and a member the TEV scheduler stopped keeps its
report at the verdict step, whatever the worker trained after it (a lone trial stopped there
would have nothing after it either).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .outcome import STEP, STOP_REASON, TRIAL_ID, StopReason

MEMBERS = "members"
MEMBER_ID = "member_id"
MEMBER_FIELDS = ("lr", "seed")
"""What members of one population may differ in; every other config field they share."""
RUNNER = "runner"


def member_configs(config: Mapping) -> dict[str, dict]:
    """member id -> its whole config (the shared fields and its own), without the runner."""
    base = {k: v for k, v in config.items() if k not in (RUNNER, MEMBERS)}
    out = {}
    for mid, fields in (config.get(MEMBERS) or {}).items():
        merged = {**base, **fields}
        # A member field left None at the top (population_config) that the member does not set
        # is left out: the member takes TrialConfig's default, as a lone trial would.
        out[mid] = {k: v for k, v in merged.items() if not (v is None and k in MEMBER_FIELDS)}
    return out


def shared_key(config: Mapping, fields=MEMBER_FIELDS) -> str:
    """What decides whether two member configs can train in one population: all but `fields`."""
    return json.dumps({k: v for k, v in config.items() if k not in fields}, sort_keys=True, default=str)


def population_config(configs: dict[str, dict], fields=MEMBER_FIELDS) -> dict:
    """The Tune config of a population of `configs` (member id -> config), which share their
    `shared_key`: the shared fields once, and each member's own `fields` under `members`."""
    first = next(iter(configs.values()))
    own = {mid: {k: c[k] for k in fields if k in c} for mid, c in configs.items()}
    # None over a member field at the top: Tune merges this config into the param space, whose
    # entry for the field (a search domain) must not stand beside the members' own values.
    base = {k: (None if k in fields else v) for k, v in first.items()}
    return {**base, MEMBERS: own}


def reports_of(result: Mapping) -> dict[str, dict]:
    """member id -> its report, from a result as the worker sent it or from Tune's flattened
    copy of it ("members/<id>/<metric>")."""
    nested = result.get(MEMBERS)
    if isinstance(nested, Mapping):
        return {mid: dict(m) for mid, m in nested.items()}
    out: dict[str, dict] = {}
    prefix = MEMBERS + "/"
    for key, value in result.items():
        if key.startswith(prefix):
            mid, _, name = key[len(prefix) :].partition("/")
            out.setdefault(mid, {})[name] = value
    return out


def ended(report: Mapping | None) -> bool:
    """Whether a member's report is its last: it diverged, completed, or was stopped."""
    return report is not None and report.get(STOP_REASON) not in (None, StopReason.RUNNING)


def keep(kept: Mapping[str, dict], fresh: Mapping[str, dict]) -> dict[str, dict]:
    """Every member's latest report worth keeping: the fresh ones, except for members whose kept
    report was already their last (a TEV stop the worker had not yet heard of)."""
    out = dict(kept)
    for mid, report in fresh.items():
        if not ended(kept.get(mid)):
            out[mid] = report
    return out


def tally(kept: Mapping[str, dict]) -> str:
    """Members by how they stand: "running 3, completed 1, tev 1"."""
    counts: dict[str, int] = {}
    for report in kept.values():
        reason = str(report.get(STOP_REASON, StopReason.RUNNING))
        counts[reason] = counts.get(reason, 0) + 1
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: kv[0] != StopReason.RUNNING))


def is_fresh(report: Mapping, result: Mapping) -> bool:
    """Whether a kept report was made at this result's step (not carried from an earlier one)."""
    return report.get(STEP) == result.get(STEP)


def reports(trial_path: str) -> list[dict]:
    """A trial's results in order, as Tune wrote them to its result.json ([] before the first)."""
    path = Path(trial_path) / "result.json"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def fresh_reports(results: list[dict], member_id: str) -> list[dict]:
    """A member's reports in order from its trial's results (result.json), each at the step it
    was made: not the copies of an ended member's last report that later results carry."""
    return [
        r[MEMBERS][member_id]
        for r in results
        if member_id in (r.get(MEMBERS) or {}) and is_fresh(r[MEMBERS][member_id], r)
    ]


@dataclass
class MemberResult:
    """One member as the report reads it, shaped like Tune's `Result`: its config, its final
    metrics, the trial's error if the member was still training when it came, and its reports."""

    member_id: str
    config: dict
    metrics: dict | None
    error: object = None
    path: str | None = None

    def history(self) -> list[dict]:
        """Its reports in order, from the trial's result.json (each at the step it was made)."""
        return fresh_reports(reports(self.path), self.member_id) if self.path else []

    @property
    def metrics_dataframe(self):
        import pandas as pd

        rows = self.history()
        return pd.DataFrame(rows) if rows else None


def expand(grid) -> list:
    """Tune's results (a ResultGrid or a list of Results) as their members' results: a
    `MemberResult` per member, and a trial of one model (run before populations) as it is."""
    out = []
    for r in grid:
        if MEMBERS not in (r.config or {}):
            # A trial of one model (a search from before populations): it is its one member.
            out.append(r)
            continue
        finals = (r.metrics or {}).get(MEMBERS) or {}
        for mid, config in member_configs(r.config).items():
            metrics = finals.get(mid)
            if metrics is not None:
                metrics = {**metrics, TRIAL_ID: mid}
            error = r.error if r.error is not None and not ended(metrics) else None
            out.append(MemberResult(mid, config, metrics, error, getattr(r, "path", None)))
    return out
