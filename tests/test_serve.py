"""loralab serve in process (FastAPI's TestClient): batching across adapters equals each request alone,
sampling, LRU residency, run-time adapters, safety, and the errors."""

import threading

import pytest
import torch

from serve_fixtures import reference_completion, reference_model, save_adapters, tiny_llama_dir
from loralab import list_adapters, set_adapter
from loralab.serve.app import create_app
from loralab.serve.server import ServeConfig, build_service

NAMES = ["a", "b", "c", "d"]
PROMPTS = [[1, 2, 3], [5, 6, 7, 8, 9, 10, 11], [4], [12, 13]]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    model_dir = tiny_llama_dir(root / "tiny-llama")
    (root / "adapters").mkdir()
    adapters = save_adapters(model_dir, root / "adapters", NAMES + ["extra"])
    return root, str(model_dir), adapters


@pytest.fixture(scope="module")
def reference(files):
    return reference_model(files[1], files[2])


def _client(files, **overrides):
    from fastapi.testclient import TestClient
    root, model_dir, adapters = files
    options = dict(model=model_dir, adapters={n: adapters[n] for n in NAMES},
                   adapter_dirs=(str(root / "adapters"),), batch_wait_ms=30)
    options.update(overrides)
    service = build_service(ServeConfig(**options))
    return TestClient(create_app(service)), service


@pytest.fixture(scope="module")
def served(files):
    client, service = _client(files)
    yield client, service
    service.engine.stop()


def _complete(client, model, prompt, max_tokens=4, **extra):
    r = client.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": max_tokens,
                                              "temperature": 0, **extra})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["tokens"]


def _concurrently(calls):
    results = [None] * len(calls)

    def run(i):
        try:
            results[i] = calls[i]()
        except BaseException as e:  # noqa: BLE001 - re-raised below, in the test's thread
            results[i] = e
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results


def test_concurrent_requests_for_different_adapters_share_a_forward_and_equal_each_alone(served, reference):
    client, service = served
    base = service.base_name
    jobs = [(n, p) for n in NAMES + [base] for p in PROMPTS]
    got = _concurrently([lambda n=n, p=p: _complete(client, n, p) for n, p in jobs])
    for (name, prompt), tokens in zip(jobs, got):
        assert tokens == reference_completion(reference, None if name == base else name, prompt, 4), (name, prompt)
    snap = service.engine.metrics.snapshot()
    assert max(snap["adapters_per_batch"]) >= 2 and max(snap["batch_sizes"]) >= 2, snap  # mixed forwards happened
    assert len({tuple(t) for t in got[:len(PROMPTS)]} | {tuple(t) for t in got[len(PROMPTS):2 * len(PROMPTS)]}) > 1


def test_sampling_follows_the_seed_whatever_the_batch(served):
    client, _ = served
    request = dict(temperature=0.9, top_p=0.8, seed=7)
    alone = _complete(client, "b", PROMPTS[1], 6, **request)
    crowd = _concurrently([lambda: _complete(client, "b", PROMPTS[1], 6, **request)] +
                          [lambda n=n: _complete(client, n, PROMPTS[0], 6, temperature=1.0, seed=1) for n in NAMES])
    assert crowd[0] == alone
    others = {tuple(_complete(client, "b", PROMPTS[1], 6, temperature=1.0, seed=s)) for s in range(6)}
    assert len(others) > 1   # different seeds, different samples


def test_top_p_keeps_the_nucleus():
    from loralab.serve.generate import Sampling, next_tokens
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    s = Sampling(1, 1.0, 0.7, 0)
    seen = {next_tokens(logits, [s], [torch.Generator().manual_seed(i)])[0] for i in range(200)}
    assert seen == {0, 1}
    assert next_tokens(logits, [Sampling(1, 0.0)], [None]) == [0]


