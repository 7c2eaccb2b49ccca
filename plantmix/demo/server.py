"""A loopback HTTP server for a generated demo world: serves routes.json, faults included.

`serve_world(world_dir)` is a context manager yielding the live base URL (http://127.0.0.1:PORT on an
ephemeral port). Each route gives a status, content type, extra headers, a body (inline or a file under
the world directory) and a delay; unknown paths are 404. Hostile routes for the download guards'
tests: `body_size` streams that many zero bytes without holding them (`no_length`: without a
Content-Length, so only the stream shows the size), `drip` sends the body one byte per that many
seconds. A delayed (timeout) handler waits on the server's stop event, so leaving the context returns
at once even while such a request is pending.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

from plantmix.demo.world import DEMO_BASE_URL
from plantmix.core.errors import PlantmixError


def live_url(url: str, base_url: str) -> str:
    """Rewrite a canonical demo URL (DEMO_BASE_URL/...) onto a live server's base; others unchanged."""
    if url.startswith(DEMO_BASE_URL + "/"):
        return base_url.rstrip("/") + url[len(DEMO_BASE_URL):]
    return url


def load_routes(world_dir: Path) -> dict[str, dict]:
    path = Path(world_dir) / "routes.json"
    try:
        routes = json.loads(path.read_text())["routes"]
    except FileNotFoundError:
        raise PlantmixError(f"{path}: not found; generate the demo world first") from None
    except (ValueError, KeyError, TypeError) as e:
        raise PlantmixError(f"{path}: not a routes file ({e})") from None
    return routes


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # never wait for a handler that is still sleeping
    request_queue_size = 128  # socketserver's 5 drops the SYNs of a 32-thread downloader: 1 s retransmits

    def __init__(self, world_dir: Path, routes: dict[str, dict]):
        self.world_dir = Path(world_dir)
        self.routes = routes
        self.stopping = threading.Event()
        self._bodies: dict[str, bytes] = {}
        self._lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _Handler)

    def body(self, route: dict) -> bytes:
        if "body" in route:
            return route["body"].encode("utf-8")
        name = route["body_file"]
        with self._lock:
            if name not in self._bodies:
                self._bodies[name] = (self.world_dir / name).read_bytes()
            return self._bodies[name]

    def handle_error(self, request, client_address) -> None:
        pass  # clients that give up (timeouts) reset connections: expected, not worth a traceback


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "plantmix-demo/1"
    sys_version = ""

    def do_GET(self) -> None:
        self._respond(send_body=True)

    def do_HEAD(self) -> None:
        self._respond(send_body=False)

    def _respond(self, send_body: bool) -> None:
        route = self.server.routes.get(urlsplit(self.path).path)
        if route is None:
            status, ctype, headers, body = 404, "text/plain; charset=utf-8", {}, b"not found\n"
        else:
            # A timeout fault: stall, but give up at once when the server stops.
            if route.get("delay") and self.server.stopping.wait(float(route["delay"])):
                self.close_connection = True
                return
            status, ctype, headers = route["status"], route["content_type"], route.get("headers", {})
            body = None if "body_size" in route else self.server.body(route)
        options = route or {}
        length = int(options["body_size"]) if body is None else len(body)
        try:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            if not options.get("no_length"):
                self.send_header("Content-Length", str(length))
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            if not send_body:
                return
            if body is None:
                self._write_zeros(length)
            elif options.get("drip"):
                self._drip(body, float(options["drip"]))
            else:
                self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _write_zeros(self, length: int) -> None:
        block = bytes(1 << 20)
        while length > 0 and not self.server.stopping.is_set():
            self.wfile.write(block[: min(length, len(block))])
            length -= len(block)

    def _drip(self, body: bytes, every_s: float) -> None:
        for i in range(len(body)):
            self.wfile.write(body[i : i + 1])
            self.wfile.flush()
            if self.server.stopping.wait(every_s):
                return

    def log_message(self, format: str, *args) -> None:  # noqa: A002
        pass


@contextlib.contextmanager
def serve_world(world_dir: Path) -> Iterator[str]:
    """Serve a generated world on 127.0.0.1 (ephemeral port); yields the base URL, stops on exit."""
    server = _Server(Path(world_dir), load_routes(world_dir))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              name="plantmix-demo-server", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.stopping.set()
        server.shutdown()
        server.server_close()
        thread.join()
