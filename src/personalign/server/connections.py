"""Connections a slow or silent client cannot hold: uvicorn's h11 protocol with read deadlines and a
per-address cap.

uvicorn bounds the idle time between requests (``timeout_keep_alive``) and nothing else: a client that
opens connections and sends part of a request's headers, or its headers with a ``Content-Length`` and
never the body, holds each connection (and, past the headers, a running request) for as long as it
likes, as many as it likes. ``guarded_protocol`` returns a protocol class that adds:

* **a header deadline**: a request's headers must be complete within ``header_timeout`` seconds of the
  connection opening, or of the request's first byte on a kept-alive connection; else the connection
  is closed;
* **a body deadline**: once the headers are in, the body must be complete within ``body_timeout``
  seconds; else the client gets a 408 (when no response has started) and the connection is closed;
* **a cap per client address**: at most ``max_per_client`` open connections from one address; a
  connection beyond it is answered 503 with ``Retry-After`` and closed at once.

Every limit is a ``personalign serve`` flag. The h11 implementation is used whatever else is installed,
so the limits hold on every machine.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from personalign.server.errors import error_body

__all__ = ["guarded_protocol"]

logger = logging.getLogger(__name__)


def _raw_response(status: int, reason: str, message: str, code: str, extra: str = "") -> bytes:
    """A whole HTTP response written straight to the transport (no ASGI app runs), the API's error body."""
    body = json.dumps(error_body(status, message, code=code)).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            f"{extra}connection: close\r\n\r\n")
    return head.encode() + body


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with deadlines for a request's headers and body and a cap on the
    connections one address holds (the limits are set by ``guarded_protocol``)."""

    header_timeout: float = 30.0
    body_timeout: float = 60.0
    max_per_client: int = 64
    open_per_client: Counter[str]  # open connections per address, one counter per server

    _deadline: Any = None  # the armed timer (header or body)
    _phase: str | None = None  # "headers" or "body": what the armed timer waits for
    _address: str | None = None

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        address = self.client[0] if self.client else "unknown"
        if self.open_per_client[address] >= self.max_per_client:
            logger.warning("refused a connection from %s: %d already open (--max-connections-per-client)",
                           address, self.open_per_client[address])
            transport.write(_raw_response(
                503, "Service Unavailable", f"too many open connections from this address (limit "
                f"{self.max_per_client}); close some and retry.", "too_many_connections", "retry-after: 1\r\n"))
            transport.close()
            return
        self._address = address
        self.open_per_client[address] += 1
        self._arm("headers", self.header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self._address is not None:
            self.open_per_client[self._address] -= 1
            if self.open_per_client[self._address] <= 0:
                del self.open_per_client[self._address]
            self._address = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._follow()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._follow()

    # ------------------------------------------------------------------ deadlines
    def _follow(self) -> None:
        """Arm the deadline the client's side of the connection is in now: headers under way (data of
        a new request came), a body under way, or none (between requests: keep-alive's timer)."""
        if self.transport is None or self.transport.is_closing():
            return
        state = self.conn.their_state
        if state is h11.SEND_BODY:
            if self._phase != "body":
                self._arm("body", self.body_timeout)
        elif state is h11.IDLE and self.conn.trailing_data[0]:
            if self._phase != "headers":
                self._arm("headers", self.header_timeout)  # part of the next request's headers is in
        elif self._phase is not None and not (state is h11.IDLE and self._phase == "headers"
                                              and self.cycle is None):
            self._disarm()

    def _arm(self, phase: str, seconds: float) -> None:
        self._disarm()
        self._phase = phase
        self._deadline = self.loop.call_later(seconds, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline = self._phase = None

    def _expired(self) -> None:
        phase, self._deadline, self._phase = self._phase, None, None
        if self.transport is None or self.transport.is_closing():
            return
        logger.info("closed a connection from %s: its request %s did not arrive within %s s", self._address,
                    phase, self.header_timeout if phase == "headers" else self.body_timeout)
        if phase == "body" and (self.cycle is None or not self.cycle.response_started):
            self.transport.write(_raw_response(
                408, "Request Timeout", f"the request body did not arrive within {self.body_timeout} s.",
                "request_timeout"))
        if self.cycle is not None:
            self.cycle.keep_alive = False
        self.transport.close()


def guarded_protocol(*, header_timeout: float, body_timeout: float, max_per_client: int) -> type[H11Protocol]:
    """A ``GuardedH11Protocol`` class with these limits and its own counter of open connections per
    address (one class per server)."""
    if header_timeout <= 0 or body_timeout <= 0 or max_per_client < 1:
        raise ValueError(f"`header_timeout` and `body_timeout` must be > 0 and `max_per_client` >= 1, got "
                         f"{header_timeout}, {body_timeout}, {max_per_client}.")
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {
        "header_timeout": header_timeout, "body_timeout": body_timeout, "max_per_client": max_per_client,
        "open_per_client": Counter()})
