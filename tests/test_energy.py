"""Cumulative singular-value energy: the article's recipe reproduced draw for draw, the real numbers it gives,
the Eckart–Young meaning of the definition, and `loralab energy` end to end."""

import json
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from loralab.cli import main
from loralab.reference.energy import cumulative_energy, energy_table, low_rank_plus_noise

ARTICLE = {1: 13.5, 2: 26.7, 4: 52.5, 8: 96.2, 16: 98.4, 32: 99.3}   # what the write-up prints


def test_matrix_is_the_global_seed_recipe_draw_for_draw_without_touching_global_state():
    np.random.seed(42)
    U = np.random.randn(256, 8) * 2.0
    V = np.random.randn(8, 256) * 2.0
    noise = np.random.randn(256, 256) * 0.05
    expected = U @ V + noise
    state = np.random.get_state()[1].copy()
    np.testing.assert_array_equal(low_rank_plus_noise(256, 8, 2.0, 0.05, 42), expected)
    np.testing.assert_array_equal(np.random.get_state()[1], state)


def test_the_recipe_as_written_gives_these_numbers_not_the_articles():
    table = energy_table()
    got = table["energy_percent"]
    expected = {1: 18.73, 2: 34.70, 4: 61.17, 8: 100.00, 16: 100.00, 32: 100.00}
    assert {r: round(v, 2) for r, v in got.items()} == expected
    assert got[8] > 99.99 > ARTICLE[8]          # noise 0.05 is far too weak for rank 8 to miss 4% of the energy
    sigma = {r: round(v, 2) for r, v in table["energy_percent_sigma_sum"].items()}
    assert sigma == {1: 15.13, 2: 29.10, 4: 54.53, 8: 97.99, 16: 98.13, 32: 98.40}  # the other definition: no match either


def test_stronger_noise_gives_the_few_strong_directions_and_a_long_tail():
    got = energy_table(noise=2.0)["energy_percent"]
    assert {r: round(v, 2) for r, v in got.items()} == {1: 18.10, 2: 33.60, 4: 59.26, 8: 97.14, 16: 97.47, 32: 98.01}
    assert got[8] - got[4] > 30 and got[32] - got[8] < 1.0     # a sharp knee at k = 8, then a slow tail


@settings(max_examples=25, deadline=None)
@given(n=st.integers(2, 12), m=st.integers(2, 12), seed=st.integers(0, 2**16))
def test_energy_is_one_minus_the_best_low_rank_error_and_dominates_the_sigma_share(n, m, seed):
    M = np.random.default_rng(seed).standard_normal((n, m))
    ranks = tuple(range(1, min(n, m) + 1))
    energy, share = cumulative_energy(M, ranks), cumulative_energy(M, ranks, power=1)
    U, s, Vt = np.linalg.svd(M, full_matrices=False)
    for r in ranks:
        M_r = (U[:, :r] * s[:r]) @ Vt[:r]                      # the best rank-r approximation (Eckart–Young)
        relative_error = np.linalg.norm(M - M_r) ** 2 / np.linalg.norm(M) ** 2
        assert energy[r] == pytest.approx(100 * (1 - relative_error), abs=1e-8)
        assert share[r] <= energy[r] + 1e-9                    # top-r share of σ never exceeds that of σ²
    values = [energy[r] for r in ranks]
    assert values == sorted(values) and values[-1] == pytest.approx(100.0)


@pytest.mark.parametrize("call,message", [
    (lambda: cumulative_energy(np.eye(4), (0, 2)), r"ranks \[0\] are out of range"),
    (lambda: cumulative_energy(np.zeros((3, 3)), (1,)), "all zeros"),
    (lambda: low_rank_plus_noise(d=4, strong=5), "strong=5 exceeds d=4"),
    (lambda: low_rank_plus_noise(noise=-1.0), "noise >= 0"),
    (lambda: low_rank_plus_noise(d=0), "d=0"),
])
def test_bad_arguments_are_named(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_cli_energy_end_to_end():
    proc = subprocess.run([sys.executable, "-m", "loralab.cli", "energy", "--d", "256", "--strong", "8", "--scale",
                           "2.0", "--noise", "0.05", "--seed", "42", "--json"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert list(result["energy_percent"]) == ["1", "2", "4", "8", "16", "32"]
    assert result["energy_percent"]["1"] == pytest.approx(18.7256, abs=1e-3)
    assert result["energy_percent"]["8"] == pytest.approx(99.998, abs=1e-3)
    assert (result["d"], result["strong"], result["noise"], result["seed"]) == (256, 8, 0.05, 42)
    assert "rank" in proc.stderr                                # the human table goes to stderr under --json


def test_cli_energy_custom_ranks_and_human_table(capsys):
    assert main(["energy", "--d", "32", "--strong", "2", "--ranks", "1,2,32"]) == 0
    out = capsys.readouterr().out
    assert "Σσ² energy" in out and "100.00%" in out


@pytest.mark.parametrize("argv,message", [
    (["--d", "-3"], "argument --d: expected a positive integer, got -3"),
    (["--noise", "abc"], "argument --noise: expected a number, got 'abc'"),
    (["--ranks", "1,x"], "argument --ranks: expected comma-separated positive integers"),
    (["--seed", "-1"], "argument --seed: expected a non-negative integer, got -1"),
])
def test_cli_energy_bad_input_names_the_problem(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["energy", *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_energy_rank_above_d_is_a_clear_error(capsys):
    assert main(["energy", "--json", "--d", "8", "--strong", "2", "--ranks", "1,16"]) == 2
    assert "ranks [16] are out of range" in json.loads(capsys.readouterr().out)["error"]
