"""The viewer's HTTP server (the standard library's threading server): pages, Deep Zoom tiles and the files of the predictions.

A request is answered only when its path matches one of the routes below exactly, and a
route only ever reads what ``gigaseg.view.predictions`` resolved at start-up or the static
files shipped with the package; anything else (``..``, encoded or not, absolute paths,
unknown names) is a 404. Every response forbids the page to load anything from elsewhere
(Content-Security-Policy).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
import socket
import threading
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from gigaseg.errors import GigasegError
from gigaseg.view.pages import cohort_page, slide_info, slide_page
from gigaseg.view.predictions import Prediction
from gigaseg.view.tiles import CACHE_BYTES, NoSuchTile, TileService

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
#: OpenSeadragon 6.1.1 adds one <style> of its own (no focus outline on touch screens); it is allowed by its hash.
_OPENSEADRAGON_STYLE = "'sha256-9xTiqzfwFaL2SGb1rmr8gysEwVVjIvqWAgmZgqFqpEE='"
#: Nothing from elsewhere: scripts, styles, images and requests from this server only.
CONTENT_SECURITY_POLICY = (f"default-src 'none'; script-src 'self'; style-src 'self' {_OPENSEADRAGON_STYLE}; "
                           "img-src 'self' data: blob:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
                           "frame-ancestors 'none'")
TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
         ".png": "image/png", ".jpeg": "image/jpeg", ".json": "application/json", ".geojson": "application/geo+json",
         ".dzi": "application/xml", ".txt": "text/plain; charset=utf-8", ".svg": "image/svg+xml"}
LOOPBACK_NAMES = ("localhost",)

_ROUTES = [
    (re.compile(r"/"), "cohort"),
    (re.compile(r"/slide/(\d{1,9})"), "slide"),
    (re.compile(r"/api/slide/(\d{1,9})\.json"), "info"),
    (re.compile(r"/thumb/(\d{1,9})\.jpeg"), "thumbnail"),
    (re.compile(r"/dz/(\d{1,9})/(slide|mask|mask_binary|reference)\.dzi"), "dzi"),
    (re.compile(r"/dz/(\d{1,9})/(slide|mask|mask_binary|reference)_files/(\d{1,3})/(\d{1,9})_(\d{1,9})\.(jpeg|png)"), "tile"),
    (re.compile(r"/files/(\d{1,9})/(overlay\.png|outlines\.geojson|summary\.json|evaluation\.json|reference\.geojson)"),
     "file"),
    (re.compile(r"/static/([A-Za-z0-9_./-]{1,200})"), "static"),
]


@dataclass(frozen=True)
class Response:
    status: int
    content_type: str
    body: bytes
    #: Seconds a browser may keep it without asking again.
    max_age: int = 0


def _not_found() -> Response:
    return Response(HTTPStatus.NOT_FOUND, TYPES[".txt"], b"not found\n")


def static_files(folder: Path = STATIC) -> dict[str, Path]:
    """The shipped static files by their path under ``/static/``: listed once, so a request can only name one of them."""
    found = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not path.is_symlink() and path.suffix in TYPES:
            found[path.relative_to(folder).as_posix()] = path
    return found


class Viewer:
    """Answers a request path from the predictions and their tiles; knows nothing of HTTP connections."""

    def __init__(self, predictions: list[Prediction], source: str, *, cache_bytes: int = CACHE_BYTES) -> None:
        self.predictions = {p.id: p for p in predictions}
        self.source = source
        self.tiles = TileService(predictions, cache_bytes=cache_bytes)
        self.static = static_files()
        self.cohort_html = cohort_page(predictions, source).encode()

    def close(self) -> None:
        self.tiles.close()

    def answer(self, target: str) -> Response:
        """The response to a request target (path and query; the query is ignored)."""
        path = unquote(urlsplit(target).path, errors="strict") if target.startswith("/") else ""
        for pattern, name in _ROUTES:
            match = pattern.fullmatch(path)
            if match:
                try:
                    return getattr(self, f"_{name}")(*match.groups())
                except (NoSuchTile, KeyError):
                    return _not_found()
        return _not_found()

    def _prediction(self, prediction_id: str) -> Prediction:
        prediction = self.predictions.get(int(prediction_id))
        if prediction is None:
            raise NoSuchTile(f"no prediction {prediction_id}")
        return prediction

    def _cohort(self) -> Response:
        return Response(HTTPStatus.OK, TYPES[".html"], self.cohort_html)

    def _slide(self, prediction_id: str) -> Response:
        return Response(HTTPStatus.OK, TYPES[".html"], slide_page(self._prediction(prediction_id)).encode())

    def _info(self, prediction_id: str) -> Response:
        prediction = self._prediction(prediction_id)
        layers = {name: layer.describe(prediction.id) for name, layer in self.tiles.layers(prediction.id).items()}
        return Response(HTTPStatus.OK, TYPES[".json"], json.dumps(slide_info(prediction, layers)).encode())

    def _thumbnail(self, prediction_id: str) -> Response:
        return Response(HTTPStatus.OK, TYPES[".jpeg"], self.tiles.thumbnail(self._prediction(prediction_id).id), 3600)

    def _dzi(self, prediction_id: str, layer: str) -> Response:
        return Response(HTTPStatus.OK, TYPES[".dzi"], self.tiles.dzi(self._prediction(prediction_id).id, layer).encode())

    def _tile(self, prediction_id: str, layer: str, level: str, col: str, row: str, extension: str) -> Response:
        data, image_format = self.tiles.tile(self._prediction(prediction_id).id, layer, int(level), int(col), int(row))
        if image_format != extension:
            return _not_found()
        return Response(HTTPStatus.OK, TYPES[f".{image_format}"], data, 3600)

    def _file(self, prediction_id: str, name: str) -> Response:
        prediction = self._prediction(prediction_id)
        if name == "reference.geojson":
            reference = prediction.reference
            if reference is None or reference.kind != "geojson":
                return _not_found()
            path = reference.path
        else:
            path = prediction.files[name]
        return Response(HTTPStatus.OK, TYPES[Path(name).suffix], path.read_bytes())

    def _static(self, name: str) -> Response:
        path = self.static[name]
        return Response(HTTPStatus.OK, TYPES[path.suffix], path.read_bytes(), 3600)


class _Handler(BaseHTTPRequestHandler):
    server: "_Server"
    server_version = "gigaseg-view"
    sys_version = ""
    # Keep-alive: a browser fetches a view's tiles over a few connections instead of one (and one
    # thread) per tile; peak memory grew with the threads' allocator arenas (benchmarks/README.md).
    protocol_version = "HTTP/1.1"
    #: Seconds an idle kept-alive connection (and its thread) waits for the next request.
    timeout = 60
    # Headers and body go out in two writes: with Nagle's algorithm the body waited for the
    # client's delayed acknowledgement of the headers, 40 ms a tile on a kept-alive connection.
    disable_nagle_algorithm = True

    def _respond(self, head_only: bool) -> None:
        try:
            response = self.server.viewer.answer(self.path)
        except UnicodeDecodeError:
            response = _not_found()
        except GigasegError as exc:  # a corrupt tile, an unreadable slide: said, and the server goes on
            log.warning("%s: %s", self.path, exc)
            response = Response(HTTPStatus.INTERNAL_SERVER_ERROR, TYPES[".txt"], f"{exc}\n".encode())
        except Exception:  # noqa: BLE001 - a bug must not take the connection (and the browser's other tiles) with it
            log.exception("%s failed", self.path)
            response = Response(HTTPStatus.INTERNAL_SERVER_ERROR, TYPES[".txt"], b"internal error\n")
        self.send_response(response.status)
        self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(len(response.body)))
        self.send_header("Content-Security-Policy", CONTENT_SECURITY_POLICY)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("Cache-Control", f"private, max-age={response.max_age}" if response.max_age else "no-cache")
        self.end_headers()
        if not head_only:
            try:
                self.wfile.write(response.body)
            except ConnectionError:  # the browser moved on (a tile no longer in view, a closed tab)
                self.close_connection = True

    def do_GET(self) -> None:  # noqa: N802 - the standard library's name
        self._respond(head_only=False)

    def do_HEAD(self) -> None:  # noqa: N802
        self._respond(head_only=True)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the standard library's name
        log.debug("%s %s", self.address_string(), format % args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # Many tiles are asked for at once; the default backlog of 5 drops connections under a burst.
    request_queue_size = 64

    def __init__(self, address: tuple[str, int], viewer: Viewer, family: int) -> None:
        self.address_family = family
        super().__init__(address, _Handler)
        self.viewer = viewer

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A connection the browser dropped is routine; anything else goes to the log, not to stderr."""
        import sys

        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        log.warning("request from %s failed", client_address[0], exc_info=True)


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine only (127.0.0.0/8, ::1, localhost)."""
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class ViewerServer:
    """A running viewer: ``url`` to open, ``close()`` to stop it. Serves from a background thread."""

    def __init__(self, viewer: Viewer, host: str = "127.0.0.1", port: int = 0) -> None:
        host = host.strip("[]")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        if not is_loopback(host):
            log.warning("serving on %s, not only on this machine: anyone who can reach it on the network can see "
                        "these slides (host=127.0.0.1 keeps them local)", host)
        self.viewer = viewer
        self._server = _Server((host, port), viewer, family)
        self.host, self.port = host, int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, name="gigaseg-view", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def wait(self) -> None:
        """Block until the server stops (Ctrl-C in the command)."""
        self._thread.join()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
        self.viewer.close()

    def __enter__(self) -> "ViewerServer":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
