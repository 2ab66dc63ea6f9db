"""The spiral experiment: data, the exact-solvability argument, determinism, the default run hitting its target,
the under-fitting of the original write-up's recipe, and `loralab spirals` end to end."""

import json

import numpy as np
import pytest

from loralab.cli import main
from loralab.reference import (Adam, SpiralsConfig, cross_entropy, init_mlp, init_mlp_lora, make_spirals,
                               mlp_backward, mlp_forward, rotate, run_spirals)

QUICK = SpiralsConfig(pretrain_steps=300, adapt_steps=150)
_quiet = lambda *a: None


def test_make_spirals_shapes_labels_and_determinism():
    x, y = make_spirals(50, 0.2, np.random.default_rng(0))
    assert x.shape == (150, 2) and y.shape == (150,)
    assert np.bincount(y).tolist() == [50, 50, 50]
    assert np.linalg.norm(x, axis=1).max() <= 1.0 + 1e-12     # radius runs 0..1
    x2, _ = make_spirals(50, 0.2, np.random.default_rng(0))
    np.testing.assert_array_equal(x, x2)
    xr, _ = make_spirals(50, 0.2, np.random.default_rng(0), rotation=1.2)
    np.testing.assert_allclose(xr, rotate(x, 1.2), atol=1e-12)
    with pytest.raises(ValueError, match="noise=-1"):
        make_spirals(5, -1, np.random.default_rng(0))


def test_rotation_keeps_norms_and_inverts():
    x = np.random.default_rng(0).standard_normal((20, 2))
    np.testing.assert_allclose(np.linalg.norm(rotate(x, 1.2), axis=1), np.linalg.norm(x, axis=1))
    np.testing.assert_allclose(rotate(rotate(x, 1.2), -1.2), x, atol=1e-12)
    np.testing.assert_allclose(rotate(np.array([[1.0, 0.0]]), np.pi / 2), [[0.0, 1.0]], atol=1e-12)


def test_a_rank_2_adapter_on_the_first_layer_undoes_the_rotation_exactly():
    """ΔW1 = W1·(Rᵀ − I) is (64, 2), rank <= 2: with A = I/s and B = ΔW1 the adapted base on rotated points
    computes exactly what the base computes on the original points."""
    rng = np.random.default_rng(0)
    base = init_mlp((2, 64, 64, 3), rng)
    x, _ = make_spirals(40, 0.2, rng)
    c, s = np.cos(1.2), np.sin(1.2)
    R = np.array([[c, -s], [s, c]])
    scaling = 2.0
    lora = {"A1": np.eye(2) / scaling, "B1": base["W1"] @ (R.T - np.eye(2))}
    adapted, _ = mlp_forward(rotate(x, 1.2), base, lora, scaling)
    np.testing.assert_allclose(adapted, mlp_forward(x, base)[0], atol=1e-12)


def test_lora_training_leaves_the_base_bit_for_bit_and_trains_only_a_and_b():
    rng = np.random.default_rng(0)
    base = init_mlp((2, 8, 3), rng)
    frozen = {k: v.copy() for k, v in base.items()}
    lora = init_mlp_lora(base, 2, rng)
    x, y = make_spirals(10, 0.2, rng)
    opt = Adam(lora, lr=0.1)
    for _ in range(5):
        logits, cache = mlp_forward(x, base, lora, 1.0)
        grads = mlp_backward(cross_entropy(logits, y)[1], cache)
        assert set(grads) == {"A1", "B1", "A2", "B2"}
        opt.step(grads)
    assert all(np.array_equal(base[k], frozen[k]) for k in base)
    assert lora["B1"].any()                                    # it did move off B = 0


def test_quick_run_is_deterministic_and_counts_what_trains():
    a = run_spirals(QUICK, say=_quiet).to_dict()
    b = run_spirals(QUICK, say=_quiet).to_dict()
    a.pop("seconds"), b.pop("seconds")
    assert a == b
    assert (a["base_params"], a["lora_params"], a["full_ft_params"]) == (4547, 1044, 4547)
    assert a["base_unchanged"]
    assert a["lora_acc_rotated"] > a["base_acc_rotated"] + 0.3
    assert a["full_ft_acc_original"] < a["base_acc_original"] - 0.3    # full fine-tuning forgets; LoRA's base cannot


