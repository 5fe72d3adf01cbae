"""Which web pages may use the API from a browser: its own, and the origins the operator lists.

A browser sends a page's requests to any address with the user's network position: without API keys (the default,
on 127.0.0.1) a page on any site could open WS /v1/ws and submit jobs (WebSockets have no CORS), or send a "simple"
POST that needs no preflight (multipart to /v1/files and /v1/batches, a text/plain body to /worker_generate_stream,
which reads any Content-Type as the original did). CORS only keeps the page from reading the answer; the job ran.
So a WebSocket handshake, and every request that may change something (a method other than GET, HEAD, OPTIONS),
that carries an `Origin` other than an allowed one is refused before any route sees it. Clients that are not
browsers (curl, requests, the original LLaVA server, `websockets`) send no Origin and are not concerned.

A page can also point a name of its own at 127.0.0.1 once loaded (DNS rebinding) and use the API as its own origin:
a request that came over loopback is served only under the names this machine goes by (`rebound_name`).
"""

import ipaddress
import logging
import socket
from collections.abc import Iterable
from urllib.parse import quote, urlsplit

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

    def __init__(self, cors_origins: Iterable[str], public_url: str | None):
        configured = list(cors_origins)
        self.any = "*" in configured
        self.listed = frozenset(filter(None, (parse_origin(origin) for origin in configured if origin != "*")))
        # PUBLIC_URL is a URL: its path (a prefix behind a proxy) is not part of its origin.
        public = urlsplit(public_url.strip()) if public_url else None
        self.public = canonical_origin(public.scheme, public.netloc) if public and public.scheme else None
        # The names this API may be reached by over loopback (`rebound_name`): besides localhost and IP addresses,
        # this machine's own name (Debian's /etc/hosts gives it 127.0.1.1), and those of PUBLIC_URL and CORS_ORIGINS
        # (a proxy on this machine that passes the Host header on).
        named = [self.public, *self.listed]
        self.names = frozenset(filter(None, (urlsplit(origin).hostname for origin in named if origin))) | {
            socket.gethostname().lower()}  # (not getfqdn: a DNS lookup, seconds where none answers)

    def listed_origin(self, origin: str) -> bool:
        """Whether CORS_ORIGINS lets pages of `origin` in (they may also read the answers)."""
        return self.any or parse_origin(origin) in self.listed

    def allows(self, origin: str, scope: Scope) -> bool:
        """Whether a page of `origin` may use the API through the request of `scope`."""
        if self.listed_origin(origin):
            return True
        canonical = parse_origin(origin)
        return canonical is not None and canonical in (own_origin(scope), self.public)


def _is_loopback(address: str) -> bool:
    """Whether a socket address is this machine's loopback: 127.0.0.0/8, ::1, or 127.x as an API listening on `::`
    sees it (`::ffff:127.0.0.1`, which Python before 3.13 does not call loopback: such an API served a rebound
    name over 127.0.0.1)."""
    try:
        address = ipaddress.ip_address(address.split("%")[0])
    except ValueError:  # a unix socket's path
        return False
    return (getattr(address, "ipv4_mapped", None) or address).is_loopback


def rebound_name(scope: Scope, allowed: AllowedOrigins) -> str | None:
    """The name in the Host header of a request that came over loopback under a name not this machine's own, or
    None. A page can make a name of its own point to 127.0.0.1 once it is loaded (DNS rebinding): its requests then
    go to this API as to the page's own origin (no Origin check, no CORS, its answers readable). The browser still
    writes the page's name in Host: a loopback connection is served under localhost (and *.localhost, which
    browsers keep on this machine), an IP address, this machine's name, and the names of PUBLIC_URL and
    CORS_ORIGINS only ("*" there: any)."""
    server = scope.get("server")
    host = Headers(scope=scope).get("host")
    if allowed.any or not server or not server[0] or not host or not _is_loopback(server[0]):
        return None
    try:
        name = urlsplit(f"//{host}").hostname
    except ValueError:  # not a host[:port]: the routes' own parsing answers it
        return None
    if not name or name == "localhost" or name.endswith(".localhost") or name in allowed.names:
        return None
    try:
        ipaddress.ip_address(name)
        return None
    except ValueError:
        return name


def _shown(text: str) -> str:
    """A client's origin or host name as a refusal quotes it: cut at _SHOWN_ORIGIN_CHARS."""
    return text if len(text) <= _SHOWN_ORIGIN_CHARS else text[:_SHOWN_ORIGIN_CHARS] + "..."


def logged_path(scope: Scope) -> str:
    """A request's path as a log line shows it: percent-encoded, as uvicorn's access lines show it. Decoded, a `%0A` a
    client put in it ended the line and began one of the client's making (a forged entry, in the text log format)."""
    return quote(scope["path"])


def name_refused(name: str) -> ApiError:
    """The 403 for a request that reached this API over loopback under a name not its own (`rebound_name`)."""
    shown = _shown(name)
    return ApiError(403, f"this API was reached on this machine under the name {shown!r}, which is not its own "
                         "(a web page can point a name of its own at 127.0.0.1); to serve it under that name, set "
                         f"LLAVA_QUEUE_PUBLIC_URL to that address or list its origin in {ORIGINS_SETTING}",
                    type="permission_denied", param="header.host")


def origin_refused(origin: str) -> ApiError:
    """The 403 for a page whose origin is not allowed: it names the origin and the setting that would allow it."""
    shown = _shown(origin)
    return ApiError(403, f"requests from web pages of {shown!r} are refused: that origin is not this API's own; "
                         f"list it in {ORIGINS_SETTING} to let its pages use the API",
                    type="permission_denied", param="header.origin")


class OriginCheck:
    """Refuse a request that came over loopback under a name not this machine's (`rebound_name`, any method), and a
    WebSocket handshake, or a request of any method but GET/HEAD/OPTIONS, whose `Origin` is not
    allowed (`Origin: null`, a sandboxed or file page, included), with the JSON 403 of `origin_refused`; a
    WebSocket gets it in the place of the upgrade, as a refused API key does (a close, code 1008, on a server without
    ASGI's denial response). Pure ASGI: the streams it lets through pass unbuffered."""

    def __init__(self, app: ASGIApp, allowed: AllowedOrigins):
        self.app, self.allowed = app, allowed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        checked = scope["type"] == "websocket" or scope["method"] not in SAFE_METHODS
        origin = Headers(scope=scope).get("origin") if checked else None
        name = rebound_name(scope, self.allowed)
        if name is not None:
            refused = name_refused(name)
            log.warning("refused %s %s: reached over loopback under the name %r, not this machine's own",
                        scope.get("method", "WebSocket"), logged_path(scope), name[:_SHOWN_ORIGIN_CHARS])
        elif origin is None or self.allowed.allows(origin, scope):
            await self.app(scope, receive, send)
            return
        else:
            refused = origin_refused(origin)
            log.warning("refused %s %s from a page of %r: not an allowed origin (%s)", scope.get("method", "WebSocket"),
                        logged_path(scope), origin[:_SHOWN_ORIGIN_CHARS], ORIGINS_SETTING)
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
