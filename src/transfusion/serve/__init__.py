"""`transfusion serve`: the web demo (a page + a JSON/PNG API) for one trained model, on loopback by default.

    service.py  what can be done with the model, inputs checked (no HTTP)
    worker.py   one inference thread behind a bounded queue, per-request deadlines
    app.py      FastAPI routes, status codes, server-sent progress
    static/     the page (HTML + JS + CSS, served locally)

FastAPI, uvicorn and python-multipart are the `serve` extra (`pip install -e .[serve]`; `make venv` has them).
"""

from __future__ import annotations

from pathlib import Path

from transfusion.serve.service import ServeLimits

__all__ = ["ServeLimits", "serve"]


def serve(ckpt: str | Path, host: str = "127.0.0.1", port: int = 8000, limits: ServeLimits | None = None,
          use_ema: bool = True) -> None:
    """Load `ckpt` and serve it until interrupted."""
    import uvicorn

    from transfusion.serve.app import create_app
    from transfusion.serve.service import ModelService

    service = ModelService.load(ckpt, limits or ServeLimits(), use_ema=use_ema)
    uvicorn.run(create_app(service), host=host, port=port, log_level="info")
