"""Slow and silent clients cannot hold the server's connections (``server.connections``): a server in its
own process, 50 connections from one address (127.0.0.2) that send nothing, part of their headers, or
headers and no body, while a normal client (127.0.0.1) chats."""

from __future__ import annotations

import socket
import time

import httpx
from tests.integration.server.conftest import ADMIN, start_subprocess_server, stop_subprocess_server

SILENT = "127.0.0.2"  # all of 127.0.0.0/8 is this machine


def _open(port: int, kind: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(SILENT, 0))
    if kind == 1:  # part of the headers, then nothing
        s.sendall(b"POST /v1/feedback HTTP/1.1\r\nHost: x\r\nContent-Ty")
    elif kind == 2:  # the headers, a body promised, never sent
        s.sendall(b"POST /v1/feedback HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100\r\n\r\n")
    return s


def _closed_by_server(s: socket.socket) -> tuple[bool, bytes]:
    """(closed, what the server sent first) within the socket's timeout."""
    got = b""
    try:
        while True:
            chunk = s.recv(4096)
            if not chunk:
                return True, got
            got += chunk
    except TimeoutError:
        return False, got
    except ConnectionResetError:
        return True, got


def test_fifty_silent_connections_from_one_address_do_not_stop_a_chat(model_dir, tmp_path):
    proc, url = start_subprocess_server(model_dir, f"sqlite:///{tmp_path / 'c.db'}", tmp_path / "c.log",
                                        "--header-timeout", "2", "--body-timeout", "2",
                                        "--max-connections-per-client", "16")
    port = int(url.rsplit(":", 1)[1])
    socks: list[socket.socket] = []
    try:
        key = httpx.post(f"{url}/v1/keys", json={"name": "c"}, headers={"Authorization": f"Bearer {ADMIN}"}).json()["key"]
        opened = time.time()
        for i in range(50):
            socks.append(_open(port, i % 3))
        body = {"model": "tiny", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
        t0 = time.perf_counter()
        r = httpx.post(f"{url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=30)
        assert r.status_code == 200, r.text
        assert time.perf_counter() - t0 < 10  # served beside them, not after them
        refused = []
        for i, s in enumerate(socks[16:], start=16):  # beyond the cap: answered 503 and closed at once
            s.settimeout(2)
            closed, got = _closed_by_server(s)
            # a socket that had sent data may see a reset instead of the answer; one that sent nothing reads it
            refused.append(closed and (i % 3 != 0 or got.startswith(b"HTTP/1.1 503") and b"retry-after" in got.lower()))
        assert all(refused), refused
        results = []
        for s in socks[:16]:  # within the cap: closed by the deadlines (2 s), the body's with a 408
            s.settimeout(max(0.5, opened + 6 - time.time()))
            results.append(_closed_by_server(s))
        assert all(closed for closed, _ in results), [c for c, _ in results]
        with_body = [got for (_, got), i in zip(results, range(16)) if i % 3 == 2]
        assert with_body and all(g.startswith(b"HTTP/1.1 408") for g in with_body), with_body
        # the address may connect again once its connections are gone
        r = httpx.get(f"{url}/health", timeout=5)
        assert r.status_code == 200
        time.sleep(0.2)
        again = _open(port, 0)
        again.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        again.settimeout(5)
        assert _closed_by_server(again)[1].startswith(b"HTTP/1.1 200")
        again.close()
    finally:
        for s in socks:
            s.close()
        stop_subprocess_server(proc)
