"""Which web pages may use the API from a browser: its own, and the origins the operator lists.

A browser sends a page's requests to any address with the user's network position: without API keys (the default,
on 127.0.0.1) a page on any site could open WS /v1/ws and submit jobs (WebSockets have no CORS), or send a "simple"
POST that needs no preflight (multipart to /v1/files and /v1/batches, a text/plain body to /worker_generate_stream,
which reads any Content-Type as the original did). CORS only keeps the page from reading the answer; the job ran.
So a WebSocket handshake, and every request that may change something (a method other than GET, HEAD, OPTIONS),
that carries an `Origin` other than an allowed one is refused before any route sees it. Clients that are not
browsers (curl, requests, the original LLaVA server, `websockets`) send no Origin and are not concerned.
"""

import logging
from collections.abc import Iterable
from urllib.parse import urlsplit

from fastapi.middleware.cors import CORSMiddleware
from starlette.datastructures import Headers
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from api.errors import ApiError, error_response
from api.routes.llava import JOB_ID_HEADER

log = logging.getLogger("llava_queue.api")

ORIGINS_SETTING = "LLAVA_QUEUE_CORS_ORIGINS"
# Methods a page may send from anywhere: they read, and CORS keeps the answer from a page not allowed to read it.
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# The response headers a page on an allowed origin may read (CORS hides all but a few): when to retry (429, 503),
# the job a stream or completion is, and the OpenAI SDK's hint that a failed completion must not be sent again.
EXPOSED_HEADERS = ("Retry-After", JOB_ID_HEADER, "X-Should-Retry")
_DEFAULT_PORTS = {"http": 80, "https": 443}
# A WebSocket's scheme is its page's: the handshake from https://host carries wss://host.
_HTTP_SCHEMES = {"ws": "http", "wss": "https"}
# Long enough to recognise an origin, short enough for a log line and a WebSocket close reason (123 bytes at most).
_SHOWN_ORIGIN_CHARS = 60


def canonical_origin(scheme: str, netloc: str) -> str | None:
    """`scheme://host[:port]` as browsers write an Origin (lower case, no default port), for comparing origins
    written differently ("http://Example.com:80/" is "http://example.com"); None for a netloc that is not one."""
    scheme = _HTTP_SCHEMES.get(scheme.lower(), scheme.lower())
    try:
        parts = urlsplit(f"//{netloc}")
        host, port = parts.hostname, parts.port
    except ValueError:  # a port out of range or not a number, a bracket left open
        return None
    if not host or parts.username is not None or parts.password is not None or parts.path:
        return None
    host = f"[{host}]" if ":" in host else host
    return f"{scheme}://{host}" if port in (None, _DEFAULT_PORTS.get(scheme)) else f"{scheme}://{host}:{port}"


def parse_origin(origin: str) -> str | None:
    """An Origin header (or a configured origin, or a URL) in canonical form; None for `null` and anything that is
    not `scheme://host[:port]`."""
    parts = urlsplit(origin.strip().rstrip("/"))
    if not parts.scheme or parts.path or parts.query or parts.fragment:
        return None
    return canonical_origin(parts.scheme, parts.netloc)


def own_origin(scope: Scope) -> str | None:
    """The origin the request was sent to: its scheme (the proxy's, when uvicorn trusts its X-Forwarded-Proto) and
    its Host header, which the browser writes from the address the page asked for."""
    host = Headers(scope=scope).get("host")
    return canonical_origin(scope.get("scheme", "http"), host) if host else None


