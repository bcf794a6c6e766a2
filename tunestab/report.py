"""After a search: its report, in three separate steps.

1. The space's strategy computes its tables, plots, parent-run metrics and console text into a
   `Report` (tunestab/strategies/; the shared summary is strategies/base.py's), from every
   member of every trial's population, one row and one result each.
2. The files are written to the run folder (names: tunestab/run_dir.py).
3. The metrics, tags and files are logged on the MLflow parent run, and the console text is
   printed with where to look. If MLflow fails, the files still hold everything and
   `python -m tunestab.replay` finishes the parent run later.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import run_dir as rd
from .members import expand
from .mlflow_view import ANSWER_TAG, PARENT_GROUP, PARENT_GROUP_TAG
from .outcome import OUTCOME
from .strategies import of
from .tables import answer_line, outcome_counts, trial_table


@dataclass
class Report:
    """What a strategy's report holds before any of it is written or logged."""

    files: dict[str, object] = field(default_factory=dict)
    """File name -> a DataFrame (CSV), a str (text) or (plot function, its arguments) (PNG)."""
    metrics: dict[str, float] = field(default_factory=dict)
    """Parent-run metrics; a NaN (no value) is left out, never logged."""
    tags: dict[str, str] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)
    """The console text, in order."""

    def table(self, name: str, df) -> None:
        self.files[name] = df

    def text(self, name: str, text: str) -> None:
        self.files[name] = text

    def plot(self, name: str, fn, *args) -> None:
        self.files[name] = (fn, args)

    def metric(self, key: str, value) -> None:
        if value is not None and not math.isnan(float(value)):
            self.metrics[key] = float(value)

    def tag(self, key: str, value: str) -> None:
        self.tags[key] = value

    def say(self, text: str) -> None:
        self.lines.append(text)

    def write(self, folder: Path) -> list[Path]:
        """Write every file into folder; returns their paths, in order."""
        out = []
        for name, content in self.files.items():
            path = folder / name
            if isinstance(content, str):
                path.write_text(content)
            elif isinstance(content, tuple):
                fn, args = content
                fn(*args, path)
            else:
                content.to_csv(path, index=False)
            out.append(path)
        return out


def build(space, grid) -> Report:
    """The report of a search's results (grid: Tune's results, whose members are read as the
    results they are: tunestab/members.py)."""
    strategy = of(space)
    grid = expand(grid)
    every = trial_table(space, grid, strategy.table_columns(space))
    out = Report()
    strategy.report(space, every, list(grid), out)
    summary = out.files.get(rd.SUMMARY_MD)
    if isinstance(summary, str):
        # MLflow shows this tag as the run's description, at the top of the parent run's page:
        # the answer where a user who opens the search in the UI looks first.
        out.tag(NOTE_TAG, description(space, summary))
    # The parent's row in the search's view (tunestab/mlflow_view.py), first in its table: a
    # group of its own, how every member ended, and the answer in one line.
    out.tag(PARENT_GROUP_TAG, PARENT_GROUP)
    out.tag(OUTCOME, outcome_counts(every))
    table = out.files.get(rd.SUMMARY_CSV)
    if hasattr(table, "columns") and {"basis", "largest_stable_lr"} <= set(table.columns):
        out.tag(ANSWER_TAG, answer_line(table, out.files.get(rd.RATIOS_CSV)))
    return out


NOTE_TAG = "mlflow.note.content"
"""The MLflow tag the UI renders, as markdown, as a run's description."""


def description(space, summary_md: str) -> str:
    """The parent run's description: the summary, its brackets escaped (MLflow's markdown reads
    "[0.0168, 0.0208] (bracket)" as a link, as seen in Chromium)."""
    escaped = summary_md.replace("[", "\\[").replace("]", "\\]")
    return f"**{space.name}** ({space.strategy})\n\n{escaped}"


def log_parent(out: Report, files: list[Path], tracking_uri: str, parent_run_id: str) -> str:
    """Log the report on the parent run and end it FINISHED; returns the experiment id."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    for key, value in out.tags.items():
        client.set_tag(parent_run_id, key, value)
    if out.metrics:
        client.log_batch(parent_run_id, metrics=[Metric(k, v, 0, 0) for k, v in out.metrics.items()])
    for f in files:
        client.log_artifact(parent_run_id, str(f))
    # Last, so that a reader who sees the parent FINISHED finds everything on it.
    client.set_terminated(parent_run_id, "FINISHED")
    return client.get_run(parent_run_id).info.experiment_id


def report(space, grid, tracking_uri: str, parent_run_id: str, run_dir: Path):
    """Print the summary, write the tables and plots to run_dir, and log them on the parent run.
    Returns the summary table."""
    from .mlflow_view import run_url, runs_url

    out = build(space, grid)
    files = out.write(run_dir)
    summary = out.files[rd.SUMMARY_CSV]
    for line in out.lines:
        print(line)
    print(f"Results: {run_dir}")
    try:
        exp = log_parent(out, files, tracking_uri, parent_run_id)
    except Exception as e:  # the tracking store went away: the files above hold it all
        with open(run_dir / rd.INCOMPLETE_FILE, "a") as f:
            f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} parent run: {type(e).__name__}: {e}\n")
        print(
            f"MLflow at {tracking_uri} failed ({type(e).__name__}: {str(e)[:200]}): the parent run is not "
            f"complete. When it is back:\n  python -m tunestab.replay {run_dir}"
        )
        return summary
    remote = tracking_uri.startswith(("http://", "https://"))
    ui = tracking_uri if remote else "http://127.0.0.1:5000"
    start = "  " if remote else f"  mlflow ui --backend-store-uri {tracking_uri} --port 5000\n  then open "
    print(
        f"MLflow: experiment {space.name!r} (id {exp}), parent run {parent_run_id}.\n"
        f"{start}{runs_url(ui, exp, parent_run_id)}\n"
        f"  (the answer's charts first, then the stability charts); the answer, on the parent run's page:\n"
        f"  {run_url(ui, exp, parent_run_id)}"
    )
    if (run_dir / rd.INCOMPLETE_FILE).exists():
        print(
            f"Some results did not reach MLflow while it was away ({run_dir / rd.INCOMPLETE_FILE}); log them with\n"
            f"  python -m tunestab.replay {run_dir}"
        )
    sys.stdout.flush()
    return summary
