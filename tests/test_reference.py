"""The NumPy reference: backward passes vs central finite differences and vs torch autograd, LoRA forward vs
loralab's LoRALinear, Adam vs torch.optim.Adam, and the promise that the package never imports torch."""

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

from loralab import LoRALinear
from loralab.reference import (Adam, SGD, count_params, cross_entropy, init_lora, init_mlp, init_mlp_lora,
                               linear_backward, linear_forward, lora_backward, lora_forward, mlp_backward,
                               mlp_forward)

REFERENCE_DIR = Path(__file__).resolve().parents[1] / "loralab" / "reference"


def _numerical_grad(f, x: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Central differences (f(x + eps·e_i) − f(x − eps·e_i)) / 2eps for every entry of x (changed in place, restored)."""
    grad = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        old = x[i]
        x[i] = old + eps
        plus = f()
        x[i] = old - eps
        minus = f()
        x[i] = old
        grad[i] = (plus - minus) / (2 * eps)
    return grad


def _lora_layer(rng, n, n_in, n_out, r):
    x = rng.standard_normal((n, n_in))
    W, b = rng.standard_normal((n_out, n_in)), rng.standard_normal(n_out)
    A, B = rng.standard_normal((r, n_in)), rng.standard_normal((n_out, r))  # B random: B = 0 would hide bugs in dA
    return x, W, b, A, B


# ---- torch never gets imported ------------------------------------------------------------------------------
_BLOCKED_TORCH_RUN = r"""
import importlib.abc, sys, types

class BlockTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this test")
        return None

sys.meta_path.insert(0, BlockTorch())
# The parent package `loralab` imports torch for the PyTorch side; stand in an empty one so only the
# reference package's own imports run.
parent = types.ModuleType("loralab")
parent.__path__ = [sys.argv[1]]
sys.modules["loralab"] = parent

from loralab.reference import SpiralsConfig, energy_table, run_spirals
import loralab.reference.plot  # its matplotlib import is lazy
result = run_spirals(SpiralsConfig(n_per_class=20, pretrain_steps=3, adapt_steps=3), say=lambda *a: None)
assert result.lora_params == 1044, result
energy_table(d=16, strong=2, ranks=(1, 2))
assert "torch" not in sys.modules and "matplotlib" not in sys.modules, sorted(sys.modules)
print("ok")
"""


def test_reference_runs_with_torch_blocked():
    proc = subprocess.run([sys.executable, "-c", _BLOCKED_TORCH_RUN, str(REFERENCE_DIR.parent)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


@pytest.mark.parametrize("path", sorted(REFERENCE_DIR.glob("*.py")), ids=lambda p: p.name)
def test_reference_sources_import_only_numpy_stdlib_and_each_other(path):
    allowed = {"numpy", "matplotlib", "threadpoolctl", "__future__", "contextlib", "dataclasses", "pathlib", "time"}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 1:
                continue  # a sibling inside loralab/reference
            assert node.level == 0, f"{path.name} imports from outside loralab/reference"
            names = [node.module]
        else:
            continue
        for name in names:
            assert name.split(".")[0] in allowed, f"{path.name} imports {name}"


# ---- layers: finite differences -----------------------------------------------------------------------------
@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 4), n_in=st.integers(1, 5), n_out=st.integers(1, 5), r=st.integers(1, 3),
       scaling=st.floats(0.1, 4.0), seed=st.integers(0, 2**16))
def test_lora_backward_matches_finite_differences(n, n_in, n_out, r, scaling, seed):
    rng = np.random.default_rng(seed)
    x, W, b, A, B = _lora_layer(rng, n, n_in, n_out, r)
    G = rng.standard_normal((n, n_out))                   # loss = Σ out·G, so dout = G
    loss = lambda: float((lora_forward(x, W, b, A, B, scaling)[0] * G).sum())
    grads = lora_backward(G, lora_forward(x, W, b, A, B, scaling)[1])
    assert set(grads) == {"x", "A", "B"}                  # W and b are frozen: no gradient computed
    for name, value in (("x", x), ("A", A), ("B", B)):
        np.testing.assert_allclose(grads[name], _numerical_grad(loss, value), rtol=1e-6, atol=1e-7, err_msg=name)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 4), n_in=st.integers(1, 5), n_out=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_linear_backward_matches_finite_differences(n, n_in, n_out, seed):
    rng = np.random.default_rng(seed)
    x, W, b = rng.standard_normal((n, n_in)), rng.standard_normal((n_out, n_in)), rng.standard_normal(n_out)
    G = rng.standard_normal((n, n_out))
    loss = lambda: float((linear_forward(x, W, b)[0] * G).sum())
    grads = linear_backward(G, linear_forward(x, W, b)[1])
    for name, value in (("x", x), ("W", W), ("b", b)):
        np.testing.assert_allclose(grads[name], _numerical_grad(loss, value), rtol=1e-6, atol=1e-7, err_msg=name)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 6), classes=st.integers(2, 5), size=st.floats(0.1, 50.0), seed=st.integers(0, 2**16))
def test_cross_entropy_gradient_matches_finite_differences_and_stays_finite(n, classes, size, seed):
    rng = np.random.default_rng(seed)
    logits, y = rng.standard_normal((n, classes)) * size, rng.integers(0, classes, n)
    loss, dlogits = cross_entropy(logits, y)
    assert np.isfinite(loss) and loss >= 0
    np.testing.assert_allclose(dlogits, _numerical_grad(lambda: cross_entropy(logits, y)[0], logits, eps=1e-5),
                               rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(dlogits.sum(axis=1), 0, atol=1e-12)  # softmax − onehot sums to zero per row


@pytest.mark.parametrize("lora_layers", [None, (1,), (2, 3), ()], ids=["all", "first", "last-two", "plain"])
def test_mlp_backward_matches_finite_differences(lora_layers):
    rng = np.random.default_rng(0)
    params = init_mlp((2, 5, 4, 3), rng)
    for k in params:                     # nonzero biases, so relu masks and bias grads are exercised
        params[k] += 0.1 * rng.standard_normal(params[k].shape)
    lora = init_mlp_lora(params, 2, rng, layers=lora_layers) if lora_layers != () else None
    for k in lora or {}:
        lora[k] += rng.standard_normal(lora[k].shape)    # B != 0, so every A gets a gradient
    x, y = rng.standard_normal((7, 2)), rng.integers(0, 3, 7)
    loss = lambda: cross_entropy(mlp_forward(x, params, lora, 1.5)[0], y)[0]
    logits, cache = mlp_forward(x, params, lora, 1.5)
    grads = mlp_backward(cross_entropy(logits, y)[1], cache)
    adapted = {int(k[1:]) for k in lora or {}}
    expected = {f"{p}{i}" for i in (1, 2, 3) for p in (("A", "B") if i in adapted else ("W", "b"))}
    assert set(grads) == expected
    for name in grads:
        value = (lora if name[0] in "AB" else params)[name]
        np.testing.assert_allclose(grads[name], _numerical_grad(loss, value), rtol=1e-5, atol=1e-8, err_msg=name)


# ---- layers: algebra ----------------------------------------------------------------------------------------
@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 5), n_in=st.integers(1, 8), n_out=st.integers(1, 8), r=st.integers(1, 4),
       scaling=st.floats(-4.0, 4.0), seed=st.integers(0, 2**16))
def test_lora_forward_equals_linear_with_merged_weight(n, n_in, n_out, r, scaling, seed):
    x, W, b, A, B = _lora_layer(np.random.default_rng(seed), n, n_in, n_out, r)
    merged, _ = linear_forward(x, W + scaling * B @ A, b)
    np.testing.assert_allclose(lora_forward(x, W, b, A, B, scaling)[0], merged, rtol=1e-10, atol=1e-10)


def test_init_lora_starts_as_the_base_with_kaiming_uniform_a():
    rng = np.random.default_rng(0)
    A, B = init_lora(400, 7, 8, rng)
    assert A.shape == (8, 400) and B.shape == (7, 8) and not B.any()
    assert 0.9 / 20 < np.abs(A).max() <= 1 / 20                      # bound 1/√in, in = 400
    x, W, b = rng.standard_normal((3, 400)), rng.standard_normal((7, 400)), rng.standard_normal(7)
    np.testing.assert_array_equal(lora_forward(x, W, b, A, B, 2.0)[0], linear_forward(x, W, b)[0])
    with pytest.raises(ValueError, match="r=0"):
        init_lora(4, 4, 0, rng)


def test_parameter_counts_of_the_spiral_model():
    params = init_mlp((2, 64, 64, 3), np.random.default_rng(0))
    assert count_params(params) == 2 * 64 + 64 + 64 * 64 + 64 + 64 * 3 + 3 == 4547
    lora = init_mlp_lora(params, 4, np.random.default_rng(0))
    assert count_params(lora) == 4 * (2 + 64) + 4 * (64 + 64) + 4 * (64 + 3) == 1044
    with pytest.raises(ValueError, match=r"layers \[4\] do not exist"):
        init_mlp_lora(params, 4, np.random.default_rng(0), layers=(4,))


# ---- against torch ------------------------------------------------------------------------------------------
def _t(a: np.ndarray, grad: bool = False) -> torch.Tensor:
    return torch.tensor(a, dtype=torch.float64, requires_grad=grad)


@pytest.mark.parametrize("r,alpha", [(1, 1.0), (4, 8.0), (3, 1.5)])
def test_numpy_lora_forward_equals_loralab_lora_linear(r, alpha):
    torch.manual_seed(r)
    layer = LoRALinear(nn.Linear(6, 5, dtype=torch.float64))
    adapter = layer.add_adapter("default", r, alpha)
    with torch.no_grad():
        adapter.lora_B.normal_()
    W, b = layer.base_layer.weight.detach().numpy(), layer.base_layer.bias.detach().numpy()
    A, B = adapter.lora_A.detach().numpy(), adapter.lora_B.detach().numpy()
    x = np.random.default_rng(r).standard_normal((4, 6))
    ours, _ = lora_forward(x, W, b, A, B, alpha / r)
    assert adapter.scaling == alpha / r
    with torch.no_grad():
        theirs = layer(_t(x)).numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-12, atol=1e-12)


def test_lora_backward_matches_torch_autograd():
    rng = np.random.default_rng(3)
    x, W, b, A, B = _lora_layer(rng, 6, 5, 4, 3)
    G = rng.standard_normal((6, 4))
    grads = lora_backward(G, lora_forward(x, W, b, A, B, 0.7)[1])
    tx, tA, tB = _t(x, True), _t(A, True), _t(B, True)
    out = tx @ _t(W).T + _t(b) + 0.7 * (tx @ tA.T) @ tB.T
    (out * _t(G)).sum().backward()
    for name, t in (("x", tx), ("A", tA), ("B", tB)):
        np.testing.assert_allclose(grads[name], t.grad.numpy(), rtol=1e-12, atol=1e-12, err_msg=name)


@pytest.mark.parametrize("with_lora", [True, False], ids=["lora", "plain"])
def test_mlp_backward_matches_torch_autograd_through_loralab_layers(with_lora):
    """The same weights in a torch MLP made of loralab LoRALinear layers: loss and every gradient agree."""
    rng = np.random.default_rng(1)
    params = init_mlp((2, 16, 16, 3), rng)
    lora = init_mlp_lora(params, 4, rng) if with_lora else None
    for k in lora or {}:
        lora[k] = rng.standard_normal(lora[k].shape) * 0.3
    x, y = rng.standard_normal((32, 2)), rng.integers(0, 3, 32)
    logits, cache = mlp_forward(x, params, lora, 2.0)
    loss, dlogits = cross_entropy(logits, y)
    grads = mlp_backward(dlogits, cache)

    layers = []
    for i in (1, 2, 3):
        linear = nn.Linear(*params[f"W{i}"].shape[::-1], dtype=torch.float64)
        with torch.no_grad():
            linear.weight.copy_(_t(params[f"W{i}"])), linear.bias.copy_(_t(params[f"b{i}"]))
        if with_lora:
            linear = LoRALinear(linear)
            adapter = linear.add_adapter("default", 4, 8.0)            # scaling 8/4 = 2.0, as above
            with torch.no_grad():
                adapter.lora_A.copy_(_t(lora[f"A{i}"])), adapter.lora_B.copy_(_t(lora[f"B{i}"]))
        layers += [linear, nn.ReLU()]
    model = nn.Sequential(*layers[:-1])
    torch_loss = nn.functional.cross_entropy(model(_t(x)), torch.tensor(y))
    torch_loss.backward()
    assert torch_loss.item() == pytest.approx(loss, rel=1e-12)
    for i, layer in zip((1, 2, 3), model[::2]):
        if with_lora:
            a = layer.adapters["default"]
            pairs = [(f"A{i}", a.lora_A.grad), (f"B{i}", a.lora_B.grad)]
        else:
            pairs = [(f"W{i}", layer.weight.grad), (f"b{i}", layer.bias.grad)]
        for name, g in pairs:
            np.testing.assert_allclose(grads[name], g.numpy(), rtol=1e-10, atol=1e-12, err_msg=name)


def test_adam_matches_torch_adam_step_for_step():
    rng = np.random.default_rng(0)
    p = {"w": rng.standard_normal((3, 4)), "b": rng.standard_normal(4)}
    tp = {k: _t(v.copy(), True) for k, v in p.items()}
    ours, theirs = Adam(p, lr=0.05, betas=(0.8, 0.99)), torch.optim.Adam(tp.values(), lr=0.05, betas=(0.8, 0.99))
    for _ in range(10):
        grads = {k: rng.standard_normal(v.shape) for k, v in p.items()}
        ours.step(grads)
        for k, t in tp.items():
            t.grad = _t(grads[k])
        theirs.step()
    for k in p:
        np.testing.assert_allclose(p[k], tp[k].detach().numpy(), rtol=1e-12, atol=1e-12)


def test_optimizers_update_only_their_own_arrays_and_refuse_missing_grads():
    base, trained = {"W": np.ones(3)}, {"A": np.ones(2)}
    grads = {"A": np.ones(2), "W": np.ones(3)}          # a gradient for W exists, but W is not the optimizer's
    for opt in (Adam(trained, lr=0.1), SGD(trained, lr=0.1)):
        opt.step(grads)
    assert (base["W"] == 1).all() and (trained["A"] < 1).all()
    with pytest.raises(KeyError, match="no gradient for 'A'"):
        Adam(trained).step({"W": np.ones(3)})
    with pytest.raises(ValueError, match="lr=0"):
        SGD(trained, lr=0)
