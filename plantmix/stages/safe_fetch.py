"""The guards plantmix puts around img2dataset's fetch of one URL (installed by plantmix.stages.i2d_hooks).

img2dataset's `download_image` opens a URL with `urllib.request.urlopen`, checks X-Robots-Tag and
reads the whole body; its retry loop calls it again on any failure. On its own that reads a 2 GB body
into memory, lets a server that drips a byte per second hold a thread for as long as it likes (the
timeout bounds each socket wait, not the download), follows redirects to any host and to ftp://, and
fails on URLs with spaces or non-ASCII characters. Its own code stays as it is; what it sees as
`urllib.request.urlopen` is `guarded_urlopen`, and its retry loop is `download_with_guards`:

- the URL is percent-encoded (IRI → URI: IDNA host, UTF-8 path and query) before the request; the
  manifest keeps the URL as given;
- every connection, the first and each redirect hop, is checked before it is opened: an address that
  is loopback, private, link-local or otherwise not public is refused (`host_refused`) unless
  `allow_private_hosts` or the host (or host:port) is allowed. The address checked is the one
  connected to, so a DNS answer cannot change between the check and the connection. (Behind an HTTP
  proxy taken from the environment, the address checked is the proxy's: list it in allowed_hosts.);
- a redirect to a scheme outside `allowed_schemes` (file:// never) is refused (`redirect_refused`);
- a body over `max_bytes` is refused (`response_too_large`): from Content-Length before reading, else
  while reading it in chunks, never holding more than the cap;
- a URL unfinished after `deadline` seconds of wall clock, redirects and retries included, is stopped
  (`deadline_exceeded`): a watchdog thread shuts its socket down, so even a read blocked on a server
  that drips its headers returns at once.
A refusal is final (never retried); its error message starts with its code (plantmix.core.schema).
"""

from __future__ import annotations

import functools
import http.client
import io
import ipaddress
import os
import re
import socket
import threading
import time
import urllib.request
import urllib.response
from dataclasses import dataclass, field
from types import SimpleNamespace
from urllib.parse import quote, urljoin, urlsplit, urlunsplit

from plantmix.core.schema import (
    ERROR_DEADLINE_EXCEEDED,
    ERROR_HOST_REFUSED,
    ERROR_REDIRECT_REFUSED,
    ERROR_RESPONSE_TOO_LARGE,
)

GUARD_ERRORS = (ERROR_RESPONSE_TOO_LARGE, ERROR_DEADLINE_EXCEEDED, ERROR_HOST_REFUSED, ERROR_REDIRECT_REFUSED)
X_ROBOTS_REFUSAL = "Use of image disallowed by X-Robots-Tag directive"  # img2dataset's words: final too
_CHUNK = 1 << 16
_WATCH_TICK_S = 0.1


@dataclass(frozen=True)
class FetchPolicy:
    """What a fetch may do: schemes for redirects, byte cap, wall-clock deadline, which hosts may be private."""

    allowed_schemes: tuple[str, ...] = ("http", "https")
    max_bytes: int = 50_000_000
    deadline: float = 30.0
    allow_private_hosts: bool = False
    # (host, port) pairs that may resolve to non-public addresses; port None: any port of that host.
    allowed_hosts: frozenset[tuple[str, int | None]] = field(default_factory=frozenset)

    @staticmethod
    def parse_hosts(entries: list[str]) -> frozenset[tuple[str, int | None]]:
        """`name`, `name:port`, `[v6]:port` or a URL → (host, port); the host lower-cased."""
        out = set()
        for entry in entries:
            parts = urlsplit(entry if "//" in entry else "//" + entry)
            if not parts.hostname:
                raise ValueError(f"not a host: {entry!r}")
            out.add((parts.hostname.lower(), parts.port))
        return frozenset(out)

    def host_allowed(self, host: str, port: int) -> bool:
        host = host.lower().strip("[]")
        return self.allow_private_hosts or (host, port) in self.allowed_hosts or (host, None) in self.allowed_hosts


class Refused(Exception):
    """A guard's refusal: final, never retried; its text is the row's error_message.

    Not an OSError, so urllib passes it up as it is instead of wrapping it in a URLError."""


# ---- IRIs -------------------------------------------------------------------------------------------

_NEEDS_QUOTING = re.compile(r"[^\x21-\x7e]|[\"<>\\^`{|}]")
_PATH_SAFE = "/%:@!$&'()*+,;=~"
_QUERY_SAFE = _PATH_SAFE + "?"


def iri_to_uri(url: str) -> str:
    """Percent-encode what a request line cannot carry (spaces, non-ASCII, quotes); IDNA-encode the host.

    Existing %XX escapes are kept, so an already valid URI comes back unchanged; the fragment is dropped
    (it is never sent)."""
    if not _NEEDS_QUOTING.search(url):
        return url
    parts = urlsplit(url.strip())
    netloc = parts.netloc
    if parts.hostname and not parts.hostname.isascii():
        host = parts.hostname.encode("idna").decode("ascii")
        userinfo = netloc.rpartition("@")[0]
        port = f":{parts.port}" if parts.port is not None else ""
        netloc = (quote(userinfo, safe=":%") + "@" if userinfo else "") + host + port
    return urlunsplit((parts.scheme, netloc, quote(parts.path, safe=_PATH_SAFE),
                       quote(parts.query, safe=_QUERY_SAFE), ""))  # fmt: skip


