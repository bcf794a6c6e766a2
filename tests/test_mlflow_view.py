"""The MLflow UI view a search saves: its layout, and a round trip through a real MLflow store.
(What the UI makes of it was checked in Chromium against MLflow 3.17: docs/design.md.)"""

import json

from mlflow.tracking import MlflowClient

from tunestab import mlflow_view


def test_the_answer_then_the_stability_charts_come_first_then_the_layers_in_numeric_order():
    state = mlflow_view.view_state("abc123", n_layer=12, arms=["baseline", "qk_norm"])
    sections = [s["name"] for s in state["compareRunSections"]]
    # MLflow would sort layer_10 before layer_2, and every layer before the model metrics.
    assert sections == ["answer", "Stability", "Model metrics"] + [f"layer_{i}" for i in range(12)] + [
        "bookkeeping",
        "System metrics",
    ]
    answer_id, stability = (state["compareRunSections"][i]["uuid"] for i in (0, 1))
    charts = [c for c in state["compareRunCharts"] if not c["deleted"]]
    # Per arm, failed and val_loss against log10 LR: each chart shows that arm's runs alone.
    scatter = [(c["xaxis"]["key"], c["yaxis"]["key"]) for c in charts if c["type"] == "SCATTER"]
    assert scatter == [
        ("answer/log10_lr", "answer/baseline failed"),
        ("answer/log10_lr", "answer/baseline val_loss"),
        ("answer/log10_lr", "answer/qk_norm failed"),
        ("answer/log10_lr", "answer/qk_norm val_loss"),
    ]
    assert all(c["metricSectionId"] == answer_id for c in charts if c["type"] == "SCATTER")
    # The UI would add a bar chart of each answer metric; a deleted card of each keeps it out.
    gone = {c["metricKey"] for c in state["compareRunCharts"] if c["deleted"]}
    assert gone == {"answer/log10_lr"} | {y for _, y in scatter}
    lines = [c for c in charts if c["type"] == "LINE"]
    assert [c["metricKey"] for c in lines] == ["loss", "val_loss", "tev_mean", "tev_std", "tev_dispersion", "lr"]
    assert all(c["metricSectionId"] == stability for c in lines)
    assert next(c for c in lines if c["metricKey"] == "lr")["scaleType"] == "log"
    assert state["runsHiddenMode"] == "SHOW_ALL"
    assert state["groupBy"]["groupByKeys"] == [{"mode": "tag", "groupByData": "variant"}]


def test_the_table_lists_the_parent_first_with_its_answer_then_the_searchs_runs():
    state = mlflow_view.view_state("abc123", n_layer=2)
    # Parent and children share the search tag (MLflow's filter has no OR); oldest first puts
    # the parent, the search's first run, at the top, in its own group.
    assert state["searchFilter"] == "tags.`tunestab.search` = 'abc123'"
    assert state["orderByKey"] == "attributes.start_time" and state["orderByAsc"] is True
    assert state["runsPinned"] == ["abc123"]
    cols = ["tags.`variant`", "tags.`outcome`", "params.`lr`", "metrics.`val_loss`", "tags.`answer`"]
    assert state["selectedColumns"] == state["columnOrder"] == cols
    assert state["columnWidths"]["tags.`answer`"] >= 500


