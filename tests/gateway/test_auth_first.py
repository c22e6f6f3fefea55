"""Work before authentication and limits (issue 9, item 4), from the attacker's side.

An unauthenticated client must get its 401 before the gateway reads (let alone parses or
spools) its body, and the files, batches and usage routes count against the tenant's RPM.
"""

from __future__ import annotations

import socket
import time
import uuid
from urllib.parse import urlparse

import httpx
import pytest

from tests.conftest import Cluster

BIG = 12 * 1024 * 1024  # what the review sent: 12 MiB bodies
ANSWER_WITHIN_S = 5.0


def _send_headers_and_stall(cluster: Cluster, path: str, headers: dict[str, str]) -> bytes:
    """Send the headers and the first 64 KiB of a body declared far larger, never the rest;
    return what the server answers meanwhile (b"" if it waits for the body)."""
    url = urlparse(cluster.url)
    with socket.create_connection((url.hostname, url.port), timeout=ANSWER_WITHIN_S) as sock:
        head = f"POST {path} HTTP/1.1\r\nHost: {url.hostname}:{url.port}\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
        sock.sendall(head.encode() + b"{" + b" " * (64 * 1024))
        return _read_response(sock)


def _read_response(sock: socket.socket) -> bytes:
    """The status line, headers and Content-Length body, or what came before the deadline."""
    deadline = time.monotonic() + ANSWER_WITHIN_S
    answer = b""
    while time.monotonic() < deadline:
        head, sep, body = answer.partition(b"\r\n\r\n")
        if sep:
            length = next(
                (
                    int(line.split(b":", 1)[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                ),
                0,
            )
            if len(body) >= length:
                return answer
        sock.settimeout(max(deadline - time.monotonic(), 0.01))
        try:
            data = sock.recv(65536)
        except TimeoutError:
            break
        if not data:
            break
        answer += data
    return answer


@pytest.mark.parametrize(
    ("path", "auth", "content_type"),
    [
        ("/v1/chat/completions", None, "application/json"),
        ("/v1/chat/completions", "Bearer psk-deadbeef-not-a-real-key", "application/json"),
        ("/v1/completions", None, "application/json"),
        ("/v1/files", None, "multipart/form-data; boundary=xyz"),
        ("/v1/batches", "Bearer psk-deadbeef-not-a-real-key", "application/json"),
    ],
)
def test_unauthenticated_body_is_refused_before_it_is_read(
    cluster: Cluster, path: str, auth: str | None, content_type: str
) -> None:
    limit = BIG if path != "/v1/batches" else 200 * 1024  # under each route's body limit
    headers = {"Content-Type": content_type, "Content-Length": str(limit)}
    if auth:
        headers["Authorization"] = auth
    answer = _send_headers_and_stall(cluster, path, headers)
    assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
    assert b'"authentication_error"' in answer


def test_chunked_unauthenticated_body_is_refused_before_it_is_read(cluster: Cluster) -> None:
    headers = {"Content-Type": "application/json", "Transfer-Encoding": "chunked"}
    url = urlparse(cluster.url)
    with socket.create_connection((url.hostname, url.port), timeout=ANSWER_WITHIN_S) as sock:
        head = f"POST /v1/chat/completions HTTP/1.1\r\nHost: {url.hostname}\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
        chunk = b"{" + b" " * 4095
        sock.sendall(head.encode() + f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
        answer = _read_response(sock)  # nothing (test fails) if the server waits for the body
    assert answer.startswith(b"HTTP/1.1 401"), answer[:200]


def test_small_json_routes_have_a_small_body_limit(cluster: Cluster, http: httpx.Client) -> None:
    # A batch request is a few hundred bytes; 2 MiB of it is refused by its size alone.
    body = {
        "input_file_id": "file-x",
        "endpoint": "/v1/chat/completions",
        "completion_window": "24h",
        "metadata": {"k": "v" * (2 * 1024 * 1024)},
    }
    resp = http.post("/v1/batches", json=body)
    assert resp.status_code == 413, resp.text
    assert resp.json()["error"]["code"] == "request_too_large"


def test_files_batches_and_usage_routes_count_against_rpm(cluster: Cluster, admin: httpx.Client) -> None:
    tenant_id = f"t-{uuid.uuid4().hex[:10]}"
    assert admin.post("/admin/tenants", json={"id": tenant_id, "limits": {"rpm": 3}}).status_code == 201
    key = admin.post(f"/admin/tenants/{tenant_id}/keys", json={"name": "t"}).json()["key"]
    with httpx.Client(base_url=cluster.url, timeout=60, headers={"Authorization": f"Bearer {key}"}) as client:
        assert client.get("/v1/files").status_code == 200
        assert client.get("/v1/batches").status_code == 200
        assert client.get("/v1/usage").status_code == 200
        batch = {"input_file_id": "file-none", "endpoint": "/v1/chat/completions", "completion_window": "24h"}
        refused = [
            client.get("/v1/files"),
            client.get("/v1/batches"),
            client.get("/v1/usage"),
            client.post("/v1/batches", json=batch),
        ]
    for resp in refused:
        assert resp.status_code == 429, resp.text
        assert resp.json()["error"]["code"] == "rate_limit_exceeded"
        assert int(resp.headers["Retry-After"]) >= 1
