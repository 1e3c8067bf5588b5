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


class DropQueryString(logging.Filter):
    """Access-log lines without query strings: a client may put a key in ``?api_key=`` and the
    log must never hold it (uvicorn's access record args: client, method, path+query, version, status)."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str):
            record.args = (*args[:2], args[2].split("?", 1)[0], *args[3:])
        return True


def log_config() -> dict[str, Any]:
    """uvicorn's own logging setup with :class:`DropQueryString` on the access handler."""
    import copy

    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config.setdefault("filters", {})["drop_query"] = {"()": f"{__name__}.DropQueryString"}
    config["handlers"]["access"]["filters"] = ["drop_query"]
    return config


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
    if cfg.host in ("0.0.0.0", "::") and not cfg.allowed_hosts:
        print(f"nla serve: note: binding {cfg.host}: only loopback Host names are answered; list the names "
              "clients use with --allowed-hosts", file=sys.stderr)
    from nla.train.generation import check_backend

    check_backend(cfg.generation_backend)  # vLLM missing, too old or no GPU: one line before any loading
    nla = NLA.from_pretrained(cfg.nla, device=cfg.device, dtype=cfg.dtype)
    app = create_app(nla, cfg, api_key=api_key)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    print(f"nla serve: {cfg.nla} ({nla.meta.base_model}, layer {nla.meta.layer_index}, d={nla.meta.d_model}) on "
          f"http://{cfg.host}:{cfg.port}/  batching={'on' if cfg.batching else 'off'}  "
          f"generation={cfg.generation_backend}  "
          f"auth={'bearer token from $' + cfg.api_key_env if api_key else 'none'}", file=sys.stderr)
    # The access log records method, path and status only: never headers, so never the token.
    # and query strings are dropped (they may carry keys).
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="info", log_config=log_config())
    return 0


def register(sub: Any) -> None:
    from nla.config import add_config_args, resolve_config

    p = sub.add_parser("serve", help="HTTP API + web explorer for a bundle (binds 127.0.0.1 by default)")
    add_config_args(p, ServeConfig)
    p.set_defaults(func=lambda args: serve(resolve_config(ServeConfig, args, section="serve")))
