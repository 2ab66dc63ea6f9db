"""loralab.explore: the SVD math, the adapter reader, and the JSON endpoints of a server run in a thread on port 0."""

import base64
import http.client
import json
import math
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from conftest import tiny_llama
from loralab import LoraConfig, add_lora, save_adapter
from loralab.cli import main
from loralab.explore import dense_svd, energy, factored_svd, make_server, truncation_error
from loralab.explore.adapter import AdapterDir
from loralab.explore.server import STATIC_DIR, is_loopback, matrix_path
from loralab.inject import lora_layers
from loralab.reference.energy import cumulative_energy, low_rank_plus_noise

# q_proj: r=4, α=8; v_proj: r=2 (rank_pattern), α=8; down_proj: r=4, α=3 (alpha_pattern); scaling α/√r (rsLoRA)
PATTERNS = {"q_proj": (4, 8.0), "v_proj": (2, 8.0), "down_proj": (4, 3.0)}


@pytest.fixture(scope="module")
def adapted(tmp_path_factory):
    """(adapter directory, {module path: (A, B, expected scaling)}) of a tiny Llama with random A and B."""
    model = tiny_llama()
    add_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules=list(PATTERNS), rank_pattern={"v_proj": 2},
                               alpha_pattern={"down_proj": 3.0}, use_rslora=True, init_lora_weights=False))
    directory = save_adapter(model, tmp_path_factory.mktemp("adapter") / "a")
    expected = {}
    for path, layer in lora_layers(model).items():
        r, alpha = PATTERNS[path.rsplit(".", 1)[-1]]
        a = layer.adapters["default"]
        assert a.lora_A.shape[0] == r
        expected[path] = (a.lora_A.detach().double().numpy(), a.lora_B.detach().double().numpy(), alpha / math.sqrt(r))
    return directory, expected