def test_a_saved_view_is_an_experiment_tag_in_the_uis_own_format(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.create_experiment("e", artifact_location=str(tmp_path / "a"))
    mlflow_view.save_view(client, exp, "run1", 2, "s-1")
    mlflow_view.save_view(client, exp, "run2", 4, "s-2")  # a later search in the same experiment
    mlflow_view.save_view(client, exp, "run1", 3, "s-1")  # the first one saved again: replaced
    tags = client.get_experiment(exp).tags
    # Each search keeps its own view: the link the first one printed still shows its trials.
    assert sorted(k for k in tags if k.startswith("mlflow.sharedViewState.")) == [
        "mlflow.sharedViewState.tunestab-run1",
        "mlflow.sharedViewState.tunestab-run2",
    ]
    first, second = (json.loads(tags[f"mlflow.sharedViewState.tunestab-{r}"]) for r in ("run1", "run2"))
    assert first["name"] == "tunestab s-1" and second["name"] == "tunestab s-2"
    assert first["state"].startswith("deflate;")
    assert mlflow_view.read_state(tags["mlflow.sharedViewState.tunestab-run1"]) == mlflow_view.view_state("run1", 3)
    assert mlflow_view.read_state(tags["mlflow.sharedViewState.tunestab-run2"]) == mlflow_view.view_state("run2", 4)


def test_the_link_opens_the_runs_in_the_model_training_view_with_the_saved_view():
    url = mlflow_view.runs_url("http://127.0.0.1:5000/", "7", "0a1b")
    assert url == (
        "http://127.0.0.1:5000/#/experiments/7/runs?workflowType=machine_learning"
        "&compareRunsMode=CHART&viewStateShareKey=tunestab-0a1b"
    )
    run = mlflow_view.run_url("http://127.0.0.1:5000/", "7", "0a1b")
    assert run == "http://127.0.0.1:5000/#/experiments/7/runs/0a1b?workflowType=machine_learning"


def test_a_scale_searchs_runs_carry_their_size_and_its_view_groups_by_variant_and_size(tmp_path):

    from tunestab import search, spec, tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("e", artifact_location=str(tmp_path / "a"))
    parent = client.create_run(exp, run_name="search").info.run_id
    # w64d4's fields include w64's: the trial's size is the one its arm named, not a match of fields.
    space = spec.parse(
        {
            "name": "s",
            "strategy": "scale",
            "variants": ["qk_norm"],
            "trial": {"n_layer": 2},
            "params": {"lr": {"loguniform": [0.01, 1.0]}},
            "scale": {
                "sizes": {
                    "w32": {"d_model": 32, "n_head": 2},
                    "w64": {"d_model": 64, "n_head": 4},
                    "w64d4": {"d_model": 64, "n_head": 4, "n_layer": 4},
                },
                "target": {"w96": {"d_model": 96, "n_head": 6}},
            },
        }
    )
    t = tracking.MLflowTracking(uri, "e", parent)
    # Each trial's config as the scale strategy's searcher hands it out (tests/test_bracket.py): the
    # arm's variant and fields, and its size.
    runs = {
        size: client.get_run(
            t.run_for(f"t{i}-0", f"t{i}", {"variant": "qk_norm", "lr": 0.1, "n_layer": 2, "size": size, **fields})
        )
        for i, (size, fields) in enumerate(space.scale.every_size.items())
    }
    assert list(runs) == ["w32", "w64", "w64d4", "w96"]
    for size, run in runs.items():
        assert run.data.tags["size"] == size and run.data.tags["variant"] == "qk_norm"
        assert run.info.run_name.startswith(f"qk_norm@{size}-")
    # Another strategy's runs are named by variant alone, with no size tag.
    plain = client.get_run(
        tracking.MLflowTracking(uri, "e", parent).run_for(
            "t9-0", "t9", {"variant": "baseline", "lr": 0.1, "d_model": 32}
        )
    )
    assert "size" not in plain.data.tags and plain.info.run_name == "baseline-t9-0"

    search.save_chart_view(client, parent, space, "s-1")
    state = mlflow_view.read_state(client.get_experiment(exp).tags[f"mlflow.sharedViewState.tunestab-{parent}"])
    assert state["groupBy"]["groupByKeys"] == [
        {"mode": "tag", "groupByData": "variant"},
        {"mode": "tag", "groupByData": "size"},
    ]
    assert state["selectedColumns"][:2] == ["tags.`variant`", "tags.`size`"]
    assert [s["name"] for s in state["compareRunSections"]][3:7] == ["layer_0", "layer_1", "layer_2", "layer_3"]
    # An arm is a variant at a size: its charts are named `<variant>/<size>`.
    ys = [c["yaxis"]["key"] for c in state["compareRunCharts"] if c["type"] == "SCATTER"]
    assert ys[:2] == ["answer/qk_norm/w32 failed", "answer/qk_norm/w32 val_loss"] and len(ys) == 2 * 3
    assert all(run.data.tags["tunestab.search"] == parent for run in runs.values())