def test_errors(served):
    client, service = served
    r = client.post("/v1/completions", json={"model": "nope", "prompt": [1]})
    assert r.status_code == 404 and "'nope'" in r.text and "'a'" in r.text and service.base_name in r.text
    r = client.post("/v1/completions", content=b'{"model": "a", "prompt": [1', headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.text
    assert client.post("/v1/completions", content=b"[1, 2]").status_code == 400
    assert client.post("/v1/completions", json={"prompt": [1]}).status_code == 400          # no model
    r = client.post("/v1/completions", json={"model": "a", "prompt": [1] * 3000})
    assert r.status_code == 413 and "over the limit" in r.text
    r = client.post("/v1/completions", json={"model": "a", "prompt": [1], "max_tokens": 10_000})
    assert r.status_code == 400 and "max_tokens" in r.text
    r = client.post("/v1/completions", json={"model": "a", "prompt": [1] * 60, "max_tokens": 10})
    assert r.status_code == 400 and "context of 64" in r.text
    assert client.post("/v1/completions", json={"model": "a", "prompt": [1000]}).status_code == 400   # vocab
    assert client.post("/v1/completions", json={"model": "a", "prompt": "text"}).status_code == 400   # no tokenizer
    assert client.post("/v1/completions", json={"model": "a", "prompt": [1], "temperature": "hot"}).status_code == 400
    r = client.post("/v1/completions", content=b" " * (2 << 20), headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert client.post("/v1/classify", json={"model": "a", "input": [1]}).status_code == 400       # not a classifier
    assert client.get("/v1/models").status_code == 200 and client.get("/health").json()["status"] == "ok"


def test_adapters_at_run_time_only_from_allowed_roots(served, files, reference, tmp_path):
    client, service = served
    root, _, adapters = files
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    for path in [str(outside), "../tiny-llama", "extra/../../tiny-llama", "/etc", ""]:
        r = client.post("/v1/adapters", json={"name": "x", "path": path})
        assert r.status_code in (400, 403), (path, r.text)
    assert client.post("/v1/adapters", json={"name": "bad.name", "path": "extra"}).status_code == 400
    assert client.post("/v1/adapters", json={"name": "a", "path": "extra"}).status_code == 409
    r = client.post("/v1/adapters", json={"name": "extra", "path": "extra"})
    assert r.status_code == 201, r.text
    assert "extra" in [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert _complete(client, "extra", PROMPTS[0]) == reference_completion(reference, "extra", PROMPTS[0], 4)
    # unloading while its requests are in flight: those finish, later ones get 404, then it leaves the model
    calls = [lambda: client.post("/v1/completions", json={"model": "extra", "prompt": PROMPTS[1], "max_tokens": 8,
                                                          "temperature": 0}) for _ in range(8)]
    results = []
    threads = [threading.Thread(target=lambda c=c: results.append(c())) for c in calls]
    for t in threads:
        t.start()
    while not service.engine.registry.in_flight.get("extra"):
        pass
    assert client.delete("/v1/adapters/extra").status_code == 200
    for t in threads:
        t.join()
    assert all(r.status_code in (200, 404) for r in results) and any(r.status_code == 200 for r in results)
    assert client.post("/v1/completions", json={"model": "extra", "prompt": [1]}).status_code == 404
    assert client.delete("/v1/adapters/extra").status_code == 404
    _complete(client, "a", [1])  # a batch later, the removed adapter is gone from the model
    assert "extra" not in list_adapters(service.engine.model)


def test_lru_residency_evicts_and_reloads(files, reference):
    client, service = _client(files, max_loaded=2)
    try:
        order = ["a", "b", "c", "a", "d", "b", "a"]
        for name in order:
            assert _complete(client, name, PROMPTS[3]) == reference_completion(reference, name, PROMPTS[3], 4)
            assert len(service.engine.registry.snapshot) <= 2
            assert set(list_adapters(service.engine.model)) == set(service.engine.registry.snapshot)
        stats = client.get("/metrics?format=json").json()["adapters"]
        assert stats["evictions"] >= 4 and stats["loads"] == stats["evictions"] + 2
        # 4 adapters at once with room for 2: served in forwards of at most 2 adapters, all correct
        got = _concurrently([lambda n=n: _complete(client, n, PROMPTS[0]) for n in NAMES])
        assert got == [reference_completion(reference, n, PROMPTS[0], 4) for n in NAMES]
    finally:
        service.engine.stop()


def test_api_key(files):
    client, service = _client(files, api_key="s3cret")
    try:
        assert client.get("/health").status_code == 200
        assert client.get("/v1/models").status_code == 401
        assert client.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert client.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    finally:
        service.engine.stop()
    with pytest.raises(ValueError, match="--api-key"):
        ServeConfig(model=files[1], host="0.0.0.0")


def test_metrics(served):
    client, _ = served
    _complete(client, "a", [1, 2])
    text = client.get("/metrics").text
    assert 'loralab_requests_total{endpoint="/v1/completions",status="200"}' in text
    assert "loralab_request_latency_seconds" in text and "loralab_adapters_resident" in text
    snap = client.get("/metrics?format=json").json()
    assert snap["latency_seconds"]["p50"] > 0 and snap["batches"] >= 1


def test_classify_rows_equal_each_adapter_alone(tmp_path):
    from fastapi.testclient import TestClient
    model_dir = tiny_llama_dir(tmp_path / "cls", classify=True)
    (tmp_path / "ad").mkdir()
    adapters = save_adapters(model_dir, tmp_path / "ad", ["p", "q", "s"], classify=True)
    service = build_service(ServeConfig(model=str(model_dir), adapters=adapters, batch_wait_ms=30))
    client = TestClient(create_app(service))
    ref = reference_model(str(model_dir), adapters)
    try:
        inputs = [[3, 4, 5], [6, 7, 8], [9, 10]]
        got = _concurrently([lambda n=n: client.post("/v1/classify", json={"model": n, "input": inputs}).json()
                             for n in ["p", "q", "s"]])
        for name, answer in zip(["p", "q", "s"], got):
            set_adapter(ref, name)
            for x, row in zip(inputs, answer["data"]):
                with torch.no_grad():
                    expected = ref(input_ids=torch.tensor([x])).logits[0]
                assert torch.allclose(torch.tensor(row["logits"]), expected, atol=1e-5), name
                assert row["label_id"] == int(expected.argmax())
        assert client.post("/v1/completions", json={"model": "p", "prompt": [1]}).status_code == 400
    finally:
        service.engine.stop()


def test_a_serving_process_keeps_freed_memory_for_the_next_batch():
    """After keep_freed_memory, freeing and allocating activation-sized blocks again takes (almost) no page
    faults; with glibc's defaults each round takes its memory back from the kernel, page by page.  The heap
    may still grow once by a block (where the kernel puts the heap varies by machine), hence a bound of
    a few blocks' pages over 8 rounds, against 24 blocks' pages with the defaults."""
    import subprocess
    import sys
    code = """
import json, resource, torch
from loralab.serve.memory import keep_freed_memory
def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(8):     # 40 MB blocks made and freed: above 32 MiB glibc always maps them afresh
        a = torch.ones(10 << 20); b = torch.ones(10 << 20); del a; c = torch.ones(10 << 20); del b, c
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults()
default = faults()
kept = keep_freed_memory()
faults()
print(json.dumps({"default": default, "kept": kept, "after": faults()}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    got = __import__("json").loads(out.stdout.strip().splitlines()[-1])
    if not sys.platform.startswith("linux"):
        assert got["kept"] is False
        return
    assert got["kept"] is True
    block_pages = (40 << 20) // 4096
    assert got["default"] > 20 * block_pages     # each round faulted its 3 blocks in again
    assert got["after"] < 4 * block_pages
