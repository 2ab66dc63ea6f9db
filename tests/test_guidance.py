"""Hyperparameter guidance: each rule fires far outside the recipe, and only there."""

import pytest

from loralab.guidance import Advice, check_hyperparameters, compare_to_head_only, recommended_lr

GOOD = dict(r=16, lora_alpha=32, lr=2e-4, epochs=3, warmup_ratio=0.06, lora_dropout=0.05, n_examples=5000)


def rules(**changes):
    return [a.rule for a in check_hyperparameters(**(GOOD | changes))]


@pytest.mark.parametrize("changes", [
    {}, dict(r=8, lora_alpha=8), dict(r=8, lora_alpha=16), dict(lr=1e-3), dict(lr=1e-5), dict(epochs=1),
    dict(warmup_ratio=0.0), dict(warmup_ratio=0.1), dict(lora_dropout=0.0), dict(lora_dropout=0.1, n_examples=300),
    dict(n_examples=None), dict(r=64, lora_alpha=16), dict(r=4, lora_alpha=32),        # ratios 0.25 and 8: edges
])
def test_reasonable_settings_give_no_advice(changes):
    assert rules(**changes) == []


@pytest.mark.parametrize("changes, rule", [
    (dict(lr=1e-2), "lr_high"), (dict(lr=0.5), "lr_high"), (dict(lr=1e-6), "lr_low"), (dict(lr=1e-8), "lr_low"),
    (dict(r=64, lora_alpha=8), "alpha_ratio"), (dict(r=2, lora_alpha=32), "alpha_ratio"),
    (dict(epochs=20), "epochs_many"), (dict(warmup_ratio=0.5), "warmup_long"), (dict(lora_dropout=0.5), "dropout_high"),
])
def test_each_rule_fires_alone(changes, rule):
    assert rules(**changes) == [rule]


def test_advice_has_the_numbers_and_the_fix():
    (a,) = check_hyperparameters(**(GOOD | dict(r=64, lora_alpha=8)))
    assert "8/64 = 0.125" in a.message and "--lora-alpha 64 or 128" in a.fix
    assert str(a) == f"{a.message}; fix: {a.fix}"
    (a,) = check_hyperparameters(**(GOOD | dict(lr=0.05)))
    assert "--lr 0.0002" in a.fix
    (a,) = check_hyperparameters(**(GOOD | dict(lora_dropout=0.4, n_examples=500)))
    assert "usual 0.1 for 500 examples" in a.message and a.fix == "use --lora-dropout 0.1"


def test_lr_recommendation_halves_above_33b():
    assert recommended_lr(7e9) == 2e-4 and recommended_lr(70e9) == 1e-4 and recommended_lr() == 2e-4
    (a,) = check_hyperparameters(**(GOOD | dict(lr=0.02)), model_params=70e9)
    assert "usual 0.0001" in a.message and a.fix == "use --lr 0.0001"


def test_rank_above_layer_dims_is_one_line_for_all_layers():
    dims = {f"layers.{i}.q_proj": (64, 64) for i in range(4)}
    dims |= {f"layers.{i}.down": (256, 12) for i in range(3)} | {"head": (64, 8)}
    advice = check_hyperparameters(**(GOOD | dict(r=16)), module_dims=dims)
    assert [a.rule for a in advice] == ["rank_above_dims"]
    assert "4 of 8 adapted layers" in advice[0].message and "smallest: head, 64 -> 8" in advice[0].message
    assert "lower r to 8" in advice[0].fix
    assert check_hyperparameters(**(GOOD | dict(r=8, lora_alpha=16)), module_dims=dims) == []


def test_several_problems_give_one_line_each():
    assert rules(lr=0.1, r=1, lora_alpha=64, epochs=50) == ["lr_high", "alpha_ratio", "epochs_many"]


@pytest.mark.parametrize("bad, message", [(dict(r=0), "r must be"), (dict(lr=-1), "lr must be"),
                                          (dict(lr=float("nan")), "lr must be"), (dict(warmup_ratio=1.0), "warmup"),
                                          (dict(n_examples=-1), "n_examples"), (dict(r=True), "r must be")])
def test_invalid_values_are_errors_not_advice(bad, message):
    with pytest.raises(ValueError, match=message):
        check_hyperparameters(**(GOOD | bad))


def test_compare_to_head_only():
    assert compare_to_head_only(0.95, 0.62) is None
    assert compare_to_head_only(0.62, 0.62) is None
    advice = compare_to_head_only(0.55, 0.62)
    assert isinstance(advice, Advice) and advice.rule == "lora_below_head_only"
    assert "0.55 vs 0.62" in advice.message
    assert "--epochs" in advice.fix and "--lr" in advice.fix and "--loraplus-lr-ratio 16" in advice.fix
    assert compare_to_head_only(1.2, 0.9, higher_is_better=False).rule == "lora_below_head_only"   # losses
    assert compare_to_head_only(0.4, 0.9, higher_is_better=False) is None
    assert compare_to_head_only(float("nan"), 0.6).rule == "lora_diverged"
