"""The HTTP API (FastAPI) over the engine: OpenAI-style completions, classification, adapters at run time.

    POST   /v1/completions        {"model": adapter name or the base's, "prompt": text or token ids (or a list
                                   of them), "max_tokens", "temperature", "top_p", "seed"}  (causal LMs)
    POST   /v1/classify           {"model", "input": text or token ids (or a list of them)}  (classifiers)
    GET    /v1/models             the base and every adapter, with whether it is resident
    POST   /v1/adapters           {"name", "path"}: add an adapter from a directory under an allowed root
    DELETE /v1/adapters/{name}    forget it; requests already accepted for it still finish
    GET    /health                {"status": "ok"} (no API key needed)
    GET    /metrics               Prometheus text; ?format=json for JSON

Errors are OpenAI-shaped, {"error": {"message", "type", "code"}}: 400 malformed JSON or a bad field, 401 a
missing / wrong API key, 403 an adapter path outside the allowed roots, 404 an unknown model (the message
names the known ones), 409 a name in use, 413 a body or a prompt over the limits.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import time
import uuid
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from .engine import Engine, Job
from .generate import Sampling
from .registry import ServeError

__all__ = ["Limits", "Service", "create_app"]


@dataclass(frozen=True)
class Limits:
    """max_prompt_tokens: tokens in one prompt; max_tokens: new tokens per request; max_body_bytes: request body;
    max_prompts: prompts (inputs) in one request."""
    max_prompt_tokens: int = 2048
    max_tokens: int = 512
    max_body_bytes: int = 1 << 20
    max_prompts: int = 64


@dataclass
class Service:
    """What the app serves: the engine (and its registry), the task, the tokenizer (or None: token ids only)."""
    engine: Engine
    task: str                 # "causal-lm" or "classify"
    base_name: str
    tokenizer: object = None
    limits: Limits = Limits()
    api_key: str | None = None
    vocab_size: int | None = None
    id2label: dict | None = None
    max_positions: int | None = None   # the model's context length: prompt + max_tokens must fit


def _error(status: int, message: str, kind: str):
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)


def create_app(service: Service):
    """The FastAPI app for `service` (the engine must be started by the caller)."""
    app = FastAPI(title="loralab serve", docs_url=None, redoc_url=None, openapi_url=None)
    engine, registry, metrics = service.engine, service.engine.registry, service.engine.metrics

    @app.middleware("http")
    async def guard(request: Request, call_next):
        start, endpoint = time.perf_counter(), request.url.path
        if service.api_key and endpoint != "/health":
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {service.api_key}".encode()):
                metrics.request(endpoint, 401)
                return _error(401, "missing or wrong API key; send 'Authorization: Bearer <key>'",
                              "authentication_error")
        try:
            response = await call_next(request)
        except ServeError as e:
            response = _error(e.status, e.message, e.kind)
        timed = endpoint in ("/v1/completions", "/v1/classify") and response.status_code == 200
        metrics.request(endpoint if response.status_code != 404 or endpoint.startswith("/v1/") else "other",
                        response.status_code, time.perf_counter() - start if timed else None)
        return response

    @app.exception_handler(ServeError)
    async def serve_error(request, e: ServeError):
        return _error(e.status, e.message, e.kind)

    async def body(request: Request) -> dict:
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > service.limits.max_body_bytes:
            raise ServeError(413, f"request body of {size} bytes is over the limit of "
                                  f"{service.limits.max_body_bytes}", "request_too_large")
        raw = await request.body()
        if len(raw) > service.limits.max_body_bytes:
            raise ServeError(413, f"request body is over the limit of {service.limits.max_body_bytes} bytes",
                             "request_too_large")
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ServeError(400, f"the body is not valid JSON ({e}); send a JSON object") from None
        if not isinstance(data, dict):
            raise ServeError(400, "the body must be a JSON object")
        return data

    async def model_request(request: Request, task: str, other: str) -> tuple[dict, str, str | None, str | None]:
        """(body, the model field, the adapter's directory or None for the base, the adapter name or None)."""
        if service.task != task:
            raise ServeError(400, f"this server runs a {service.task} model; use {other}")
        data = await body(request)
        name = _model_field(data)
        path = registry.resolve(name)
        return data, name, path, None if path is None else name

    async def run(jobs: list[Job]) -> list:
        futures = [engine.submit(j) for j in jobs]
        try:
            return [await asyncio.wrap_future(f) for f in futures]
        except ServeError:
            raise
        except (ValueError, KeyError, FileNotFoundError) as e:
            raise ServeError(400, str(e.args[0] if isinstance(e, KeyError) else e)) from None

    @app.get("/health")
    async def health():
        return {"status": "ok", "task": service.task, "pid": os.getpid()}

    @app.get("/v1/models")
    async def models():
        resident = set(registry.snapshot)
        data = [{"id": service.base_name, "object": "model", "owned_by": "loralab", "resident": True}]
        data += [{"id": n, "object": "model", "owned_by": "loralab", "parent": service.base_name,
                  "resident": n in resident} for n in registry.names()]
        return {"object": "list", "data": data}

    @app.post("/v1/completions")
    async def completions(request: Request):
        data, name, path, adapter = await model_request(request, "causal-lm", "/v1/classify")
        prompts = _prompts(service, data.get("prompt"), "prompt")
        sampling = _sampling(service, data)
        longest = max(len(p) for p in prompts)
        if service.max_positions is not None and longest + sampling.max_tokens > service.max_positions:
            raise ServeError(400, f"a prompt of {longest} tokens + max_tokens={sampling.max_tokens} is over the "
                                  f"model's context of {service.max_positions} tokens; lower max_tokens")
        results = await run([Job("complete", adapter, path, tokens=p, sampling=sampling) for p in prompts])
        choices, completion = [], 0
        for i, (tokens, reason) in enumerate(results):
            completion += len(tokens)
            text = service.tokenizer.decode(tokens) if service.tokenizer is not None else None
            choices.append({"index": i, "text": text, "tokens": tokens, "finish_reason": reason, "logprobs": None})
        prompt_tokens = sum(len(p) for p in prompts)
        return {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
                "model": name, "choices": choices,
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                          "total_tokens": prompt_tokens + completion}}

    @app.post("/v1/classify")
    async def classify(request: Request):
        data, name, path, adapter = await model_request(request, "classify", "/v1/completions")
        inputs = _prompts(service, data.get("input"), "input")
        results = await run([Job("classify", adapter, path, tokens=x) for x in inputs])
        out = []
        for i, logits in enumerate(results):
            label = int(logits.argmax())
            out.append({"index": i, "label": (service.id2label or {}).get(label, str(label)), "label_id": label,
                        "logits": logits.tolist(), "probs": logits.softmax(-1).tolist()})
        return {"object": "list", "model": name, "data": out}

    @app.post("/v1/adapters", status_code=201)
    async def add_adapter(request: Request):
        data = await body(request)
        name, path = data.get("name"), data.get("path")
        directory = registry.add(name, path)
        try:
            await run([Job("load", name, directory)])   # load it now: a bad file is refused here
        except ServeError as e:
            registry.remove(name)
            raise ServeError(400, f"cannot load adapter {name!r}: {e.message}") from None
        return {"name": name, "object": "model", "resident": name in registry.snapshot}

    @app.delete("/v1/adapters/{name}")
    async def delete_adapter(name: str):
        in_flight = registry.remove(name)
        return {"name": name, "deleted": True, "in_flight": in_flight}

    @app.get("/metrics")
    async def metrics_endpoint(format: str = "prometheus"):
        snap = {**metrics.snapshot(), "adapters": registry.stats()}
        if format == "json":
            return JSONResponse(snap)
        return PlainTextResponse(_prometheus(snap))

    return app


