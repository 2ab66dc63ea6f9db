"""A bounded load test of `loralab serve` on loopback: the real uvicorn server, concurrent httpx clients,
1,000+ requests over 24 adapters (20 resident at most, so the LRU evicts and reloads under load), every
answer equal to that request served alone through set_adapter, and no failed request."""

import itertools
import statistics
import threading
import time

import pytest
import torch

from serve_fixtures import reference_completion, reference_model, save_adapters, tiny_llama_dir

ADAPTERS = [f"ad{i:02d}" for i in range(24)]
PROMPTS = [[1, 2, 3], [5, 6, 7, 8, 9, 10, 11], [4], [12, 13, 14, 15, 16]]
REQUESTS, CLIENTS = 1000, 16
torch.set_num_threads(1)   # a 32-wide model: one thread beats two spinning on a shared machine


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import uvicorn
    from loralab.serve.app import create_app
    from loralab.serve.server import ServeConfig, _bind, build_service
    root = tmp_path_factory.mktemp("load")
    model_dir = str(tiny_llama_dir(root / "tiny-llama"))
    (root / "adapters").mkdir()
    adapters = save_adapters(model_dir, root / "adapters", ADAPTERS)
    service = build_service(ServeConfig(model=model_dir, adapters=adapters, max_loaded=20, batch_wait_ms=5))
    sock = _bind("127.0.0.1", 0)
    uv = uvicorn.Server(uvicorn.Config(create_app(service), log_level="warning", lifespan="off"))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not uv.started:
        time.sleep(0.01)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}", service, model_dir, adapters
    uv.should_exit = True
    thread.join(10)
    service.engine.stop()


def test_load(server):
    import httpx
    url, service, model_dir, adapters = server
    reference = reference_model(model_dir, adapters)
    base = service.base_name
    expected = {(n, i): reference_completion(reference, None if n == base else n, p, 4)
                for n in ADAPTERS + [base] for i, p in enumerate(PROMPTS)}
    plan = list(itertools.islice(itertools.cycle(itertools.product(ADAPTERS + [base], range(len(PROMPTS)))),
                                 REQUESTS))
    plan = [(n, i, 2 + k % 3) for k, (n, i) in enumerate(plan[::7] + plan[1::7] + plan[2::7] + plan[3::7] +
                                                         plan[4::7] + plan[5::7] + plan[6::7])]
    latencies, failures, wrong = [], [], []
    lock = threading.Lock()

    def client(rows):
        with httpx.Client(base_url=url, timeout=60) as http:
            for name, i, max_tokens in rows:
                start = time.perf_counter()
                try:
                    r = http.post("/v1/completions", json={"model": name, "prompt": PROMPTS[i],
                                                           "max_tokens": max_tokens, "temperature": 0})
                except httpx.HTTPError as e:
                    with lock:
                        failures.append(repr(e))
                    continue
                seconds = time.perf_counter() - start
                with lock:
                    if r.status_code != 200:
                        failures.append((r.status_code, r.text[:200]))
                        continue
                    latencies.append(seconds)
                    if r.json()["choices"][0]["tokens"] != expected[(name, i)][:max_tokens]:
                        wrong.append((name, i, max_tokens))

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(plan[k::CLIENTS],)) for k in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    lat = sorted(latencies)
    snap = httpx.get(f"{url}/metrics?format=json").json()
    print(f"\nloralab serve load test: {len(plan)} requests, {CLIENTS} clients, {len(ADAPTERS)} adapters "
          f"(max 20 resident): {len(plan) / wall:.0f} req/s, p50 {statistics.median(lat) * 1000:.1f} ms, "
          f"p99 {lat[int(0.99 * len(lat))] * 1000:.1f} ms, mean batch {snap['batch_size_mean']:.1f} rows, "
          f"{snap['adapters']['evictions']} evictions, {len(failures)} failed")
    assert not failures, failures[:5]
    assert not wrong, wrong[:5]
    assert len(latencies) == REQUESTS >= 1000
    assert snap["batch_size_mean"] > 1.5 and max(int(k) for k in snap["adapters_per_batch"]) >= 4
    assert snap["adapters"]["evictions"] > 0 and len(snap["adapters"]["resident"]) <= 20
