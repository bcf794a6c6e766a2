"""Search-space files: valid ones load, and every problem of a bad one is reported at once."""

import copy

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tunestab import spec
from tunestab.spec import SpecError

GOOD = {
    "name": "t",
    "strategy": "max_lr",
    "variants": ["baseline", "mlra"],
    "trial": {"n_layer": 2, "d_model": 32, "n_head": 2, "steps": 20},
    "params": {"lr": {"loguniform": [1e-3, 1.0]}},
}


def problems_of(raw) -> list[str]:
    with pytest.raises(SpecError) as e:
        spec.parse(raw)
    return e.value.problems


def test_a_good_space_parses_into_frozen_parts():
    s = spec.parse(GOOD)
    assert s.strategy == "max_lr" and s.variants == ("baseline", "mlra")
    assert s.param("lr").values == (1e-3, 1.0) and s.max_lr.ratio == 1.41 and s.max_lr.seeds == 4
    assert s.scheduler.type == "tev" and not s.scheduler.shadow
    assert s.trial_config("mlra", lr=0.1).resolved().mlra_rank == 32 // 3


def test_shipped_spaces_load():
    results = spec.SPACES_DIR.parent / "docs" / "results"  # the spaces behind docs/results.md
    paths = sorted(spec.SPACES_DIR.rglob("*.yaml")) + sorted(results.rglob("*.yaml"))
    assert len(paths) >= 17  # the shipped spaces, the proxy study's, the first proxy's
    for path in paths:
        spec.load(str(path))


def test_every_problem_is_reported_with_its_key():
    raw = {
        "name": "a/b",
        "strategy": "fastest",
        "variants": ["baseline", "nope"],
        "colour": "red",
        "trial": {"n_layer": "many", "d_model": 30, "n_head": 4, "stepz": 3},
        "params": {
            "lr": {"loguniform": [1.0, 0.1]},
            "softcap": {"uniform": [-5, 10]},
            "mlra_rank": {"int": [1, 999]},
            "warmup_steps": {"choice": []},
            "batch_size": {"normal": [1, 2]},
        },
        "resources": {"workers": 0, "gpus": 1},
        "tune": {"sampler": "random"},
        "scheduler": {"type": "tev", "rule": {"threshold": -1, "nonsense": 2}},
        "max_lr": {"range_test": "yes", "range_margin": 1.0},
    }
    text = "\n".join(problems_of(raw))
    for fragment in (
        "name:",
        "strategy:",
        "variants: unknown ['nope']",
        "colour: unknown key",
        "trial.n_layer:",
        "trial.stepz: unknown",
        "params.lr.loguniform: low must be below high",
        "params.warmup_steps.choice: expected a non-empty list",
        "params.batch_size.normal: unknown distribution",
        "resources.workers: must be >= 1",
        "resources.gpus: unknown key",
        "tune.sampler:",
        "scheduler.rule.threshold",
        "scheduler.rule.nonsense: unknown key",
        "max_lr.range_test: expected bool",
        "max_lr.range_margin: must be > 1",
    ):
        assert fragment in text, fragment


def test_the_rules_min_step_is_an_int_or_null_for_the_trials_warm_up():
    ok = spec.parse({**GOOD, "scheduler": {"type": "tev", "rule": {"min_step": None, "signal": "growth"}}})
    assert ok.scheduler.rule.min_step is None and ok.scheduler.rule.signal == "growth"
    assert spec.parse({**GOOD, "scheduler": {"type": "tev", "rule": {"min_step": 40}}}).scheduler.rule.min_step == 40
    for bad in ("soon", 2.5, True):
        text = "\n".join(problems_of({**GOOD, "scheduler": {"type": "tev", "rule": {"min_step": bad}}}))
        assert "scheduler.rule.min_step: expected an int (or null: the trial's warm-up)" in text, text


def test_values_are_checked_against_the_model_with_every_variant():
    raw = copy.deepcopy(GOOD)
    raw["strategy"] = "tune"
    raw["params"] = {"lr": {"loguniform": [1e-3, 1.0]}, "mlra_rank": {"int": [1, 64]}, "softcap": {"choice": [0, 30]}}
    raw["variants"] = ["mlra", "qk_norm_cap"]
    text = "\n".join(problems_of(raw))
    assert "params.mlra_rank.int: mlra_rank=64" in text and "between 1 and d_model=32" in text
    assert "params.softcap.choice: softcap=0 with variant qk_norm_cap" in text


@pytest.mark.parametrize(
    "strategy, params, fragment",
    [
        ("max_lr", {"lr": {"uniform": [0.1, 1.0]}}, "needs `lr: {loguniform"),
        ("max_lr", {"lr": {"loguniform": [0.1, 1.0]}, "seed": {"grid": [0, 1]}}, "searches lr alone"),
        ("tune", {"seed": {"grid": [0, 1]}}, "needs at least one range"),
        ("sweep", {"lr": {"loguniform": [0.1, 1.0]}}, "every parameter as a grid"),
    ],
)
def test_strategy_needs_its_parameters(strategy, params, fragment):
    raw = {**GOOD, "strategy": strategy, "params": params}
    assert any(fragment in p for p in problems_of(raw))


