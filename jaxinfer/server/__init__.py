"""The OpenAI-compatible server (`jaxinfer serve`): FastAPI routes over an AsyncEngine.

Needs the `serve` extra (fastapi, uvicorn, pydantic, prometheus_client). `build_app` is imported on
first use, so that the CLI can declare `serve`'s flags (server/serve.py) without those packages.
"""

from __future__ import annotations

from typing import Any

__all__ = ["build_app"]


def __getattr__(name: str) -> Any:
    if name == "build_app":
        from jaxinfer.server.app import build_app

        return build_app
    raise AttributeError(f"module 'jaxinfer.server' has no attribute {name!r}")
