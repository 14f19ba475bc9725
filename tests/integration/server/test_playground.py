"""The playground in a real headless browser (Debian's ``chromium`` driven by Playwright) against a live
``personalign serve`` on stories260k: a key pasted in, a user created, a message answered by two
streamed replies, one chosen (the feedback count and the weight chart change), the choice undone; a
wrong key answered by a readable error; nothing requested outside the server; the page's
content-security policy."""

from __future__ import annotations

import os
import shutil

import httpx
import pytest
from tests.integration.server.conftest import ADMIN, REPO, start_subprocess_server, stop_subprocess_server

STORIES = REPO.parent / "shared" / "models" / "stories260k"


def chromium() -> str | None:
    for name in (os.environ.get("PERSONALIGN_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and (path := shutil.which(name)):
            return path
    return None


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    if not STORIES.is_dir():
        pytest.skip("../shared/models/stories260k is not there")
    tmp = tmp_path_factory.mktemp("playground")
    proc, url = start_subprocess_server(STORIES, f"sqlite:///{tmp / 'db.sqlite'}", tmp / "server.log",
                                        "--max-tokens", "64", memory_limit=8 << 30)
    key = httpx.post(f"{url}/v1/keys", json={"name": "pg"}, headers={"Authorization": f"Bearer {ADMIN}"}).json()["key"]
    yield url, key
    stop_subprocess_server(proc)


@pytest.fixture(scope="module")
def browser():
    exe = chromium()
    if exe is None:
        pytest.skip("no chromium on this machine (scripts/setup.sh installs Debian's `chromium` where it can)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (the `test` extra)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=["--no-sandbox"])
        yield b
        b.close()


def test_root_redirects_and_the_page_forbids_outside_origins(served):
    url, _ = served
    r = httpx.get(f"{url}/", follow_redirects=False)
    assert r.status_code == 307 and r.headers["location"] == "/playground"
    for path in ("/playground", "/playground/app.js", "/playground/api.js", "/playground/chart.js",
                 "/playground/style.css"):
        r = httpx.get(url + path)
        assert r.status_code == 200, path
        csp = r.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "script-src 'self'" in csp and "connect-src 'self'" in csp
        assert r.headers["x-content-type-options"] == "nosniff"
    page = httpx.get(f"{url}/playground").text
    assert "<script" in page and "http://" not in page and "https://" not in page  # nothing from outside
    assert "onclick" not in page and "<style" not in page  # no inline code (the policy would block it)
    r = httpx.get(f"{url}/playground/../../app.py")
    assert r.status_code == 404
    assert httpx.get(f"{url}/playground/server.log").status_code == 404


def test_choose_a_reply_and_watch_the_profile_learn(served, browser, tmp_path):
    from playwright.sync_api import expect

    url, key = served
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    requested: list[str] = []
    page.on("request", lambda req: requested.append(req.url))
    page.goto(f"{url}/")
    assert page.url == f"{url}/playground"

    # a wrong key: a readable error, no workspace
    page.fill("#key", "sk-wrong")
    page.click("#key-form button[type=submit]")
    page.wait_for_selector("#error:not([hidden])")
    assert "key" in page.inner_text("#error-text").lower()
    assert page.is_hidden("#workspace")

    page.fill("#key", key)
    page.click("#key-form button[type=submit]")
    page.wait_for_selector("#workspace:not([hidden])")
    assert key not in page.url  # the key never goes into a URL
    assert page.evaluate("sessionStorage.getItem('personalign.key')") == key

    page.fill("#new-user-id", "alice")
    page.click("#new-user button[type=submit]")
    expect(page.locator("#user-select")).to_have_value("alice")
    assert page.inner_text("#choice-count") == "0"
    assert page.is_visible("#chart-empty")

    # two replies, streamed at once, each saying which method made it
    page.fill("#max-tokens", "12")
    page.fill("#message", "Once upon a time")
    page.click("#send")
    choose = page.locator("#turns .reply .choose")
    expect(choose).to_have_count(2)
    for i in range(2):
        expect(choose.nth(i)).to_be_enabled(timeout=60_000)
    texts = page.eval_on_selector_all("#turns .reply .reply-text", "els => els.map(e => e.textContent)")
    metas = page.eval_on_selector_all("#turns .reply .reply-meta", "els => els.map(e => e.textContent)")
    assert len(texts) == 2 and all(t.strip() for t in texts)
    assert all("method: base" in m for m in metas)
    page.screenshot(path=str(tmp_path / "two-replies.png"))

    # keep the first: one choice, a Drift profile of one pair, its weights drawn, the change described
    page.click("#turns .reply[data-index='0'] .choose")
    expect(page.locator("#choice-count")).to_have_text("1", timeout=60_000)
    assert page.inner_text("#pair-count") == "1"
    assert page.is_visible("#chart")
    rows = page.eval_on_selector_all("#chart .weight-row", "els => els.map(e => [e.dataset.attribute, "
                                     "Number(e.dataset.weight), e.classList.contains('in-use')])")
    assert len(rows) >= 2 and any(w != 0 for _, w, _ in rows) and any(u for *_, u in rows)
    assert page.inner_text("#last-change").startswith("What the last change did")
    assert "kept" in page.inner_text("#history")
    assert "chosen" in page.get_attribute("#turns .reply[data-index='0']", "class")
    prof = httpx.get(f"{url}/v1/profiles/alice", headers={"Authorization": f"Bearer {key}"}).json()
    assert prof["drift_profile"]["num_pairs"] == 1

    # undo: the feedback is deleted, the profile has no pair left, the turn can be chosen again
    page.click("#turns .reply[data-index='0'] .undo")
    expect(page.locator("#choice-count")).to_have_text("0", timeout=60_000)
    page.wait_for_selector("#chart-empty:not([hidden])")
    assert not page.is_disabled("#turns .reply[data-index='1'] .choose")
    fb = httpx.get(f"{url}/v1/feedback?user=alice", headers={"Authorization": f"Bearer {key}"}).json()
    assert fb["data"] == []

    # a method that needs a stated preference, without one: a readable error naming the field
    page.check("input[name='mode'][value='methods']")
    page.select_option("#method-a", "preference_prompting")
    page.fill("#message", "The dog ran")
    page.click("#send")
    page.wait_for_selector("#error:not([hidden])")
    assert "preference" in page.inner_text("#error-text")

    # the profile's stated preference, saved; then two methods side by side, sent from the keyboard
    # (Enter in the message box): each reply names its method
    page.fill("#preference", "happy stories about dogs")
    page.click("#profile-form button[type=submit]")
    expect(page.locator("#profile-saved")).not_to_be_empty(timeout=10_000)
    prof = httpx.get(f"{url}/v1/profiles/alice", headers={"Authorization": f"Bearer {key}"}).json()
    assert prof["preference"] == "happy stories about dogs"
    page.check("input[name='mode'][value='methods']")
    page.select_option("#method-a", "preference_prompting")
    page.select_option("#method-b", "base")
    page.fill("#message", "The dog ran")
    page.focus("#message")
    page.keyboard.press("Enter")
    expect(page.locator("#turns > li")).to_have_count(2)
    second = page.locator("#turns > li").nth(1)
    for i in range(2):
        expect(second.locator(".reply .choose").nth(i)).to_be_enabled(timeout=60_000)
    metas = second.locator(".reply .reply-meta").all_inner_texts()
    assert "method: preference_prompting" in metas[0] and "method: base" in metas[1], metas

    # an empty message: a readable error, not a blank reply
    page.fill("#message", "   ")
    page.click("#send")
    page.wait_for_selector("#error:not([hidden])")
    assert "message" in page.inner_text("#error-text").lower()

    outside = [u for u in requested if not u.startswith(url + "/")]
    assert not outside, outside
    assert any(u.endswith("/v1/chat/completions") for u in requested)
    page.close()