def test_a_parameter_fixed_twice_is_refused():
    raw = {**GOOD, "trial": {**GOOD["trial"], "lr": 0.1}}
    assert any("params.lr: also fixed under trial.lr" in p for p in problems_of(raw))


def test_malformed_yaml_names_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nstrategy: [max_lr\nvariants: [baseline]\n")
    with pytest.raises(SpecError) as e:
        spec.load(str(path))
    assert "not valid YAML (line" in str(e.value) and str(path) in str(e.value)


def test_yaml_tags_that_build_objects_are_refused(tmp_path):
    path = tmp_path / "evil.yaml"
    marker = tmp_path / "pwned"
    path.write_text(f"name: !!python/object/apply:os.system ['touch {marker}']\nstrategy: max_lr\n")
    with pytest.raises(SpecError) as e:
        spec.load(str(path))
    assert "not valid YAML" in str(e.value)
    assert not marker.exists()


def test_a_file_that_is_not_utf8_is_one_message_and_exit_2(tmp_path, capsys):
    from tunestab import search

    path = tmp_path / "latin.yaml"
    path.write_bytes(b"name: \xff\xfe\xfa\nstrategy: max_lr\n")
    with pytest.raises(SpecError) as e:
        spec.load(str(path))
    assert e.value.problems == ["not UTF-8 text: byte 0xff at offset 6"] and str(path) in str(e.value)
    assert search.main(["--space", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "not UTF-8 text" in err and "Traceback" not in err


def test_missing_file_and_names_resolve():
    assert spec.resolve_path("default") == spec.SPACES_DIR / "default.yaml"
    with pytest.raises(SpecError) as e:
        spec.load("/nonexistent/space.yaml")
    assert "cannot read the file" in str(e.value)


def test_tune_domains():
    from ray.tune.search.sample import Categorical, Float, Integer

    assert isinstance(spec.Param("lr", "loguniform", (1e-3, 1.0)).tune_domain(), Float)
    rank = spec.Param("mlra_rank", "int", (2, 8)).tune_domain()
    assert isinstance(rank, Integer) and (rank.lower, rank.upper) == (2, 9)  # inclusive in the file
    assert isinstance(spec.Param("softcap", "choice", (10, 30)).tune_domain(), Categorical)
    assert spec.Param("seed", "grid", (0, 1)).tune_domain() == {"grid_search": [0, 1]}


# Whatever a user (or a hostile file) writes, the loader answers with a Space or a SpecError,
# never with another exception that would surface as a traceback.
yaml_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**6), 10**6) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    key=st.sampled_from(spec.TOP_KEYS + ("params.lr", "trial.d_model", "resources.workers", "scheduler.rule")),
    value=yaml_values,
)
@example(key="variants", value=[[1]])  # an unhashable variant name once raised TypeError
@example(key="variants", value=[{"a": 1}])
@example(key="params", value={"lr": {"grid": [[1], [2]]}})
def test_any_value_at_any_key_gives_a_space_or_a_spec_error(key, value):
    raw = copy.deepcopy(GOOD)
    node = raw
    *parents, leaf = key.split(".")
    for p in parents:
        node = node.setdefault(p, {}) if isinstance(node.get(p, {}), dict) else {}
    node[leaf] = value
    try:
        spec.parse(raw)
    except SpecError as e:
        assert e.problems and all(isinstance(p, str) and p for p in e.problems)


def test_the_schema_example_in_search_spaces_readme_is_valid():
    import re

    import yaml

    text = (spec.SPACES_DIR / "README.md").read_text()
    space = spec.parse(yaml.safe_load(re.search(r"```yaml\n(.*?)```", text, re.S).group(1)))
    assert space.strategy == "tune" and space.param("mlra_rank").values == (4, 32)


def test_gpu_resources_that_cannot_work_are_refused():
    two_on_half_a_gpu = {**GOOD, "resources": {"workers": 2, "gpus_per_worker": 0.5}}
    assert any("Duplicate GPU detected" in p for p in problems_of(two_on_half_a_gpu))
    spec.parse({**GOOD, "resources": {"workers": 1, "gpus_per_worker": 0.25}})  # packing one-worker trials is fine
    assert (
        spec.parse({**GOOD, "resources": {"gpus_per_worker": 1, "accelerator_type": "H100"}}).resources.accelerator_type
        == "H100"
    )
    problems = problems_of({**GOOD, "resources": {"gpus_per_worker": 1, "accelerator_type": "H100-80GB"}})
    assert any("unknown 'H100-80GB'" in p and "H100" in p for p in problems)
    assert any("gpus_per_worker is 0" in p for p in problems_of({**GOOD, "resources": {"accelerator_type": "L40S"}}))


def test_micro_batches_must_split_each_workers_share():
    bad = {**GOOD, "trial": {**GOOD["trial"], "batch_size": 16, "micro_batch_size": 8}, "resources": {"workers": 4}}
    assert any(p.startswith("trial.micro_batch_size: 8 does not divide the 4 sequences") for p in problems_of(bad))
    spec.parse({**bad, "resources": {"workers": 2}})