@pytest.fixture(scope="module")
def server(adapted):
    server = make_server(adapted[0], port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def request(server, path, host=None):
    """(status, headers, body bytes) for GET path, sent exactly as written (no client-side normalisation)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.putrequest("GET", path, skip_host=True)
    conn.putheader("Host", host or f"127.0.0.1:{server.port}")
    conn.endheaders()
    response = conn.getresponse()
    body = response.read()
    conn.close()
    return response.status, dict(response.getheaders()), body


def get_json(server, path):
    status, _, body = request(server, path)
    return status, json.loads(body)


def decode(field):
    return np.frombuffer(base64.b64decode(field["data"]), dtype=field["dtype"]).reshape(field["shape"])


def svd_of(server, matrix_id):
    status, payload = get_json(server, matrix_path(matrix_id))
    assert status == 200, payload
    return payload, decode(payload["U"]), decode(payload["S"]), decode(payload["Vt"])


# ---- the math -------------------------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(m=st.integers(1, 12), n=st.integers(1, 12), r=st.integers(1, 9), scaling=st.floats(0.01, 100),
       seed=st.integers(0, 2**16))
def test_factored_svd_equals_the_dense_svd_of_scaling_B_A(m, n, r, scaling, seed):
    rs = np.random.RandomState(seed)
    A, B = rs.randn(r, n), rs.randn(m, r)
    dW = scaling * B @ A
    spec = factored_svd(A, B, scaling)
    K = min(r, m, n)
    assert spec.U.shape == (m, K) and spec.S.shape == (K,) and spec.Vt.shape == (K, n)
    np.testing.assert_allclose(spec.S, np.linalg.svd(dW, compute_uv=False)[:K], rtol=1e-9, atol=1e-9 * scaling)
    np.testing.assert_allclose(spec.truncate(K), dW, atol=1e-9 * max(1.0, np.abs(dW).max()))
    np.testing.assert_allclose(spec.U.T @ spec.U, np.eye(K), atol=1e-9)
    np.testing.assert_allclose(spec.Vt @ spec.Vt.T, np.eye(K), atol=1e-9)


@settings(max_examples=25, deadline=None)
@given(m=st.integers(2, 20), n=st.integers(2, 20), seed=st.integers(0, 2**16), data=st.data())
def test_energy_and_error_follow_eckart_young(m, n, seed, data):
    M = np.random.RandomState(seed).randn(m, n)
    spec = dense_svd(M)
    k = data.draw(st.integers(1, min(m, n)))
    dense_error = np.linalg.norm(M - spec.truncate(k))
    assert truncation_error(spec.S, k) == pytest.approx(dense_error, rel=1e-9, abs=1e-12)
    assert 100 * energy(spec.S, k) == pytest.approx(cumulative_energy(M, (k,))[k], rel=1e-12)
    assert 1 - energy(spec.S, k) == pytest.approx(dense_error ** 2 / np.linalg.norm(M) ** 2, rel=1e-9, abs=1e-12)


def test_an_untrained_adapter_has_zero_singular_values_and_undefined_energy():
    spec = factored_svd(np.ones((3, 5)), np.zeros((4, 3)), 2.0)
    assert np.all(spec.S == 0) and math.isnan(energy(spec.S, 1))
    with pytest.raises(ValueError, match="NaN or Inf"):
        factored_svd(np.full((2, 3), np.nan), np.ones((4, 2)), 1.0)


def test_spectrum_refuses_factors_that_do_not_fit():
    from loralab.explore.spectrum import Spectrum
    U, S, Vt = np.eye(3)[:, :2], np.array([2.0, 1.0]), np.eye(2, 4)
    assert Spectrum(U, S, Vt).shape == (3, 4)
    for bad in [(U, S[:1], Vt), (U, S, np.eye(3, 4)), (U, S, Vt[0]), (U, S[::-1], Vt)]:
        with pytest.raises(ValueError, match="do not fit|descending"):
            Spectrum(*bad)


# ---- the endpoints ----------------------------------------------------------------------------------------
def test_listing_names_the_builtins_and_every_adapted_module(server, adapted):
    status, listing = get_json(server, "/api/matrices")
    assert status == 200
    entries = {e["id"]: e for e in listing["matrices"]}
    assert {"synthetic", "synthetic-noisy", "random"} <= set(entries)
    assert {i for i in entries if i.startswith("adapter:")} == {"adapter:" + p for p in adapted[1]}
    assert entries["random"]["shape"] == [192, 256] and entries["synthetic"]["rank"] == 256
    for path, (A, B, _) in adapted[1].items():
        assert entries["adapter:" + path]["shape"] == [B.shape[0], A.shape[1]]
        assert entries["adapter:" + path]["rank"] == A.shape[0]
    assert Path(listing["adapter"]) == Path(adapted[0]).resolve()


@pytest.mark.parametrize("matrix_id, dense", [
    ("synthetic", lambda: low_rank_plus_noise(256, 8, 2.0, 0.05, 42)),
    ("synthetic-noisy", lambda: low_rank_plus_noise(256, 8, 2.0, 2.0, 42)),
    ("random", lambda: np.random.RandomState(0).randn(192, 256)),
])
def test_builtin_svd_matches_numpy(server, matrix_id, dense):
    M = dense()
    payload, U, S, Vt = svd_of(server, matrix_id)
    assert (U.dtype, S.dtype, Vt.dtype) == (np.dtype("<f4"), np.dtype("<f8"), np.dtype("<f4"))
    assert payload["shape"] == list(M.shape) and payload["rank"] == min(M.shape)
    np.testing.assert_allclose(S, np.linalg.svd(M, compute_uv=False), rtol=1e-10)
    reconstructed = (U.astype(np.float64) * S) @ Vt.astype(np.float64)
    assert np.abs(reconstructed - M).max() < 1e-5 * np.abs(M).max()   # float32 factors
    assert payload["frobenius"] == pytest.approx(np.linalg.norm(M), rel=1e-12)


def test_adapter_layer_is_scaling_B_A_with_each_modules_r_and_alpha(server, adapted):
    for path, (A, B, scaling) in adapted[1].items():
        dW = scaling * B @ A
        payload, U, S, Vt = svd_of(server, "adapter:" + path)
        assert payload["adapter"]["scaling"] == pytest.approx(scaling, rel=1e-12)
        assert payload["adapter"]["r"] == A.shape[0] and len(S) == A.shape[0]
        np.testing.assert_allclose(S, np.linalg.svd(dW, compute_uv=False)[:len(S)], rtol=1e-5)
        reconstructed = (U.astype(np.float64) * S) @ Vt.astype(np.float64)
        assert np.abs(reconstructed - dW).max() < 1e-5 * np.abs(dW).max(), path


@pytest.mark.parametrize("matrix_id", ["nope", "adapter:model.layers.0.self_attn.k_proj", "adapter:", "../random"])
def test_unknown_matrix_is_404(server, matrix_id):
    status, body = get_json(server, matrix_path(matrix_id))
    assert status == 404 and "/api/matrices" in body["error"]


@pytest.mark.parametrize("path", ["/static/../server.py", "/static/..%2fserver.py", "/static/%2e%2e%2fserver.py",
                                  "/static/%2e%2e/%2e%2e/cli.py", "/../../../etc/passwd", "/static//etc/passwd",
                                  "/static/%2Fetc%2Fpasswd", "/static/static/explore.js", "/server.py",
                                  "/static/", "/api/matrix/..%2f..%2fetc%2fpasswd"])
def test_path_traversal_is_refused(server, path):
    status, _, body = request(server, path)
    assert status == 404
    assert b"import" not in body and b"root:" not in body


def test_page_and_assets_are_served_and_load_nothing_from_elsewhere(server):
    status, headers, html = request(server, "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert "default-src 'self'" in headers["Content-Security-Policy"]
    for name in ("explore.js", "explore.css"):
        status, headers, body = request(server, f"/static/{name}")
        assert status == 200 and body == (STATIC_DIR / name).read_bytes()
    for file in STATIC_DIR.iterdir():
        text = file.read_text()
        assert "http://" not in text and "https://" not in text and 'src="//' not in text, file.name


def test_requests_for_another_host_name_are_refused(server):
    status, _, body = request(server, "/api/matrices", host=f"attacker.example:{server.port}")
    assert status == 403 and b"Host" in body


# ---- the adapter reader -----------------------------------------------------------------------------------
def test_bf16_factors_are_read_as_float32(adapted, tmp_path):
    from safetensors.torch import load_file, save_file
    source = Path(adapted[0])
    tensors = {k: v.to(torch.bfloat16) for k, v in load_file(source / "adapter_model.safetensors").items()}
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_config.json").write_text((source / "adapter_config.json").read_text())
    reader = AdapterDir(tmp_path)
    path = next(iter(adapted[1]))
    A, B = reader.factors(path)
    assert A.dtype == np.float32
    np.testing.assert_array_equal(A, tensors[f"base_model.model.{path}.lora_A.weight"].float().numpy())


def test_a_config_from_another_save_is_refused(adapted, tmp_path):
    source = Path(adapted[0])
    (tmp_path / "adapter_model.safetensors").write_bytes((source / "adapter_model.safetensors").read_bytes())
    config = json.loads((source / "adapter_config.json").read_text())
    config["rank_pattern"] = {}
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="different saves"):
        AdapterDir(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such adapter directory"):
        AdapterDir(tmp_path / "missing")
    (tmp_path / "adapter_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="adapter_config.json is missing"):
        AdapterDir(tmp_path)


# ---- starting it ------------------------------------------------------------------------------------------
def test_only_loopback_hosts_without_allow_remote():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3")
    with pytest.raises(ValueError, match="--allow-remote"):
        make_server(host="0.0.0.0", port=0)


def test_a_port_in_use_is_a_clear_error(server):
    with pytest.raises(RuntimeError, match=f"cannot listen on 127.0.0.1:{server.port}.*--port 0"):
        make_server(port=server.port)


def test_cli_prints_the_url_as_json_serves_and_stops_on_ctrl_c(adapted):
    # Ctrl-C as in a terminal: a test run started in the background inherits SIGINT ignored, and Python then
    # leaves it ignored in the child, so the child gets the default disposition back first.
    proc = subprocess.Popen([sys.executable, "-m", "loralab.cli", "explore", "--json", "--port", "0", "--no-browser",
                             "--adapter", str(adapted[0])], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        started = json.loads(proc.stdout.readline())
        host, port = started["url"].removeprefix("http://").rstrip("/").split(":")
        assert host == "127.0.0.1" and started["adapter_layers"] == len(adapted[1])
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        conn.request("GET", "/api/matrices")
        assert conn.getresponse().status == 200
        conn.close()
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert out == "" and "low-rank explorer at http://127.0.0.1:" in err


def test_cli_refuses_a_public_host_and_says_why(capsys):
    assert main(["explore", "--json", "--host", "0.0.0.0", "--no-browser"]) == 2
    captured = capsys.readouterr()
    assert "--allow-remote" in json.loads(captured.out)["error"] and "no authentication" in captured.err
