"""`loralab explore`: a small HTTP server for the low-rank explorer page (standard library only).

    GET /                      the page (static/index.html; its script and style under /static/)
    GET /api/matrices          {"matrices": [{"id", "label", "description", "kind", "shape": [m, n], "rank": K}]}
    GET /api/matrix/<id>       one matrix's thin SVD M = U·diag(S)·Vt, computed once in NumPy and cached:
                               {"id", "shape": [m, n], "rank": K, "frobenius": ‖M‖_F,
                                "U":  {"dtype": "<f4", "shape": [m, K], "data": base64 of little-endian bytes},
                                "S":  {"dtype": "<f8", "shape": [K], ...},  "Vt": {"dtype": "<f4", "shape": [K, n], ...},
                                "adapter": {"path", "r", "lora_alpha", "scaling"} for an adapter's layer}

The page truncates the SVD itself (M_k = U_k·diag(S_k)·Vt_k, see spectrum.py), so moving the rank slider needs no
request.  Ids are "synthetic", "synthetic-noisy", "random" and "adapter:<module path>" for each adapted module of
the one adapter directory given at start; a request never names a file.  Static files are served from a fixed
list of names, so no path in a request reaches the file system.  The server has no authentication: it binds the
loopback interface unless allow_remote is set, and answers only requests addressed to it by a loopback name
(a Host header check, so a web page on another site cannot read the adapter through DNS rebinding).
"""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import socket
import sys
import threading
import webbrowser
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

import numpy as np

from .adapter import AdapterDir
from .spectrum import BUILTIN, Spectrum, builtin_matrix, dense_svd, factored_svd

__all__ = ["Catalogue", "ExploreServer", "make_server", "serve", "is_loopback", "matrix_path", "DEFAULT_PORT"]

DEFAULT_PORT = 8765
STATIC_DIR = Path(__file__).resolve().parent / "static"
STATIC_FILES = {"index.html": "text/html; charset=utf-8", "explore.js": "text/javascript; charset=utf-8",
                "explore.css": "text/css; charset=utf-8"}