# ---- the host policy, at connection time -------------------------------------------------------------


def non_public_kind(ip: str) -> str | None:
    """'loopback', 'private', 'link-local' or 'non-public' for an address that is not on the internet."""
    a = ipaddress.ip_address(ip.split("%", 1)[0])
    if isinstance(a, ipaddress.IPv6Address) and a.ipv4_mapped is not None:
        a = a.ipv4_mapped
    for kind, flag in (("loopback", a.is_loopback), ("link-local", a.is_link_local), ("private", a.is_private)):
        if flag:
            return kind
    return None if a.is_global else "non-public"


def _guarded_create_connection(policy: FetchPolicy):
    """A `socket.create_connection` for http.client that connects only to addresses the policy allows."""

    def create_connection(address, timeout=socket._GLOBAL_DEFAULT_TIMEOUT, source_address=None):
        host, port = address
        if policy.host_allowed(host, port):
            sock = socket.create_connection(address, timeout, source_address)
        else:
            infos = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
            public = [info[4][0] for info in infos if non_public_kind(info[4][0]) is None]
            if not public:
                ip = infos[0][4][0]
                raise Refused(f"{ERROR_HOST_REFUSED}: {host}:{port} is a {non_public_kind(ip)} address ({ip}); "
                              "allow it with download.allowed_hosts or download.allow_private_hosts")  # fmt: skip
            sock = _connect_first(public, port, timeout, source_address)
        _watchdog.watch(sock)
        return sock

    return create_connection


def _connect_first(ips: list[str], port: int, timeout, source_address) -> socket.socket:
    error: OSError | None = None
    for ip in ips:
        try:
            return socket.create_connection((ip, port), timeout, source_address)
        except OSError as e:
            error = e
    raise error  # type: ignore[misc]


class _HTTPConnection(http.client.HTTPConnection):
    def __init__(self, *args, policy: FetchPolicy, **kwargs):
        super().__init__(*args, **kwargs)
        self._create_connection = _guarded_create_connection(policy)


class _HTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, *args, policy: FetchPolicy, **kwargs):
        super().__init__(*args, **kwargs)
        self._create_connection = _guarded_create_connection(policy)  # before TLS: nothing sent to a refused host


class _GuardedOpen:
    """For urllib's HTTP(S) handlers: open their requests with the guarded connection classes, the rest
    of `do_open` (and what each Python version passes to it) unchanged."""

    policy: FetchPolicy

    def do_open(self, http_class, req, **kwargs):
        guarded = _HTTPSConnection if issubclass(http_class, http.client.HTTPSConnection) else _HTTPConnection
        return super().do_open(functools.partial(guarded, policy=self.policy), req, **kwargs)  # type: ignore[misc]


class _HTTPHandler(_GuardedOpen, urllib.request.HTTPHandler):
    def __init__(self, policy: FetchPolicy):
        super().__init__()
        self.policy = policy


class _HTTPSHandler(_GuardedOpen, urllib.request.HTTPSHandler):
    def __init__(self, policy: FetchPolicy):
        super().__init__()
        self.policy = policy


class _RedirectHandler(urllib.request.HTTPRedirectHandler):
    """urllib follows redirects to http, https and ftp: only allowed_schemes here (never file://)."""

    def __init__(self, policy: FetchPolicy):
        super().__init__()
        self.policy = policy

    def http_error_302(self, req, fp, code, msg, headers):
        location = headers.get("location") or headers.get("uri")
        if location:  # checked before urllib's own scheme rule, which lets ftp:// through
            newurl = urljoin(req.full_url, location.strip())
            scheme = urlsplit(newurl).scheme.lower()
            if scheme not in self.policy.allowed_schemes or scheme == "file":
                fp.close()
                raise Refused(f"{ERROR_REDIRECT_REFUSED}: HTTP {code} to {newurl[:200]} "
                              f"(scheme {scheme!r} not in download.allowed_schemes)")  # fmt: skip
        return super().http_error_302(req, fp, code, msg, headers)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return super().redirect_request(req, fp, code, msg, headers, iri_to_uri(newurl))


@functools.lru_cache(maxsize=8)
def _opener(policy: FetchPolicy) -> urllib.request.OpenerDirector:
    # urllib's default handlers (proxies, ftp, file, errors), ours for http(s) and redirects.
    return urllib.request.build_opener(_HTTPHandler(policy), _HTTPSHandler(policy), _RedirectHandler(policy))


# ---- the deadline ------------------------------------------------------------------------------------


