"""`loralab serve`: one base model, many adapters, one HTTP port.

    registry.py   which adapters exist (names -> directories, allowed roots) and which are resident (LRU)
    engine.py     the worker thread: dynamic batching of requests for different adapters into one forward,
                  left-padded generation with a KV cache, classification
    app.py        the FastAPI app: OpenAI-style /v1/completions, /v1/classify, /v1/models, /v1/adapters,
                  /health, /metrics; API key; error mapping
    server.py     start uvicorn (one process or N workers), print the URL

Everything that changes the model (loading, evicting, unloading adapters, forwards) happens on the engine's
worker thread, so HTTP handlers never race with a forward.
"""
