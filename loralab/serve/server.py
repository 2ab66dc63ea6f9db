"""Start `loralab serve`: load the base model, build the registry, engine and app, run uvicorn.

    loralab serve --model DIR --adapter name=DIR ... [--adapter-dir ROOT ...] [--max-loaded N]
                  [--host 127.0.0.1] [--port 8000] [--api-key KEY | env LORALAB_API_KEY] [--workers N]

One process serves every request through one engine (one worker thread, dynamic batching).  --workers N
starts N such processes behind the same port (uvicorn's workers, sharing the listening socket); each loads
the base and the startup adapters itself, and adapters added at run time with POST /v1/adapters live in
the worker that took the request.  The server binds the loopback interface unless told otherwise, and a
reachable address needs an API key (or allow_remote=True, for a network that is already protected).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import ipaddress
import json
import os
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["ServeConfig", "build_service", "serve", "app_from_env", "parse_adapter_specs"]

CONFIG_ENV = "LORALAB_SERVE_CONFIG"
API_KEY_ENV = "LORALAB_API_KEY"


@dataclass(frozen=True)
class ServeConfig:
    model: str                                   # local transformers model directory
    adapters: dict = field(default_factory=dict)  # name -> adapter directory (loaded on demand)
    adapter_dirs: tuple = ()                      # roots POST /v1/adapters may load from
    max_loaded: int | None = None                 # adapters resident at once (LRU beyond)
    host: str = "127.0.0.1"
    port: int = 8000                              # 0: a free port
    api_key: str | None = None
    workers: int = 1
    max_batch: int = 32                           # rows per forward
    batch_wait_ms: float = 5.0                    # how long the first request waits for others
    max_prompt_tokens: int = 2048
    max_tokens: int = 512
    allow_remote: bool = False
    threads: int | None = None                    # torch threads per process (default: torch's)
    keep_freed_memory: bool = True                # malloc keeps freed activations for the next batch (memory.py)

    def __post_init__(self):
        if self.workers < 1:
            raise ValueError(f"workers={self.workers}: at least 1")
        if self.max_loaded is not None and self.max_loaded < 1:
            raise ValueError(f"max_loaded={self.max_loaded}: at least 1 (or leave it out for no limit)")
        if not _is_loopback(self.host) and not (self.api_key or self.allow_remote):
            raise ValueError(f"--host {self.host} is reachable from other machines; set --api-key (or "
                             f"{API_KEY_ENV}) so requests must authenticate, or pass --allow-remote")


def parse_adapter_specs(specs) -> dict:
    """["name=DIR", ...] -> {name: DIR}."""
    out = {}
    for spec in specs or ():
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--adapter {spec!r}: write NAME=DIR, e.g. --adapter sql=./adapters/sql")
        if name in out:
            raise ValueError(f"--adapter {name!r} is given twice")
        out[name] = path
    return out


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def build_service(config: ServeConfig):
    """Load the model (and tokenizer, if the directory has one); the started engine and the Service."""
    from ..hf import load_local_model
    from .app import Limits, Service
    from .engine import Engine
    from .registry import AdapterRegistry
    if config.threads is not None:
        import torch
        torch.set_num_threads(config.threads)
    if config.keep_freed_memory:
        from .memory import keep_freed_memory
        keep_freed_memory()
    model = load_local_model(config.model)
    tokenizer = _tokenizer_or_none(config.model)
    cfg = model.config
    task = "classify" if type(model).__name__.endswith("ForSequenceClassification") else "causal-lm"
    if task == "causal-lm" and not hasattr(model, "generate"):
        raise ValueError(f"{config.model}: {type(model).__name__} is neither a causal LM nor a sequence "
                         f"classifier; loralab serve runs those two")
    base_name = Path(config.model).resolve().name or "base"
    registry = AdapterRegistry(model, config.adapters, roots=config.adapter_dirs, max_loaded=config.max_loaded,
                               base_name=base_name)
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else (tokenizer.pad_token_id if tokenizer else None)
    engine = Engine(model, registry, max_batch=config.max_batch, batch_wait_ms=config.batch_wait_ms,
                    pad_id=pad if pad is not None else 0, eos_id=getattr(cfg, "eos_token_id", None)).start()
    limits = Limits(max_prompt_tokens=config.max_prompt_tokens, max_tokens=config.max_tokens)
    id2label = {int(k): v for k, v in cfg.id2label.items()} if task == "classify" else None
    return Service(engine, task, base_name, tokenizer, limits, config.api_key, cfg.vocab_size, id2label,
                   getattr(cfg, "max_position_embeddings", None))


def _tokenizer_or_none(model_dir: str):
    """The directory's tokenizer, or None (then requests send token ids)."""
    import transformers
    try:
        return transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError):
        return None


def app_from_env():
    """The app of one worker process (uvicorn --workers): the config comes in the environment."""
    from .app import create_app
    config = ServeConfig(**json.loads(os.environ[CONFIG_ENV]))
    return create_app(build_service(config))


def _healthcheck(config_class, seconds: int) -> dict:
    """Give workers time to load the model before uvicorn's supervisor declares them dead (newer uvicorn)."""
    import inspect
    params = inspect.signature(config_class.__init__).parameters
    return {"timeout_worker_healthcheck": seconds} if "timeout_worker_healthcheck" in params else {}


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        raise RuntimeError(f"cannot listen on {host}:{port} ({e.strerror}); pick another --port (0: any free)") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def serve(config: ServeConfig, *, json_out: bool = False, say=print) -> None:
    """Run the server until interrupted.  Prints {"url", "model", "adapters", "workers", "pid"} on stdout once it
    accepts requests (with json_out), or a line for people."""
    missing = [name for name in ("fastapi", "uvicorn") if importlib.util.find_spec(name) is None]
    if missing:
        raise RuntimeError(f"loralab serve needs {' and '.join(missing)}: pip install -e \".[serve]\" "
                           f"(or pip install fastapi uvicorn)")
    import uvicorn
    sock = _bind(config.host, config.port)
    host, port = sock.getsockname()[:2]
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
    info = {"url": url, "model": config.model, "adapters": sorted(config.adapters), "workers": config.workers,
            "pid": os.getpid()}

    def announce():
        if json_out:
            print(json.dumps(info), flush=True)
        say(f"loralab serve: {url} ({len(config.adapters)} adapters, {config.workers} worker(s)); Ctrl-C stops")

    if config.workers > 1:
        from uvicorn.supervisors import Multiprocess
        os.environ[CONFIG_ENV] = json.dumps(dataclasses.asdict(config))
        uv = uvicorn.Config("loralab.serve.server:app_from_env", factory=True, fd=sock.fileno(),
                            workers=config.workers, log_level="warning", lifespan="off",
                            **_healthcheck(uvicorn.Config, 300))
        announce()  # the socket already queues connections; each worker answers once its model is loaded
        Multiprocess(uv, sockets=[sock]).run()
        return
    from .app import create_app
    service = build_service(config)
    server = uvicorn.Server(uvicorn.Config(create_app(service), log_level="warning", lifespan="off"))

    def wait_started():
        while not server.started and not server.should_exit:
            threading.Event().wait(0.02)
        if server.started:
            announce()

    threading.Thread(target=wait_started, daemon=True).start()
    try:
        server.run(sockets=[sock])
    finally:
        service.engine.stop()
        sock.close()
