"""Config validation reports every problem at once; variants are presets of composable switches."""

import pytest

from tunestab.config import VARIANTS, ConfigError, TrialConfig, config_from


def test_every_problem_is_reported_at_once():
    with pytest.raises(ConfigError) as err:
        config_from(
            {
                "variant": "gpt5",
                "mlra_rank": 0,
                "softcap": -1.0,
                "d_model": 130,
                "n_head": 4,
                "n_layer": -1,
                "seq_len": 0,
            }
        )
    text = str(err.value)
    for key in ("variant", "softcap", "d_model", "n_layer", "seq_len"):
        assert f"  - {key}:" in text, key
    assert len(err.value.problems) == 5
    assert "gpt5" in text and "baseline" in text  # says what is wrong and what would be right


@pytest.mark.parametrize(
    "values,key",
    [
        ({"variant": "mlra", "mlra_rank": 0}, "mlra_rank"),
        ({"mlra_rank": 129}, "mlra_rank"),
        ({"mlra_rank": -2}, "mlra_rank"),
        ({"variant": "softcap", "softcap": 0.0}, "softcap"),
        ({"final_softcap": -3.0}, "final_softcap"),
        ({"d_model": 100, "n_head": 3}, "d_model"),
        ({"batch_size": -8}, "batch_size"),
        ({"lr": 0.0}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"bogus": 1}, "bogus"),
        ({"n_layer": "three"}, "n_layer"),
        ({"n_layer": 2.5}, "n_layer"),
        ({"qk_norm": "maybe"}, "qk_norm"),
        ({"lr_schedule": "linear"}, "lr_schedule"),
        ({"lr_schedule": "range", "lr": 1.0, "lr_range_start": 1.0}, "lr_range_start"),
        ({"lr_schedule": "range", "lr_range_start": 0.0}, "lr_range_start"),
    ],
)
def test_each_impossible_value_names_its_key(values, key):
    with pytest.raises(ConfigError) as err:
        config_from(values)
    assert err.value.problems and all(p.startswith(f"{key}:") for p in err.value.problems)


def test_command_line_strings_are_typed():
    cfg = config_from({"n_layer": "6", "lr": "3e-2", "qk_norm": "true", "variant": "mlra", "mlra_rank": "8"})
    assert cfg.n_layer == 6 and cfg.lr == 0.03 and cfg.qk_norm is True and cfg.mlra_rank == 8


def test_variants_are_presets_and_explicit_switches_win():
    assert TrialConfig(variant="qk_norm_cap").resolved().softcap == 50.0
    assert TrialConfig(variant="qk_norm_cap").resolved().qk_norm is True
    assert TrialConfig(variant="softcap", softcap=20.0).resolved().softcap == 20.0
    qkv = TrialConfig(variant="qkv_norm").resolved()
    assert qkv.qkv_norm and not qkv.qk_norm and not qkv.post_norm
    both = TrialConfig(variant="mlra", softcap=30.0).resolved()
    assert both.mlra_rank == 128 // 5 and both.softcap == 30.0
    base = TrialConfig().resolved()
    assert (base.qk_norm, base.softcap, base.post_norm, base.qkv_norm, base.mlra_rank, base.sigma_reparam) == (
        False,
        0.0,
        False,
        False,
        0,
        False,
    )
    assert set(VARIANTS) == {
        "baseline",
        "qk_norm",
        "softcap",
        "qk_norm_cap",
        "qk_fc_norm",
        "qkv_norm",
        "mlra",
        "sigma_reparam",
    }
