"""`qtool serve`: an OpenAI-compatible HTTP server over qtool.engine (FastAPI + uvicorn).

Contract: `schemas.py` holds the pydantic request bodies (unknown fields allowed and ignored),
`app.py` builds the FastAPI app (`create_app(state)`) whose handlers hand requests to the engine
thread and receive outputs through per-request asyncio queues, `metrics.py` the Prometheus metrics.
Nothing here imports torch at module level.
"""
