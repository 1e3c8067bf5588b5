"""Serving an NLA over HTTP: ``create_app`` (FastAPI), ``Client`` / ``AsyncClient`` (httpx)."""

from nla.serve.app import ServeConfig, create_app, running_server
from nla.serve.client import APIError, AsyncClient, Client

__all__ = ["APIError", "AsyncClient", "Client", "ServeConfig", "create_app", "running_server"]
