"""``EventReader``: the one reader of the engine's events for a request's jobs — used by the streamed
and the plain chat answer and by feedback's reference reply.

The jobs of one request (its ``n`` choices) share one event queue. The reader returns each event in
turn, keeps what arrived (each choice's text, its ``Done``), and ends the request: after every choice
is done, after a ``Failed``, or when the client has gone away (checked every ``poll`` seconds whether
or not events arrive, so a request that keeps receiving tokens still stops decoding when its client
leaves; its jobs are then cancelled).
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import Request

from personalign.server.worker import Delta, Done, Event, Failed, Job

__all__ = ["EventReader", "usage"]


class EventReader:
    """Reads a request's events (module docstring).

    Args:
        jobs: the request's jobs, one per choice, sharing one event queue.
        request: the HTTP request, to notice a client that left; None: never checked.
        poll: seconds between checks of the client.
    """

    def __init__(self, jobs: list[Job], request: Request | None = None, poll: float = 0.5) -> None:
        self.jobs, self.request, self.poll = jobs, request, poll
        self.texts: list[list[str]] = [[] for _ in jobs]
        self.done: dict[int, Done] = {}
        self.failed: Failed | None = None
        self.gone = False  # the client went away (the jobs are cancelled)

    @property
    def over(self) -> bool:
        return self.gone or self.failed is not None or len(self.done) == len(self.jobs)

    async def next(self) -> Event | None:
        """The next event, recorded; None once the request is over (``over``: done, failed or gone)."""
        if self.over:
            return None
        event = await self._wait()
        if event is None:
            self.gone = True
            self.cancel()
        elif isinstance(event, Delta):
            self.texts[event.index].append(event.text)
        elif isinstance(event, Failed):
            self.failed = event
        else:
            self.done[event.index] = event
        return event

    async def _wait(self) -> Event | None:
        lead = self.jobs[0]
        if self.request is None:
            return await lead.events.get()
        loop = asyncio.get_running_loop()
        while True:
            now = loop.time()
            if now - lead.checked_at >= self.poll:
                lead.checked_at = now
                if await self.request.is_disconnected():
                    return None
            try:
                return await asyncio.wait_for(lead.events.get(), timeout=max(0.01, lead.checked_at + self.poll - now))
            except asyncio.TimeoutError:
                continue

    def cancel(self) -> None:
        """Stop decoding the request's jobs."""
        for job in self.jobs:
            job.cancelled = True

    def text(self, index: int) -> str:
        return "".join(self.texts[index])

    def choices(self, methods: list[str]) -> list[dict[str, Any]]:
        """The finished choices as stored with the completion: index, text, method, finish reason."""
        return [{"index": i, "text": self.text(i), "method": methods[i], "finish_reason": self.done[i].finish_reason}
                for i in range(len(self.jobs))]


def usage(done: Any) -> dict[str, int]:
    """OpenAI's usage of ``n`` choices: the prompt counted once, every choice's tokens summed."""
    done = list(done)
    n_prompt = max(d.prompt_tokens for d in done)
    n_completion = sum(d.completion_tokens for d in done)
    return {"prompt_tokens": n_prompt, "completion_tokens": n_completion, "total_tokens": n_prompt + n_completion}
