"""Shared-secret authentication of the weight-update path (docs/SECURITY.md).

Everything that accepts weights or commands (the receiver agent, LMDeploy servers launched with
``--api-keys``) checks ``Authorization: Bearer <key>``, and every request the trainer sends there
carries it. The key comes from an environment variable (default ``DIRL_API_KEY``) or a file, never
from a config file, so it never lands in a run directory's ``config.json``.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import os

from aiohttp import web

DEFAULT_KEY_ENV = "DIRL_API_KEY"
log = logging.getLogger(__name__)


def read_api_key(*, env: str = DEFAULT_KEY_ENV, file: str | None = None) -> str | None:
    """The key in ``file`` (surrounding whitespace stripped), else in ``$env``, else None."""
    if file:
        try:
            with open(file, encoding="utf-8") as f:
                key = f.read().strip()
        except OSError as e:
            raise ValueError(f"API key file {file}: cannot be read ({e.strerror})") from e
        if not key:
            raise ValueError(f"API key file {file}: is empty; expected the shared secret")
        return key
    return os.environ.get(env, "").strip() or None


def bearer_header(api_key: str | None) -> dict[str, str]:
    """``{"Authorization": "Bearer <key>"}``, or nothing without a key."""
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses; any other name may be reachable from outside."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_serving(host: str, api_key: str | None, *, insecure: bool, what: str, env: str) -> None:
    """Refuses to serve ``what`` without a key unless ``insecure`` (then warns, louder when
    ``host`` is reachable from other machines)."""
    if api_key:
        return
    if not insecure:
        raise ValueError(f"{what}: no API key: set ${env} (or --api-key-file) to a shared secret, "
                         "or pass --insecure to accept anonymous requests")
    where = "on loopback" if is_loopback(host) else f"on {host}, reachable from other machines"
    log.warning("%s accepts anonymous requests %s (--insecure): anyone who reaches it can replace "
                "the served weights", what, where)


def require_bearer(api_key: str) -> web.middleware:
    """aiohttp middleware: 401 for a request without ``Authorization: Bearer <api_key>``, before
    its body is read or its handler runs."""
    expected = f"Bearer {api_key}".encode()

    @web.middleware
    async def check(request: web.Request, handler):
        given = request.headers.get("Authorization", "").encode()
        if not hmac.compare_digest(given, expected):
            return web.Response(status=401, headers={"WWW-Authenticate": "Bearer"},
                                text="unauthorized: expected the shared key as Authorization: Bearer <key>")
        return await handler(request)

    return check