def _model_field(data: dict) -> str:
    name = data.get("model")
    if not isinstance(name, str) or not name:
        raise ServeError(400, "'model' is required: the adapter's name, or the base model's name")
    return name


def _prompts(service: Service, value, field: str) -> list[list[int]]:
    """A prompt (text or token ids) or a list of them -> token id lists, checked against the limits."""
    if isinstance(value, str) or (isinstance(value, list) and value and all(type(t) is int for t in value)):
        value = [value]
    if not isinstance(value, list) or not value:
        raise ServeError(400, f"'{field}' must be a string, a list of token ids, or a non-empty list of those")
    if len(value) > service.limits.max_prompts:
        raise ServeError(413, f"{len(value)} prompts in one request; the limit is {service.limits.max_prompts}",
                         "request_too_large")
    out = []
    for item in value:
        if isinstance(item, str):
            if service.tokenizer is None:
                raise ServeError(400, f"this model has no tokenizer; send '{field}' as token ids")
            item = service.tokenizer(item)["input_ids"]
        if not isinstance(item, list) or not item or not all(type(t) is int for t in item):
            raise ServeError(400, f"each '{field}' must be a non-empty string or list of integer token ids")
        if service.vocab_size is not None and not all(0 <= t < service.vocab_size for t in item):
            raise ServeError(400, f"token ids must lie in [0, {service.vocab_size})")
        if len(item) > service.limits.max_prompt_tokens:
            raise ServeError(413, f"a {field} of {len(item)} tokens is over the limit of "
                                  f"{service.limits.max_prompt_tokens}", "request_too_large")
        out.append(item)
    return out


