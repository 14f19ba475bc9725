"""Regenerate the playground's screenshots (docs/playground-desktop.png, docs/playground-phone.png).

A live ``personalign serve`` on stories260k (a subprocess on 127.0.0.1), Debian's ``chromium`` driven
by Playwright: a key pasted in, a user created with a stated preference, a message answered by two
replies A and B, A kept, twice, then a third turn waiting for a vote — the page as a person sees it
after two choices (the replies now come from what the choices taught).

Run: ``python scripts/playground_screenshots.py`` (``--chromium PATH`` where it is not on ``PATH``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
STORIES = ROOT.parent / "shared" / "models" / "stories260k"


def serve(tmp: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PERSONALIGN_ADMIN_KEY": "shots-admin", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "personalign", "serve", "--model", str(STORIES), "--db",
                             f"sqlite:///{tmp / 'db.sqlite'}", "--port", str(port), "--model-id", "stories260k"],
                            env=env, stdout=(tmp / "server.log").open("wb"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(f"{url}/health", timeout=1).json()["status"] == "ok":
                return proc, url
        except (httpx.HTTPError, ValueError):
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"the server did not start: {(tmp / 'server.log').read_text()[-2000:]}")


def shoot(browser, url: str, key: str, user: str, viewport: dict, out: Path) -> None:
    from playwright.sync_api import expect

    page = browser.new_page(viewport=viewport, device_scale_factor=1)
    page.goto(f"{url}/playground")
    page.fill("#key", key)
    page.click("#key-form button[type=submit]")
    page.wait_for_selector("#workspace:not([hidden])")
    page.select_option("#user-select", user)
    expect(page.locator("#preference")).not_to_have_value("")
    page.locator("#settings summary").click()
    page.fill("#max-tokens", "24")
    page.locator("#settings summary").click()
    for i, message in enumerate(["Tell me a story about a cat.", "And what did the cat do next?"]):
        page.fill("#message", message)
        page.click("#send")
        vote = page.locator("#turns > li").nth(i).locator(".vote[data-vote='a']")
        expect(vote).to_be_enabled(timeout=60_000)
        vote.click()
        expect(page.locator("#choice-count")).to_have_text(str(i + 1), timeout=120_000)
    expect(page.locator("#last-change")).to_contain_text("Your last choice moved me toward", timeout=60_000)
    page.fill("#message", "Tell me one more.")
    page.click("#send")
    expect(page.locator("#turns > li").nth(2).locator(".vote[data-vote='a']")).to_be_enabled(timeout=60_000)
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=str(out), full_page=viewport["width"] > 600)
    page.close()
    print(f"wrote {out}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser"))
    ap.add_argument("--out", default=str(ROOT / "docs"))
    a = ap.parse_args()
    if not a.chromium:
        ap.error("no chromium found: install Debian's `chromium` or pass --chromium PATH")
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as d:
        proc, url = serve(Path(d))
        try:
            key = httpx.post(f"{url}/v1/keys", json={"name": "shots"},
                             headers={"Authorization": "Bearer shots-admin"}).json()["key"]
            h = {"Authorization": f"Bearer {key}"}
            for user in ("maya", "sam"):
                httpx.post(f"{url}/v1/profiles", headers=h, json={
                    "user": user, "preference": "short, cheerful stories with simple words"}).raise_for_status()
            with sync_playwright() as p:
                b = p.chromium.launch(executable_path=a.chromium, args=["--no-sandbox"])
                shoot(b, url, key, "maya", {"width": 1366, "height": 860}, Path(a.out) / "playground-desktop.png")
                shoot(b, url, key, "sam", {"width": 390, "height": 844}, Path(a.out) / "playground-phone.png")
                b.close()
        finally:
            proc.terminate()
            proc.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
