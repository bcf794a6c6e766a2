"""The MLflow UI view a search opens with: the answer first, then its runs as charts.

MLflow's experiment page puts every metric with a prefix (`layer_0/attn_logit_max`) in a chart
section named by the prefix, sorts those sections alphabetically, and puts the unprefixed metrics
("Model metrics") after all of them: a search's 6 x n_layer per-layer charts would fill the
screen ahead of its loss. MLflow keeps a saved view of that page as an experiment tag
(`mlflow.sharedViewState.<key>`, what its "Views > Save as new view" writes) and opens it from a
link with `viewStateShareKey=<key>`. Each search saves one such view, keyed by its parent run
(`tunestab-<parent run id>`, so the link a search printed keeps showing that search after
another one in the same experiment, and a resumed search keeps its own):
- the table: the parent run first, in a group of its own, with its `answer` (the summary in one
  line) and `outcome` (how its members ended) columns filled; then the search's runs by variant
  (and by size, for the scale strategy), every one plotted;
- the charts: an "answer" section of two scatter charts per arm, failed (0/1) and val_loss against
  log10 LR (outcome.answer_metrics: MLflow's scatter axes are linear and colour runs, not
  variants, so each arm gets charts of its own); then loss, val_loss, tev_mean, tev_std, the TEV
  dispersion and lr, the other model metrics, the layers in numeric order, and the bookkeeping.
The format is the MLflow UI's own (checked against MLflow 3.17 in a browser; docs/design.md): if
a later UI cannot read it, the link says the view is invalid and the page falls back to its
default layout, nothing worse.
"""

from __future__ import annotations

import base64
import json
import time
import zlib

from .outcome import ANSWER_SECTION, BOOKKEEPING_SECTION, LOG10_LR, answer_keys

TAG_PREFIX = "mlflow.sharedViewState."
MAIN_CHARTS = ("loss", "val_loss", "tev_mean", "tev_std", "tev_dispersion", "lr")
MAIN_SECTION = "Stability"
# MLflow's names for the sections of unprefixed and of system metrics.
MODEL_SECTION, SYSTEM_SECTION = "Model metrics", "System metrics"
SEARCH_TAG = "tunestab.search"
"""On the parent run and every child: the search's parent run id (tunestab/tracking.py)."""
# The parent run's tags that fill its row: grouped on its own under the variant column (a group
# first in the table, as the parent is the search's oldest run), then its answer and outcomes.
PARENT_GROUP_TAG, PARENT_GROUP = "variant", "(the answer)"
ANSWER_TAG = "answer"
COLUMNS = ["tags.`variant`", "tags.`outcome`", "params.`lr`", "metrics.`val_loss`", f"tags.`{ANSWER_TAG}`"]
# Pixels: the answer is one line of a few variants and ratios.
COLUMN_WIDTHS = {"tags.`outcome`": 170, f"tags.`{ANSWER_TAG}`": 640}


def _section(name: str) -> dict:
    return {
        "uuid": f"tunestab-section-{name}",
        "name": name,
        "display": True,
        "isReordered": True,
        "deleted": False,
        "isGenerated": False,
    }


def _line_chart(metric: str, section: str) -> dict:
    # The fields of the UI's line-chart card, with the defaults it gives a generated one.
    return {
        "uuid": f"tunestab-chart-{metric}",
        "type": "LINE",
        "runsCountToCompare": 10,
        "metricSectionId": f"tunestab-section-{section}",
        "deleted": False,
        "isGenerated": False,
        "displayName": metric,
        "metricKey": metric,
        "selectedMetricKeys": [metric],
        "lineSmoothness": 0,
        "xAxisScaleType": "linear",
        "scaleType": "log" if metric == "lr" else "linear",
        "range": {},
        "xAxisKey": "step",
        "selectedXAxisMetricKey": "",
        "yAxisKey": "METRIC",
        "yAxisExpressions": [],
        "ignoreOutliers": False,
        "useGlobalXaxisKey": True,
        "useGlobalLineSmoothing": True,
    }


def _scatter_chart(y: str) -> dict:
    # The UI's scatter card: it titles the chart "<x> vs. <y>" from the keys.
    return {
        "uuid": f"tunestab-scatter-{y}",
        "type": "SCATTER",
        "runsCountToCompare": 10_000,
        "metricSectionId": f"tunestab-section-{ANSWER_SECTION}",
        "deleted": False,
        "isGenerated": False,
        "xaxis": {"key": LOG10_LR, "type": "METRIC"},
        "yaxis": {"key": y, "type": "METRIC"},
    }


def _no_chart(metric: str) -> dict:
    # A deleted card: the UI adds a bar chart for every metric without a card, and these are
    # already on the scatter charts' axes.
    return {
        "uuid": f"tunestab-none-{metric}",
        "type": "BAR",
        "metricKey": metric,
        "metricSectionId": f"tunestab-section-{ANSWER_SECTION}",
        "displayName": metric,
        "deleted": True,
        "isGenerated": True,
    }