ADAPTER_PREFIX = "adapter:"
# Everything the page uses comes from this server: no script, style, font or image from anywhere else.
SECURITY_HEADERS = {"Content-Security-Policy": "default-src 'self'; img-src 'self' data:; base-uri 'none'; "
                                               "form-action 'none'; frame-ancestors 'none'",
                    "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "Cache-Control": "no-store"}


# ---- what can be shown ------------------------------------------------------------------------------------
class Catalogue:
    """The matrices on offer (the built-ins, and one adapter's layers) and their SVDs, each computed once."""

    def __init__(self, adapter_dir=None):
        self.adapter = AdapterDir(adapter_dir) if adapter_dir is not None else None
        self.entries: dict[str, dict] = {}
        for matrix_id, (label, description, (m, n), _) in BUILTIN.items():
            self.entries[matrix_id] = {"id": matrix_id, "label": label, "description": description,
                                       "kind": "builtin", "shape": [m, n], "rank": min(m, n)}
        for path, layer in (self.adapter.layers.items() if self.adapter else ()):
            m, n = layer.shape
            self.entries[ADAPTER_PREFIX + path] = {
                "id": ADAPTER_PREFIX + path, "kind": "adapter", "shape": [m, n], "rank": min(layer.r, m, n),
                "label": f"{path}  ΔW {m} × {n}, r={layer.r}",
                "description": f"ΔW = scaling·B·A of {path}: B ({m}, {layer.r}), A ({layer.r}, {n}), "
                               f"scaling = {layer.scaling:.6g} (lora_alpha={layer.lora_alpha:g}, r={layer.r}"
                               f"{', rsLoRA' if self.adapter.config.use_rslora else ''}). Its rank is at most "
                               f"r, so the SVD comes from the factors (QR of B and Aᵀ, SVD of the r × r core)."}
        self._spectra: dict[str, Spectrum] = {}
        self._lock = threading.Lock()

    def listing(self) -> list[dict]:
        return [dict(entry) for entry in self.entries.values()]

    def spectrum(self, matrix_id: str) -> Spectrum:
        """The SVD of one matrix; KeyError for an unknown id."""
        if matrix_id not in self.entries:
            raise KeyError(matrix_id)
        with self._lock:  # one computation per matrix even when the page asks twice at once
            if matrix_id not in self._spectra:
                if matrix_id.startswith(ADAPTER_PREFIX):
                    layer = self.adapter.layers[matrix_id[len(ADAPTER_PREFIX):]]
                    A, B = self.adapter.factors(layer.path)
                    self._spectra[matrix_id] = factored_svd(A, B, layer.scaling)
                else:
                    self._spectra[matrix_id] = dense_svd(builtin_matrix(matrix_id))
            return self._spectra[matrix_id]

    def payload(self, matrix_id: str) -> dict:
        spectrum = self.spectrum(matrix_id)
        m, n = spectrum.shape
        out = dict(self.entries[matrix_id], shape=[m, n], rank=len(spectrum.S),
                   frobenius=float(np.sqrt(np.sum(spectrum.S ** 2))),
                   U=_encode(spectrum.U, "<f4"), S=_encode(spectrum.S, "<f8"), Vt=_encode(spectrum.Vt, "<f4"))
        if matrix_id.startswith(ADAPTER_PREFIX):
            layer = self.adapter.layers[matrix_id[len(ADAPTER_PREFIX):]]
            out["adapter"] = {"path": layer.path, "r": layer.r, "lora_alpha": layer.lora_alpha,
                              "scaling": layer.scaling}
        return out


def _encode(array: np.ndarray, dtype: str) -> dict:
    """A row-major array as base64 of its little-endian bytes: 4 bytes a float32, about 5.3 characters in JSON."""
    data = np.ascontiguousarray(array, dtype=dtype)
    return {"dtype": dtype, "shape": list(data.shape), "data": base64.b64encode(data.tobytes()).decode("ascii")}


# ---- HTTP ---------------------------------------------------------------------------------------------------
class ExploreServer(ThreadingHTTPServer):
    """Serves one Catalogue.  `url` is where the page is (the real port when port 0 was asked for)."""
    daemon_threads = True

    def __init__(self, catalogue: Catalogue, host: str, port: int, allow_remote: bool = False):
        self.catalogue = catalogue
        self.allow_remote = allow_remote
        if ":" in host.strip("[]"):
            self.address_family = socket.AF_INET6
        try:
            super().__init__((host.strip("[]"), port), _Handler)
        except OSError as e:
            hint = " pass --port 0 to pick a free one," if port else ""
            raise RuntimeError(f"cannot listen on {host}:{port} ({e.strerror or e});{hint} or choose another "
                               f"--port / --host") from None
        self.port = self.server_address[1]
        shown = f"[{host.strip('[]')}]" if ":" in host.strip("[]") else host
        self.url = f"http://{shown}:{self.port}/"
        # Host headers this server answers to (anything when remote access was asked for).
        self.allowed_hosts = {f"{name}:{self.port}" for name in ("127.0.0.1", "localhost", "[::1]", shown)}


class _Handler(BaseHTTPRequestHandler):
    server: ExploreServer
    server_version = "loralab-explore"

    def do_GET(self) -> None:  # noqa: N802 (the http.server name)
        if not self.server.allow_remote and self.headers.get("Host", "") not in self.server.allowed_hosts:
            return self._json({"error": f"unexpected Host header {self.headers.get('Host')!r}; open "
                                        f"{self.server.url}"}, HTTPStatus.FORBIDDEN)
        path = urlsplit(self.path).path
        catalogue = self.server.catalogue
        if path in ("/", "/index.html"):
            return self._static("index.html")
        if path.startswith("/static/"):
            return self._static(unquote(path[len("/static/"):]))
        if path == "/api/matrices":
            return self._json({"matrices": catalogue.listing(),
                               "adapter": str(catalogue.adapter.directory) if catalogue.adapter else None})
        if path.startswith("/api/matrix/"):
            matrix_id = unquote(path[len("/api/matrix/"):])
            if matrix_id not in catalogue.entries:
                return self._json({"error": f"no matrix {matrix_id!r}; GET /api/matrices lists them"},
                                  HTTPStatus.NOT_FOUND)
            try:
                return self._json(catalogue.payload(matrix_id))
            except (ValueError, OSError) as e:  # a corrupt tensor, NaN in the factors, an unreadable file
                return self._json({"error": str(e)}, HTTPStatus.INTERNAL_SERVER_ERROR)
        self._json({"error": f"nothing at {path}"}, HTTPStatus.NOT_FOUND)

    def _static(self, name: str) -> None:
        if name not in STATIC_FILES:  # a fixed list: "../x", "%2e%2e/x", absolute paths never match
            return self._json({"error": "no such file"}, HTTPStatus.NOT_FOUND)
        self._send((STATIC_DIR / name).read_bytes(), STATIC_FILES[name])

    def _json(self, obj: dict, status: HTTPStatus = HTTPStatus.OK) -> None:
        self._send(json.dumps(obj).encode(), "application/json", status)

    def _send(self, body: bytes, content_type: str, status: HTTPStatus = HTTPStatus.OK) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in SECURITY_HEADERS.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args) -> None:  # quiet: one line per request would drown the URL
        pass


