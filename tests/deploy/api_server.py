"""A scripted HTTP server on 127.0.0.1 that responds like the Kubernetes API server.

It is not a Kubernetes API: each test scripts the status and JSON body for the exact
requests it expects, and the server records every request it receives. The tests use it
to check what the real ``kubernetes`` client sends and how surgery submit handles the
responses (Status objects for errors, the created object for 201).
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit


@dataclass
class RecordedRequest:
    method: str
    path: str
    query: dict[str, list[str]]
    # Lowercase names: HTTP header names are case-insensitive.
    headers: dict[str, str]
    body: Any


@dataclass
class ScriptedApiServer:
    """Respond to (method, path) with its scripted (status, body); the body "echo" returns the request body."""

    routes: dict[tuple[str, str], tuple[int, Any]] = field(default_factory=dict)
    requests: list[RecordedRequest] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="scripted-api-server", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> "ScriptedApiServer":
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=10)

    def _handler_class(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format, *args):  # keep pytest output clean
                pass

            def _answer(self) -> None:
                url = urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                body = json.loads(raw) if raw else None
                server.requests.append(RecordedRequest(self.command, url.path, parse_qs(url.query), {k.lower(): v for k, v in self.headers.items()}, body))
                status, answer = server.routes.get((self.command, url.path), (404, status_body(404, "NotFound", f"no route {url.path}")))
                payload = json.dumps(body if answer == "echo" else answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _answer

        return Handler


def status_body(code: int, reason: str, message: str) -> dict[str, Any]:
    """A Kubernetes ``Status`` object, as the API server returns for failed requests."""
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


def config_map_body(name: str, namespace: str, data: dict[str, str]) -> dict[str, Any]:
    return {"kind": "ConfigMap", "apiVersion": "v1", "metadata": {"name": name, "namespace": namespace}, "data": data}


def write_kubeconfig(path, server_url: str, namespace: str = "surgery") -> None:
    """Write a kubeconfig with one context, "local", that sends a bearer token to ``server_url``."""
    path.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "local", "cluster": {"server": server_url}}],
                "users": [{"name": "tester", "user": {"token": "test-token"}}],
                "contexts": [{"name": "local", "context": {"cluster": "local", "user": "tester", "namespace": namespace}}],
                "current-context": "local",
            }
        )
    )
