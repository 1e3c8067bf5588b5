"""`nla serve --nla RUN`: the HTTP API and web explorer for one bundle."""

from __future__ import annotations

import ipaddress
import logging
import os
import sys
from typing import Any

from nla.errors import NLAError
from nla.serve.app import ServeConfig


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_api_key(env_name: str) -> str | None:
    """The bearer token from the environment variable named ``env_name`` (never from a flag,
    so it stays out of shell history, process lists and saved configs)."""
    if not env_name:
        return None
    value = os.environ.get(env_name, "")
    if not value.strip():
        raise NLAError(f"--api-key-env {env_name}: that environment variable is unset or empty")
    return value.strip()


def serve(cfg: ServeConfig) -> int:
    import uvicorn

    from nla.bundle import NLA
    from nla.serve.app import create_app

    if not cfg.nla:
        raise NLAError("give the bundle to serve: --nla RUN")
    api_key = read_api_key(cfg.api_key_env)
    if not _is_loopback(cfg.host) and api_key is None:
        print(f"nla serve: warning: binding {cfg.host} without --api-key-env exposes the model to the network "
              "with no authentication", file=sys.stderr)
    nla = NLA.from_pretrained(cfg.nla, device=cfg.device or None, dtype=cfg.dtype)
    app = create_app(nla, cfg, api_key=api_key)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    print(f"nla serve: {cfg.nla} ({nla.meta.base_model}, layer {nla.meta.layer_index}, d={nla.meta.d_model}) on "
          f"http://{cfg.host}:{cfg.port}/  batching={'on' if cfg.batching else 'off'}  "
          f"auth={'bearer token from $' + cfg.api_key_env if api_key else 'none'}", file=sys.stderr)
    # The access log records method, path and status only: never headers, so never the token.
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="info")
    return 0


def register(sub: Any) -> None:
    from nla.config import add_config_args, resolve_config

    p = sub.add_parser("serve", help="HTTP API + web explorer for a bundle (binds 127.0.0.1 by default)")
    add_config_args(p, ServeConfig)
    p.set_defaults(func=lambda args: serve(resolve_config(ServeConfig, args, section="serve")))