# ---- starting it --------------------------------------------------------------------------------------------
def is_loopback(host: str) -> bool:
    """True when every address `host` names is a loopback address (127.0.0.0/8, ::1)."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror as e:
        raise ValueError(f"host {host!r} does not resolve ({e}); use 127.0.0.1") from None
    return all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


def make_server(adapter_dir=None, host: str = "127.0.0.1", port: int = DEFAULT_PORT,
                allow_remote: bool = False) -> ExploreServer:
    """A listening (not yet serving) explorer server; call serve_forever() on it, e.g. in a thread."""
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} is out of range; use 0..65535 (0 picks a free port)")
    if not allow_remote and not is_loopback(host):
        raise ValueError(f"refusing to listen on {host!r}: it is reachable from other machines, and the explorer "
                         f"has no authentication, so anyone who can reach it could read the matrices and the "
                         f"adapter's weights. Use 127.0.0.1 (and an SSH tunnel to see it from elsewhere), or pass "
                         f"--allow-remote if this network is trusted.")
    return ExploreServer(Catalogue(adapter_dir), host, port, allow_remote)


def serve(adapter_dir=None, host: str = "127.0.0.1", port: int = DEFAULT_PORT, open_browser: bool = True,
          allow_remote: bool = False, json_out: bool = False, say=print) -> None:
    """Start the server, report its URL ({"url": ...} on stdout with json_out), serve until Ctrl-C."""
    server = make_server(adapter_dir, host, port, allow_remote)
    n_adapter = len(server.catalogue.adapter.layers) if server.catalogue.adapter else 0
    if json_out:
        print(json.dumps({"url": server.url, "adapter_layers": n_adapter,
                          "matrices": list(server.catalogue.entries)}), flush=True)
    if n_adapter:
        say(f"adapter {server.catalogue.adapter.directory}: {n_adapter} adapted modules")
    say(f"low-rank explorer at {server.url}  (Ctrl-C to stop)")
    if open_browser:
        threading.Thread(target=_open, args=(server.url, say), daemon=True).start()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        say("stopped")
    finally:
        server.server_close()


def _open(url: str, say) -> None:
    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        say("no display: open the URL above in a browser (or pass --no-browser to skip this note)")
        return  # a console browser would take over this terminal
    if not webbrowser.open(url):
        say("could not start a browser: open the URL above yourself")


def matrix_path(matrix_id: str) -> str:
    """The URL path of one matrix's endpoint, e.g. /api/matrix/adapter%3Amodel.layers.0.q_proj."""
    return "/api/matrix/" + quote(matrix_id, safe="")
