"""A live server on 127.0.0.1 (a free port) over the fixed-init tiny model with the chat tokenizer."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from personalign.assembly import build_methods
from personalign.methods import METHODS
from personalign.server import EngineWorker, Limits, Store, create_app
from personalign.views import HFBackend

ADMIN = "admin-test-key"
MODEL_ID = "tiny"
REPO = Path(__file__).resolve().parents[3]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Live:
    url: str
    store: Store
    engine: EngineWorker
    unavailable: dict[str, str]
    backend: Any

    def new_key(self, name: str = "") -> str:
        r = httpx.post(f"{self.url}/v1/keys", json={"name": name}, headers={"Authorization": f"Bearer {ADMIN}"})
        assert r.status_code == 201, r.text
        return r.json()["key"]

    def client(self, key: str) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {key}"}, timeout=60)


def start_server(app: Any) -> tuple[str, Any, threading.Thread]:
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    return f"http://127.0.0.1:{port}", server, thread


def start_subprocess_server(model_dir: Path, db: str, log: Path, *extra: str, admin: str = ADMIN,
                            memory_limit: int | None = None) -> tuple[subprocess.Popen, str]:
    """``personalign serve`` in its own process (``prlimit --as`` caps its memory when given), up and
    healthy; returns the process and its URL."""
    port = free_port()
    env = {**os.environ, "PERSONALIGN_ADMIN_KEY": admin, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "personalign", "serve", "--model", str(model_dir), "--db", db, "--port", str(port),
           "--model-id", MODEL_ID, "--dtype", "float32", "--device", "cpu", *extra]
    if memory_limit is not None:
        cmd = ["prlimit", f"--as={memory_limit}", "--", *cmd]
    proc = subprocess.Popen(cmd, env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the server exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=1).json()["status"] == "ok":
                return proc, url
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.2)
    proc.kill()
    pytest.fail(f"the server did not come up: {log.read_text()[-2000:]}")


def stop_subprocess_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(__import__("signal").SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


TEST_LIMITS = dict(max_tokens=64, default_max_tokens=16, max_message_chars=2000, max_messages=16,
                   max_body_bytes=64_000)


def make_live(tmp_path, model, tokenizer, db: str | None = None, limits: dict | None = None,
              **engine_kw: Any) -> tuple[Live, Any, threading.Thread]:
    backend = HFBackend(model, tokenizer)
    methods, unavailable = build_methods(METHODS.names(), backend)
    engine = EngineWorker(backend, methods, **engine_kw)
    store = Store(db or f"sqlite:///{tmp_path / 'server.db'}")
    limits = Limits(**{**TEST_LIMITS, **(limits or {})})
    app = create_app(engine, store, limits=limits, model_id=MODEL_ID, admin_key=ADMIN, unavailable=unavailable)
    url, server, thread = start_server(app)
    return Live(url, store, engine, unavailable, backend), server, thread


@pytest.fixture(scope="package")
def live(tmp_path_factory, tiny_lm, tiny_chat_tokenizer):
    lv, server, thread = make_live(tmp_path_factory.mktemp("live"), tiny_lm, tiny_chat_tokenizer, max_pending=64,
                                   max_batch=16)
    yield lv
    server.should_exit = True
    thread.join(timeout=30)
    lv.store.close()


@pytest.fixture()
def live_factory(tmp_path, tiny_lm, tiny_chat_tokenizer):
    """Start extra servers with their own engine settings; all are stopped after the test."""
    started = []

    def make(db: str | None = None, limits: dict | None = None, **engine_kw: Any) -> Live:
        (tmp_path / f"s{len(started)}").mkdir(exist_ok=True)
        lv, server, thread = make_live(tmp_path / f"s{len(started)}", tiny_lm, tiny_chat_tokenizer, db, limits,
                                       **engine_kw)
        started.append((lv, server, thread))
        return lv

    yield make
    for lv, server, thread in started:
        server.should_exit = True
        thread.join(timeout=30)
        lv.store.close()


@contextlib.contextmanager
def pdpo_live(db_dir: Path, model: Any, tokenizer: Any) -> Any:
    """A live server on the tiny model that also serves ``pdpo`` with an individual user model knowing
    one user ("seen"): yields ``(Live, users)``; stopped and its store closed on exit."""
    from personalign.methods.pdpo import PDPOMethod
    from personalign.training.user_model import UserIndex, UserModel

    backend = HFBackend(model, tokenizer)
    methods, unavailable = build_methods(METHODS.names(), backend)
    users = UserModel.for_model(model, kind="individual", num_users=1, user_tokens=2)
    methods["pdpo"] = PDPOMethod(users=users, index=UserIndex(["seen"]), model="main")
    engine = EngineWorker(backend, methods, max_batch=8)
    store = Store(f"sqlite:///{db_dir / 's.db'}")
    app = create_app(engine, store, limits=Limits(**TEST_LIMITS), model_id=MODEL_ID, admin_key=ADMIN,
                     unavailable=unavailable)
    url, server, thread = start_server(app)
    try:
        yield Live(url, store, engine, unavailable, backend), users
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        store.close()