def _number(data: dict, key: str, default, kind, low, high):
    value = data.get(key, default)
    if value is None:
        value = default
    if kind is int and (type(value) is not int) or kind is float and (
            isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ServeError(400, f"'{key}' must be {'an integer' if kind is int else 'a number'}, got {value!r}")
    if not low <= value <= high:
        raise ServeError(400, f"'{key}'={value} is out of range; use {low} <= {key} <= {high}")
    return kind(value)


def _sampling(service: Service, data: dict) -> Sampling:
    if data.get("n", 1) != 1 or data.get("stream"):
        raise ServeError(400, "only n=1 and stream=false are supported")
    max_tokens = _number(data, "max_tokens", 16, int, 1, service.limits.max_tokens)
    temperature = _number(data, "temperature", 1.0, float, 0.0, 100.0)
    top_p = _number(data, "top_p", 1.0, float, 1e-9, 1.0)
    seed = data.get("seed")
    if seed is not None and (type(seed) is not int or not 0 <= seed < 2 ** 63):
        raise ServeError(400, f"'seed' must be a non-negative integer, got {seed!r}")
    return Sampling(max_tokens, temperature, top_p, seed)


def _prometheus(snap: dict) -> str:
    lines = ["# TYPE loralab_requests_total counter"]
    for key, n in snap["requests"].items():
        endpoint, status = key.rsplit(" ", 1)
        lines.append(f'loralab_requests_total{{endpoint="{endpoint}",status="{status}"}} {n}')
    lines.append("# TYPE loralab_request_latency_seconds summary")
    for q, v in snap["latency_seconds"].items():
        if v is not None:
            lines.append(f'loralab_request_latency_seconds{{quantile="0.{q[1:]}"}} {v:.6f}')
    lines.append("# TYPE loralab_batch_size histogram")
    lines.append(f"loralab_batches_total {snap['batches']}")
    lines.append(f"loralab_batch_size_mean {snap['batch_size_mean']:.4f}")
    for size, n in snap["batch_sizes"].items():
        lines.append(f'loralab_batch_size_count{{rows="{size}"}} {n}')
    lines.append(f"loralab_tokens_generated_total {snap['tokens_generated']}")
    a = snap["adapters"]
    lines += [f"loralab_adapters_resident {len(a['resident'])}", f"loralab_adapters_known {a['known']}",
              f"loralab_adapter_loads_total {a['loads']}", f"loralab_adapter_evictions_total {a['evictions']}"]
    return "\n".join(lines) + "\n"