def answer_charts(arms: list[str]) -> list[dict]:
    """Per arm, failed and val_loss against log10 LR; no other chart of those metrics."""
    keys = [k for arm in arms for k in answer_keys(arm)]
    return [_scatter_chart(k) for k in keys] + [_no_chart(k) for k in [LOG10_LR, *keys]]


def view_state(
    parent_run_id: str, n_layer: int, group_by: tuple[str, ...] = ("variant",), arms: list[str] | None = None
) -> dict:
    """The experiment page's state: the parent run first, then the search's runs, every one
    shown, grouped in the table by the run tags `group_by`; the answer charts of `arms` (the
    labels outcome.arm_label gives) first."""
    sections = (
        [ANSWER_SECTION, MAIN_SECTION, MODEL_SECTION]
        + [f"layer_{i}" for i in range(n_layer)]
        + [BOOKKEEPING_SECTION, SYSTEM_SECTION]
    )
    columns = [c for c in COLUMNS if c != "tags.`variant`"]
    columns = [f"tags.`{t}`" for t in group_by] + columns
    return {
        # The parent and its children (MLflow's filter has no OR; they share SEARCH_TAG), oldest
        # first: the parent, which is the search's first run, heads the table.
        "searchFilter": f"tags.`{SEARCH_TAG}` = '{parent_run_id}'",
        "orderByKey": "attributes.start_time",
        "orderByAsc": True,
        "startTime": "ALL",
        "lifecycleFilter": "Active",
        "datasetsFilter": [],
        "modelVersionFilter": "All Runs",
        "selectedColumns": columns,
        # The UI reorders and sizes columns only from these two; without them the answer column
        # is cut to a few characters.
        "columnOrder": columns,
        "columnWidths": COLUMN_WIDTHS,
        "runsPinned": [parent_run_id],
        "runsHiddenMode": "SHOW_ALL",
        "compareRunCharts": answer_charts(arms or []) + [_line_chart(m, MAIN_SECTION) for m in MAIN_CHARTS],
        "compareRunSections": [_section(s) for s in sections],
        "viewMaximized": False,
        "runListHidden": False,
        "isAccordionReordered": True,
        "useGroupedValuesInCharts": False,
        "hideEmptyCharts": True,
        "groupBy": {
            "aggregateFunction": "average",
            "groupByKeys": [{"mode": "tag", "groupByData": t} for t in group_by],
        },
        "groupsExpanded": {},
        "globalLineChartConfig": {"xAxisKey": "step", "lineSmoothness": 0, "selectedXAxisMetricKey": ""},
    }


def tag_value(name: str, state: dict) -> str:
    """A saved view as the UI writes it: its name, times, and the state deflated and base64'd."""
    now = int(time.time() * 1000)
    packed = base64.b64encode(zlib.compress(json.dumps(state, separators=(",", ":")).encode())).decode()
    return json.dumps({"name": name, "createdAt": now, "updatedAt": now, "state": f"deflate;{packed}"})


def read_state(value: str) -> dict:
    """The state inside a saved view's tag value (the inverse of tag_value)."""
    state = json.loads(value)["state"]
    return json.loads(zlib.decompress(base64.b64decode(state.split(";", 1)[1])))


def view_key(parent_run_id: str) -> str:
    """The key of a search's view: `viewStateShareKey` in its link, the end of its tag's name."""
    return f"tunestab-{parent_run_id}"


def save_view(
    client,
    experiment_id: str,
    parent_run_id: str,
    n_layer: int,
    name: str,
    group_by: tuple[str, ...] = ("variant",),
    arms: list[str] | None = None,
) -> None:
    """Save (or replace) this search's view, listed in the UI's Views menu as "tunestab <name>"."""
    client.set_experiment_tag(
        experiment_id,
        TAG_PREFIX + view_key(parent_run_id),
        tag_value(f"tunestab {name}", view_state(parent_run_id, n_layer, group_by, arms)),
    )


TRAINING_VIEW = "workflowType=machine_learning"
"""The query that keeps MLflow 3's UI in its model-training view; without it, it opens GenAI's."""


def _runs(ui: str, experiment_id: str) -> str:
    return f"{ui.rstrip('/')}/#/experiments/{experiment_id}/runs"


def runs_url(ui: str, experiment_id: str, parent_run_id: str) -> str:
    """The experiment's runs in MLflow's model-training view, with the search's saved view."""
    return (
        f"{_runs(ui, experiment_id)}?{TRAINING_VIEW}&compareRunsMode=CHART&viewStateShareKey={view_key(parent_run_id)}"
    )


def run_url(ui: str, experiment_id: str, run_id: str) -> str:
    """One run's page, in the model-training view."""
    return f"{_runs(ui, experiment_id)}/{run_id}?{TRAINING_VIEW}"
