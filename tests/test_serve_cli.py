"""`loralab serve` end to end: the command in a subprocess, --json on startup, requests, terminate; and
--workers 2 behind one port."""

import json
import os
import subprocess
import sys
import time

import pytest

from serve_fixtures import reference_completion, reference_model, save_adapters, tiny_llama_dir


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model_dir = str(tiny_llama_dir(root / "tiny-llama"))
    (root / "adapters").mkdir()
    return root, model_dir, save_adapters(model_dir, root / "adapters", ["sql", "poem"])


def _start(args):
    env = dict(os.environ, PYTHONPATH=os.getcwd(), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return subprocess.Popen([sys.executable, "-m", "loralab.cli", "serve", *args, "--json"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def _stop(proc):
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _healthy(http, tries=600):
    import httpx
    for _ in range(tries):
        try:
            if http.get("/health").status_code == 200:
                return True
        except httpx.HTTPError:
            time.sleep(0.1)
    return False


def test_serve_command(files):
    import httpx
    root, model_dir, adapters = files
    proc = _start(["--model", model_dir, "--adapter", f"sql={adapters['sql']}", "--adapter", f"poem={adapters['poem']}",
                   "--port", "0", "--api-key", "k3y", "--threads", "1"])
    try:
        info = json.loads(proc.stdout.readline())
        assert info["url"].startswith("http://127.0.0.1:") and info["adapters"] == ["poem", "sql"]
        reference = reference_model(model_dir, adapters)
        with httpx.Client(base_url=info["url"], headers={"Authorization": "Bearer k3y"}, timeout=60) as http:
            models = [m["id"] for m in http.get("/v1/models").json()["data"]]
            assert models == ["tiny-llama", "sql", "poem"]
            r = http.post("/v1/completions", json={"model": "sql", "prompt": [3, 4, 5], "max_tokens": 3,
                                                   "temperature": 0})
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["tokens"] == reference_completion(reference, "sql", [3, 4, 5], 3)
            r = http.post("/v1/completions", json={"model": "nope", "prompt": [1]})
            assert r.status_code == 404 and "sql" in r.json()["error"]["message"]
            assert httpx.get(info["url"] + "/v1/models").status_code == 401
    finally:
        _stop(proc)
    assert proc.returncode is not None


def test_serve_refuses_bad_arguments(files):
    _, model_dir, _ = files
    proc = _start(["--model", model_dir, "--adapter", "oops", "--port", "0"])
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "NAME=DIR" in json.loads(out)["error"]
    proc = _start(["--model", model_dir, "--host", "0.0.0.0", "--port", "0"])
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "--api-key" in json.loads(out)["error"]


def test_two_workers_behind_one_port(files):
    import httpx
    root, model_dir, adapters = files
    proc = _start(["--model", model_dir, "--adapter", f"sql={adapters['sql']}", "--port", "0", "--workers", "2",
                   "--threads", "1"])
    try:
        info = json.loads(proc.stdout.readline())
        assert info["workers"] == 2
        reference = reference_model(model_dir, adapters)
        expected = reference_completion(reference, "sql", [7, 8], 2)
        pids = set()
        for _ in range(12):
            with httpx.Client(base_url=info["url"], timeout=60) as http:   # a new connection each time
                assert _healthy(http)
                pids.add(http.get("/health").json()["pid"])
                r = http.post("/v1/completions", json={"model": "sql", "prompt": [7, 8], "max_tokens": 2,
                                                       "temperature": 0})
                assert r.status_code == 200 and r.json()["choices"][0]["tokens"] == expected
        assert len(pids) >= 1 and proc.poll() is None
        print(f"\n--workers 2: answered by {len(pids)} worker process(es)")
    finally:
        _stop(proc)


def test_serve_without_fastapi_names_the_install(monkeypatch):
    import importlib.util

    from loralab.serve.server import ServeConfig, serve
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "fastapi" else real(name, *a))
    with pytest.raises(RuntimeError, match=r"needs fastapi.*\[serve\]"):
        serve(ServeConfig(model="unused", adapters={}))
