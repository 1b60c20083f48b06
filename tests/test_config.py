import pytest

from nabla_lc import ConfigError, NablaConfig
from nabla_lc.config import MAX_LR, MIN_TEMPERATURE, MIN_TOP_P


def test_paper_defaults():
    c = NablaConfig()
    assert (c.lr, c.min_lr, c.dto_steps, c.entropy_threshold, c.grad_threshold) == (0.01, 0.001, 20, 0.25, 8.0)
    assert (c.temperature, c.top_p, c.n, c.method, c.dto_positions) == (0.5, 0.95, 8, "nabla", "all")
    assert c.reward_weight == pytest.approx(1.0 / 1e-3)


@pytest.mark.parametrize(
    "field,value",
    [("n", 0), ("lr", -1.0), ("min_lr", 0.5), ("top_p", 0.0), ("temperature", float("nan")), ("method", "mcts"), ("beam_width", 0), ("step_tokens", -1), ("resample_temperature", 0.0),
     ("dto_positions", "last"), ("max_new_tokens", 0), ("tau", 0), ("seed", 1.5), ("stop", ("",)), ("n", True)],
)
def test_bad_values_name_the_field(field, value):
    with pytest.raises(ConfigError, match=rf"NablaConfig\.{field}"):
        NablaConfig(**{field: value})


@pytest.mark.parametrize(
    "field,value",
    [("temperature", 1e-45), ("tau", 1e-300), ("st_tau", 1e-300), ("lr", 1e300), ("top_p", 1e-300), ("weight_decay", 1e38)],
)
def test_extreme_finite_values_are_refused_naming_the_field(field, value):
    # each of these passed the old checks and ended in a NaN distribution ("probability tensor contains inf/nan")
    with pytest.raises(ConfigError, match=rf"NablaConfig\.{field}"):
        NablaConfig(**{field: value})


def test_values_at_the_bounds_are_accepted():
    NablaConfig(temperature=MIN_TEMPERATURE, tau=MIN_TEMPERATURE, st_tau=MIN_TEMPERATURE, top_p=MIN_TOP_P, lr=MAX_LR, weight_decay=1 / MAX_LR)
    assert NablaConfig(temperature=0.0).temperature == 0.0  # greedy stays allowed below the bound


def test_unknown_field_is_rejected_not_guessed():
    with pytest.raises(ConfigError, match="temprature"):
        NablaConfig().replace(temprature=0.3)
    with pytest.raises(ConfigError, match="unknown"):
        NablaConfig.from_dict({"n_max": 4})


def test_round_trip():
    c = NablaConfig(method="bon", stop=("\n\n",), seed=3)
    assert NablaConfig.from_dict(c.to_dict()) == c