class AllowedOrigins:
    """The origins whose pages may use the API: the API's own (the Host a request came to, and LLAVA_QUEUE_PUBLIC_URL),
    and those of CORS_ORIGINS ("*": any)."""

    def __init__(self, cors_origins: Iterable[str], public_url: str | None = None):
        configured = list(cors_origins)
        self.any = "*" in configured
        self.listed = frozenset(filter(None, (parse_origin(origin) for origin in configured if origin != "*")))
        # PUBLIC_URL is a URL: its path (a prefix behind a proxy) is not part of its origin.
        public = urlsplit(public_url.strip()) if public_url else None
        self.public = canonical_origin(public.scheme, public.netloc) if public and public.scheme else None

    def listed_origin(self, origin: str) -> bool:
        """Whether CORS_ORIGINS lets pages of `origin` in (they may also read the answers)."""
        return self.any or parse_origin(origin) in self.listed

    def allows(self, origin: str, scope: Scope) -> bool:
        """Whether a page of `origin` may use the API through the request of `scope`."""
        if self.listed_origin(origin):
            return True
        canonical = parse_origin(origin)
        return canonical is not None and canonical in (own_origin(scope), self.public)


def origin_refused(origin: str) -> ApiError:
    """The 403 for a page whose origin is not allowed: it names the origin and the setting that would allow it."""
    shown = origin if len(origin) <= _SHOWN_ORIGIN_CHARS else origin[:_SHOWN_ORIGIN_CHARS] + "..."
    return ApiError(403, f"requests from web pages of {shown!r} are refused: that origin is not this API's own; "
                         f"list it in {ORIGINS_SETTING} to let its pages use the API",
                    type="permission_denied", param="header.origin")


class OriginCheck:
    """Refuse a WebSocket handshake, or a request of any method but GET/HEAD/OPTIONS, whose `Origin` is not
    allowed (`Origin: null`, a sandboxed or file page, included), with the JSON 403 of `origin_refused`; a
    WebSocket gets it in the place of the upgrade, as a refused API key does (a close, code 1008, on a server without
    ASGI's denial response). Pure ASGI: the streams it lets through pass unbuffered."""

    def __init__(self, app: ASGIApp, allowed: AllowedOrigins):
        self.app, self.allowed = app, allowed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        checked = scope["type"] == "websocket" or (scope["type"] == "http" and scope["method"] not in SAFE_METHODS)
        origin = Headers(scope=scope).get("origin") if checked else None
        if origin is None or self.allowed.allows(origin, scope):
            await self.app(scope, receive, send)
            return
        refused = origin_refused(origin)
        log.warning("refused %s %s from a page of %r: not an allowed origin (%s)", scope.get("method", "WebSocket"),
                    scope["path"], origin[:_SHOWN_ORIGIN_CHARS], ORIGINS_SETTING)
        if scope["type"] == "websocket" and "websocket.http.response" not in scope.get("extensions", {}):
            reason = refused.message.encode()[:120].decode(errors="ignore")  # (a close reason: 123 bytes at most)
            await send({"type": "websocket.close", "code": 1008, "reason": reason})
            return
        await error_response(refused)(scope, receive, send)


class Cors(CORSMiddleware):
    """Starlette's CORS with AllowedOrigins' comparison of origins, the API's headers exposed, and a refused
    preflight answered with the JSON error (Starlette answers a plain-text "Disallowed CORS origin")."""

    def __init__(self, app: ASGIApp, allowed: AllowedOrigins):
        super().__init__(app, allow_origins=["*"] if allowed.any else sorted(allowed.listed), allow_methods=["*"],
                         allow_headers=["*"], expose_headers=EXPOSED_HEADERS)
        self.allowed = allowed

    def is_allowed_origin(self, origin: str) -> bool:
        return self.allowed.listed_origin(origin)

    def preflight_response(self, request_headers: Headers) -> Response:
        answer = super().preflight_response(request_headers)
        if answer.status_code < 400:
            return answer
        origin = request_headers["origin"]
        if self.is_allowed_origin(origin):  # an allowed origin asking for what is not (a method no route has)
            refused = ApiError(400, f"the CORS preflight was refused: {answer.body.decode()}", param="header.origin")
        else:
            refused = origin_refused(origin)
        refused.headers = {name: value for name, value in answer.headers.items()
                           if name not in ("content-type", "content-length")}
        return error_response(refused)
