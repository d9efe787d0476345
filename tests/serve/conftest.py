"""Fixtures of the serving tests: one local Ray instance (2 CPUs, no dashboard, HTTP on a free
loopback port) for the whole session, started only by the tests that need it and shut down at
the end, and a small HTTP client. Tests needing Ray skip without it (pytest.importorskip)."""

from __future__ import annotations

import http.client
import json
import random
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

import pytest

RAY_REASON = "Ray Serve is the optional serve extra: pip install -e '.[serve]'"


# Ports for our servers: above Ray's worker ports (10002-19999) and below Linux's ephemeral range
# (32768-60999). A port the OS hands out for bind(0) is ephemeral, and one of Ray's own outgoing
# connections took it between our pick and Serve's bind once in CI ("Failed to bind to address").
QUIET_PORTS = range(20000, 32768)


def free_port() -> int:
    for port in random.sample(QUIET_PORTS, 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free loopback port in {QUIET_PORTS.start}-{QUIET_PORTS.stop - 1} after 200 tries")


@dataclass
class Reply:
    status: int
    headers: dict[str, str]   # lower-case names
    body: bytes

    def json(self):
        return json.loads(self.body)


class Client:
    """Plain HTTP against one base URL (stdlib only, a fresh connection per request)."""

    def __init__(self, url: str) -> None:
        self.url = url
        parts = urlsplit(url)
        self.host, self.port = parts.hostname, parts.port

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
                timeout: float = 120.0) -> Reply:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            r = conn.getresponse()
            return Reply(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read())
        finally:
            conn.close()

    def generate(self, payload, accept: str = "application/x-npz", timeout: float = 120.0) -> Reply:
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        return self.request("POST", "/generate", body, {"Accept": accept, "Content-Type": "application/json"}, timeout)

    def health(self, timeout: float = 30.0) -> Reply:
        return self.request("GET", "/healthz", timeout=timeout)


@pytest.fixture
def client_for():
    """Client(url): an HTTP client for a server a test starts itself."""
    return Client


@pytest.fixture
def unused_port() -> int:
    return free_port()


@dataclass
class ServeEndpoint:
    client: Client        # HTTP on Serve's proxy
    metrics_url: str      # the Ray node's Prometheus endpoint


def start_serve_on_a_free_port(ray, serve, tries: int = 3) -> int:
    """serve.start on a free port; another port where the proxy could not bind the one picked
    (something took it in between). Returns the port."""
    for attempt in range(1, tries + 1):
        port = free_port()
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 120})
        except ray.exceptions.RayTaskError as e:
            if "Failed to bind" not in str(e) or attempt == tries:
                raise
            serve.shutdown()
        else:
            return port


@pytest.fixture(scope="session")
def ray_serve():
    """A local Ray Serve (ServeEndpoint) for the session; shut down after it."""
    ray = pytest.importorskip("ray", reason=RAY_REASON)
    serve = pytest.importorskip("ray.serve", reason=RAY_REASON)
    metrics_port = free_port()
    # metrics reported every second (Ray's default is 10 s), so the metrics test need not wait long
    ray.init(num_cpus=2, include_dashboard=False, _metrics_export_port=metrics_port,
             _system_config={"metrics_report_interval_ms": 1000}, log_to_driver=False)
    try:
        http_port = start_serve_on_a_free_port(ray, serve)
        yield ServeEndpoint(Client(f"http://127.0.0.1:{http_port}"), f"http://127.0.0.1:{metrics_port}/metrics")
    finally:
        serve.shutdown()
        ray.shutdown()