def test_accelerator_names_are_rays():
    from ray.util.accelerators import accelerators

    assert set(spec.ACCELERATOR_TYPES) == {v for k, v in vars(accelerators).items() if k.startswith("NVIDIA_")}


def test_reading_a_space_imports_neither_torch_nor_ray():
    """Checking a file must be instant (it was 4.7 s, through the scheduler's Ray import)."""
    import subprocess
    import sys

    code = (
        "import sys, tunestab.spec as s; s.load('default'); s.load('rybakov_gpu'); "
        "print(sorted(m for m in ('torch', 'ray', 'numpy', 'mlflow', 'optuna') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


SCALE = {
    **GOOD,
    "strategy": "scale",
    "variants": ["baseline", "qk_norm"],
    "scale": {
        "sizes": {"w32": {"d_model": 32}, "w48": {"d_model": 48}, "w64": {"d_model": 64}},
        "target": {"w128": {"d_model": 128, "n_head": 4}},
        "measure_target": True,
    },
}


def test_a_scale_space_brackets_each_variant_at_each_size_and_the_target_when_measured():
    s = spec.parse(SCALE)
    arms = s.arms()
    assert list(arms) == [f"{v}@{n}" for v in ("baseline", "qk_norm") for n in ("w32", "w48", "w64", "w128")]
    assert arms["qk_norm@w128"] == {"variant": "qk_norm", "d_model": 128, "n_head": 4}
    unmeasured = spec.parse({**SCALE, "scale": {**SCALE["scale"], "measure_target": False}})
    assert len(unmeasured.arms()) == 6 and s.scale.logit_threshold == 1e4
    assert spec.parse(GOOD).arms() == {"baseline": {"variant": "baseline"}, "mlra": {"variant": "mlra"}}


@pytest.mark.parametrize(
    "scale, fragment",
    [
        (
            {"sizes": {"w32": {"d_model": 32}}, "target": {"w64": {"d_model": 64}}},
            "scale.sizes: the scale strategy fits a line through two sizes or more, got 1",
        ),
        ({"sizes": {"a": {"d_model": 32}, "b": {"d_model": 48}}}, "scale.target: expected one size to predict, got 0"),
        (
            {"sizes": {"a": {"d_model": 32}, "b": {"lr": 0.1}}, "target": {"c": {"d_model": 64}}},
            "scale.sizes.b.lr: a size cannot set lr",
        ),
        (
            {"sizes": {"a": {"d_model": 32}, "b": {"d_model": 33}}, "target": {"c": {"d_model": 64}}},
            "scale.sizes.b: with variant baseline: d_model",
        ),
        (
            {"sizes": {"a@x": {"d_model": 32}, "b": {"d_model": 48}}, "target": {"c": {"d_model": 64}}},
            "scale.sizes.a@x: a size name is a word",
        ),
        (
            {"sizes": {"a": {"d_model": 32}, "b": {"d_model": 48}}, "target": {"a": {"d_model": 64}}},
            "scale.target: ['a'] is also a measured size",
        ),
        (
            {"sizes": [32, 48], "target": {"c": {"d_model": 64}}},
            "scale.sizes: expected a mapping of size name -> TrialConfig fields",
        ),
        (
            {
                "sizes": {"a": {"d_model": 32}, "b": {"d_model": 48}},
                "target": {"c": {"d_model": 64}},
                "logit_threshold": 0,
            },
            "scale.logit_threshold: expected a number > 0",
        ),
        (
            {
                "sizes": {"a": {"d_model": 32}, "b": {"d_model": 48}},
                "target": {"c": {"d_model": 64}},
                "curvature_prior": -0.1,
            },
            "scale.curvature_prior: expected a number >= 0 (0: a straight line), got -0.1",
        ),
        (
            {"sizes": {"a": {"d_model": 32}, "b": {"d_model": 48}}, "target": {"c": {"d_model": 64}}, "size": 3},
            "scale.size: unknown key",
        ),
        (
            {"sizes": {"a": {"d_model": 32}, "b": {"d_model": 32, "n_layer": 2}}, "target": {"c": {"d_model": 64}}},
            "scale: sizes a and b make the same model",
        ),
        (
            {
                "sizes": {"a": {"d_model": 32, "n_layer": 4}, "b": {"d_model": 48}},
                "target": {"c": {"d_model": 32, "n_layer": 4, "n_head": 2}},
            },
            "scale: sizes a and c make the same model",
        ),
    ],
)
def test_scale_problems_name_their_key(scale, fragment):
    problems = problems_of({**SCALE, "scale": scale})
    assert any(fragment in p for p in problems), problems


def test_scale_needs_the_lr_range_alone():
    problems = problems_of({**SCALE, "params": {"lr": {"loguniform": [1e-3, 1.0]}, "mlra_rank": {"int": [2, 4]}}})
    assert any("the scale strategy searches lr alone" in p for p in problems), problems
