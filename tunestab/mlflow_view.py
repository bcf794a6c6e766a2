"""The MLflow UI view a search opens with: its runs as charts, the stability charts first.

MLflow's experiment page puts every metric with a prefix (`layer_0/attn_logit_max`) in a chart
section named by the prefix, sorts those sections alphabetically, and puts the unprefixed metrics
("Model metrics") after all of them: a search's 6 x n_layer per-layer charts would fill the
screen ahead of its loss. MLflow keeps a saved view of that page as an experiment tag
(`mlflow.sharedViewState.<key>`, what its "Views > Save as new view" writes) and opens it from a
link with `viewStateShareKey=<key>`. Each search saves one such view, keyed by its parent run
(`tunestab-<parent run id>`, so the link a search printed keeps showing that search after
another one in the same experiment, and a resumed search keeps its own): a first section
with loss, val_loss, tev_mean, tev_std, the TEV dispersion and lr, then the other model metrics,
then the layers in numeric order, then the search's bookkeeping; the search's trials listed by variant (and by size, for the
scale strategy), every one plotted.
The format is the MLflow UI's own (checked against MLflow 3.17 in a browser; docs/design.md): if
a later UI cannot read it, the link says the view is invalid and the page falls back to its
default layout, nothing worse.
"""

from __future__ import annotations

import base64
import json
import time
import zlib

from .outcome import BOOKKEEPING_SECTION

TAG_PREFIX = "mlflow.sharedViewState."
MAIN_CHARTS = ("loss", "val_loss", "tev_mean", "tev_std", "tev_dispersion", "lr")
MAIN_SECTION = "Stability"
# MLflow's names for the sections of unprefixed and of system metrics.
MODEL_SECTION, SYSTEM_SECTION = "Model metrics", "System metrics"


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


def view_state(parent_run_id: str, n_layer: int, group_by: tuple[str, ...] = ("variant",)) -> dict:
    """The experiment page's state: the charts of the search's trials, every one shown, grouped
    in the table by the run tags `group_by`."""
    sections = (
        [MAIN_SECTION, MODEL_SECTION] + [f"layer_{i}" for i in range(n_layer)] + [BOOKKEEPING_SECTION, SYSTEM_SECTION]
    )
    return {
        # The search's trials alone, flat (a filter that leaves the parent out shows its children
        # as rows of their own), grouped in the table.
        "searchFilter": f"tags.`mlflow.parentRunId` = '{parent_run_id}'",
        "orderByKey": "attributes.start_time",
        "orderByAsc": False,
        "startTime": "ALL",
        "lifecycleFilter": "Active",
        "datasetsFilter": [],
        "modelVersionFilter": "All Runs",
        "selectedColumns": [f"tags.`{t}`" for t in group_by]
        + ["params.`lr`", "tags.`stop_reason`", "metrics.`val_loss`"],
        "columnOrder": [],
        "columnWidths": {},
        "runsHiddenMode": "SHOW_ALL",
        "compareRunCharts": [_line_chart(m, MAIN_SECTION) for m in MAIN_CHARTS],
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
    client, experiment_id: str, parent_run_id: str, n_layer: int, name: str, group_by: tuple[str, ...] = ("variant",)
) -> None:
    """Save (or replace) this search's view, listed in the UI's Views menu as "tunestab <name>"."""
    client.set_experiment_tag(
        experiment_id,
        TAG_PREFIX + view_key(parent_run_id),
        tag_value(f"tunestab {name}", view_state(parent_run_id, n_layer, group_by)),
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