def test_rank_and_adapted_layers_set_the_trainable_count():
    a = run_spirals(SpiralsConfig(seed=1, r=2, pretrain_steps=5, adapt_steps=5), say=_quiet)
    assert a.lora_params == 2 * (2 + 64) + 2 * (64 + 64) + 2 * (64 + 3)
    assert a.config["seed"] == 1 and a.plot is None
    first_only = run_spirals(SpiralsConfig(r=2, lora_layers=(1,), pretrain_steps=5, adapt_steps=5), say=_quiet)
    assert first_only.lora_params == 2 * (2 + 64) == 132


def test_rank_2_on_the_first_layer_alone_is_enough():
    """132 trainable numbers (2.9% of the model) recover the rotated task: the rotation lives in layer 1."""
    res = run_spirals(SpiralsConfig(r=2, lora_alpha=4.0, lora_layers=(1,), pretrain_steps=300, adapt_steps=150),
                      say=_quiet)
    assert res.lora_params == 132 and res.target_met


def test_the_original_write_ups_recipe_underfits():
    """500 steps of plain gradient descent at lr 0.01 leave the base far from fitting the spirals (our run of
    that recipe: loss ~0.64, ~60% accuracy), which is why its LoRA numbers can't be reached."""
    res = run_spirals(SpiralsConfig(optimizer="sgd", lr=0.01, pretrain_steps=500, adapt_steps=20), say=_quiet)
    assert res.base_loss > 0.4 and res.base_acc_original < 0.8 and not res.target_met


@pytest.mark.parametrize("field,value,message", [
    ("r", 0, "r=0"), ("pretrain_steps", -1, "pretrain_steps=-1"), ("noise", -0.1, "noise=-0.1"),
    ("rotation", float("nan"), "rotation=nan"), ("optimizer", "rmsprop", "choose 'adam' or 'sgd'"),
    ("lr", 0.0, "lr=0.0"), ("hidden", (), "hidden=()"), ("n_per_class", 2.5, "n_per_class=2.5"),
    ("lora_layers", (0,), "lora_layers=(0,)"), ("lora_layers", (4,), "layer numbers in 1..3"),
])
def test_config_rejects_bad_values_by_name(field, value, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        SpiralsConfig(**{field: value})


def test_cli_spirals_default_run_meets_the_target_and_writes_the_figure(tmp_path, capsys):
    """The real defaults, end to end: base >= 95% on the original, LoRA within 5 points of it on the rotated
    task, under 30 s, a PNG written and its location printed."""
    assert main(["spirals", "--json", "--out", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    for key in ("base_params", "lora_params", "base_acc_original", "base_acc_rotated", "lora_acc_rotated",
                "full_ft_acc_rotated"):
        assert key in result
    assert (result["base_params"], result["lora_params"]) == (4547, 1044)
    assert result["base_acc_original"] >= 0.95
    assert result["base_acc_rotated"] < 0.6
    assert result["lora_acc_rotated"] >= result["base_acc_original"] - 0.05 and result["target_met"]
    assert result["full_ft_acc_rotated"] >= 0.95
    assert result["seconds"] < 30
    png = tmp_path / "spirals.png"
    assert result["plot"] == str(png.resolve()) and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(png.resolve()) in captured.err                  # --json: human text, including where, on stderr


@pytest.mark.parametrize("argv,message", [
    (["--rotation", "abc"], "argument --rotation: expected a number, got 'abc'"),
    (["--r", "-2"], "argument --r: expected a positive integer, got -2"),
    (["--noise", "-1"], "argument --noise: expected a number >= 0"),
    (["--optimizer", "rmsprop"], "argument --optimizer: invalid choice"),
    (["--lora-layers", "1,a"], "argument --lora-layers: expected comma-separated positive integers"),
])
def test_cli_spirals_bad_input_names_the_problem(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["spirals", *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