class _Watchdog:
    """Shuts down the sockets of fetches past their deadline, so a blocked read returns at once.

    One daemon thread per process, started on first use (and again in a forked child, which inherits
    the bookkeeping but not the thread)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._socks: dict[int, tuple[float, socket.socket]] = {}
        self._pid: int | None = None

    def watch(self, sock: socket.socket) -> None:
        deadline = getattr(_current, "deadline", None)
        if deadline is None:
            return
        with self._lock:
            if self._pid != os.getpid():
                self._pid = os.getpid()
                self._socks = {}
                threading.Thread(target=self._run, name="plantmix-fetch-deadline", daemon=True).start()
            self._socks[id(sock)] = (deadline, sock)
        _current.socks.append(sock)

    def forget(self, socks: list[socket.socket]) -> None:
        with self._lock:
            for s in socks:
                self._socks.pop(id(s), None)

    def _run(self) -> None:
        while True:
            time.sleep(_WATCH_TICK_S)
            now = time.monotonic()
            with self._lock:
                late = [k for k, (deadline, _) in self._socks.items() if deadline <= now]
                socks = [self._socks.pop(k)[1] for k in late]
            for s in socks:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass  # already closed


_watchdog = _Watchdog()
_current = threading.local()  # this thread's fetch: deadline, policy, sockets opened for it
_active: dict = {}  # the policy of this process's downloads, and img2dataset's downloader module


def _deadline_message(policy: FetchPolicy) -> str:
    return f"{ERROR_DEADLINE_EXCEEDED}: not finished after {policy.deadline:g} s (download.deadline)"


class _CappedResponse:
    """A response without Content-Length as img2dataset reads it: its headers, and a `read()` that
    stops at the cap and the deadline."""

    def __init__(self, response, policy: FetchPolicy, deadline: float):
        self._r, self._policy, self._deadline = response, policy, deadline
        self.headers = response.headers

    def __enter__(self) -> "_CappedResponse":
        return self

    def __exit__(self, *exc) -> None:
        self._r.close()

    def read(self) -> bytes:
        buf = io.BytesIO()
        read1 = getattr(self._r, "read1", self._r.read)
        while chunk := read1(_CHUNK):
            buf.write(chunk)
            if buf.tell() > self._policy.max_bytes:
                raise Refused(f"{ERROR_RESPONSE_TOO_LARGE}: body over {self._policy.max_bytes} bytes (download.max_bytes)")
            if time.monotonic() > self._deadline:
                raise Refused(_deadline_message(self._policy))
        if time.monotonic() > self._deadline:  # the watchdog ended the stream: not a whole body
            raise Refused(_deadline_message(self._policy))
        missing = getattr(self._r, "length", None)
        if missing:  # read1 reports a body cut short as its end; urllib's read() raises, as here
            raise http.client.IncompleteRead(buf.getvalue(), missing)
        return buf.getvalue()


def guarded_urlopen(request: urllib.request.Request, timeout: float) -> http.client.HTTPResponse | urllib.response.addinfourl | _CappedResponse:
    """`urllib.request.urlopen` as img2dataset's downloader sees it: the URL encoded, every hop guarded."""
    policy = _active["policy"]
    deadline = getattr(_current, "deadline", None) or time.monotonic() + policy.deadline
    uri = iri_to_uri(request.full_url)
    if uri != request.full_url:
        request.full_url = uri
    response = _opener(policy).open(request, timeout=max(0.01, min(timeout, deadline - time.monotonic())))
    length = response.headers.get("Content-Length", "").strip()
    if not length.isdigit():
        return _CappedResponse(response, policy, deadline)
    if int(length) > policy.max_bytes:
        response.close()
        raise Refused(f"{ERROR_RESPONSE_TOO_LARGE}: Content-Length {int(length)} over {policy.max_bytes} bytes "
                      "(download.max_bytes)")  # fmt: skip
    # Under the cap: urllib reads exactly that many bytes in one call; should the server drip them, the
    # watchdog shuts the socket at the deadline and download_with_guards names it.
    return response


def download_with_guards(row, timeout, retries, user_agent_token, disallowed_header_directives):
    """img2dataset's `download_image_with_retry` with one deadline over all tries; refusals are final."""
    downloader, policy = _active["downloader"], _active["policy"]
    _current.deadline, _current.socks = time.monotonic() + policy.deadline, []
    try:
        for _ in range(retries + 1):
            key, stream, err = downloader.download_image(row, timeout, user_agent_token, disallowed_header_directives)
            if stream is not None:
                return key, stream, err
            if err.startswith(GUARD_ERRORS) or err == X_ROBOTS_REFUSAL or time.monotonic() >= _current.deadline:
                break
        if time.monotonic() >= _current.deadline and not err.startswith(GUARD_ERRORS):
            err = _deadline_message(policy)  # the watchdog cut it: whatever the read then said
        return key, None, err
    finally:
        _watchdog.forget(_current.socks)
        _current.deadline, _current.socks = None, []


def activate(policy: FetchPolicy) -> None:
    """Route img2dataset's downloader (in this process) through the guards, with `policy`."""
    from img2dataset import downloader

    _active.update(policy=policy, downloader=downloader)
    downloader.urllib = SimpleNamespace(request=SimpleNamespace(Request=urllib.request.Request, urlopen=guarded_urlopen))
    downloader.download_image_with_retry = download_with_guards
