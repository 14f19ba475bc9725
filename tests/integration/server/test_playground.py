"""The playground in a real headless browser (Debian's ``chromium`` driven by Playwright) against a live
``personalign serve`` on stories260k: a key pasted in, a user created, a message answered by replies
A and B, A chosen (the feedback count, the learned-in-words panel and the weight chart change), the
choice undone; a message sent while a choice is learned continues from the chosen reply only (the
request body is read); tie and both bad fold nothing; two methods compared blind (revealed after the
vote) fill the personal table; stop, regenerate; the conversation survives a reload; a new user in
two-methods mode reads a sentence, not the API's wording; on a phone both replies are on screen at
once; a wrong key answered by a readable error; nothing requested outside the server; the page's
content-security policy, HEAD and the icon."""

from __future__ import annotations

import contextlib
import os
import re
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
    assert httpx.head(f"{url}/playground").status_code == 200
    icon = httpx.get(f"{url}/favicon.ico")
    assert icon.status_code == 200 and icon.headers["content-type"].startswith("image/svg+xml")
    r = httpx.get(f"{url}/playground/../../app.py")
    assert r.status_code == 404
    assert httpx.get(f"{url}/playground/server.log").status_code == 404


def _connect(browser, url: str, key: str, user: str, viewport: dict | None = None):
    """A page connected with ``key``, on user ``user`` (created when new), and the list of requests."""
    from playwright.sync_api import expect

    page = browser.new_page(viewport=viewport or {"width": 1280, "height": 900})
    requested: list = []
    page.on("request", lambda req: requested.append(req))
    page.goto(f"{url}/playground")
    page.fill("#key", key)
    page.click("#key-form button[type=submit]")
    page.wait_for_selector("#workspace:not([hidden])")
    if user not in page.eval_on_selector_all("#user-select option", "els => els.map(e => e.value)"):
        page.fill("#new-user-id", user)
        page.click("#new-user button[type=submit]")
    else:
        page.select_option("#user-select", user)
    expect(page.locator("#user-select")).to_have_value(user)
    page.locator("#settings summary").click()
    page.fill("#max-tokens", "12")
    return page, requested


def _send(page, text: str, turn: int) -> None:
    """Send ``text`` and wait until turn ``turn`` (0-based) can be voted on."""
    from playwright.sync_api import expect

    page.fill("#message", text)
    page.click("#send")
    expect(page.locator("#turns > li")).to_have_count(turn + 1)
    expect(page.locator("#turns > li").nth(turn).locator(".vote[data-vote='a']")).to_be_enabled(timeout=60_000)


def _chat_bodies(requested: list) -> list[dict]:
    import json

    return [json.loads(r.post_data) for r in requested if r.url.endswith("/v1/chat/completions") and r.method == "POST"]


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
    assert page.is_hidden("#connect")  # connected: the chat comes first

    page.fill("#new-user-id", "alice")
    page.click("#new-user button[type=submit]")
    expect(page.locator("#user-select")).to_have_value("alice")
    assert page.inner_text("#choice-count") == "0"
    expect(page.locator("#learned-words")).to_contain_text("Nothing yet")

    # replies A and B, streamed at once, labelled; in "what you taught" mode they say their method
    page.locator("#settings summary").click()
    page.fill("#max-tokens", "12")
    page.fill("#message", "Once upon a time")
    page.click("#send")
    vote_a = page.locator("#turns .vote[data-vote='a']")
    expect(vote_a).to_be_enabled(timeout=60_000)
    labels = page.eval_on_selector_all("#turns .reply .reply-label", "els => els.map(e => e.textContent)")
    texts = page.eval_on_selector_all("#turns .reply .reply-text", "els => els.map(e => e.textContent)")
    assert labels == ["A", "B"] and all(t.strip() for t in texts)
    metas = page.eval_on_selector_all("#turns .reply .reply-meta", "els => els.map(e => e.textContent)")
    assert all("method: base" in m for m in metas)
    assert "preference" not in metas[0]  # base ignores a preference: it does not show one
    stats = page.eval_on_selector_all("#turns .reply .reply-stats", "els => els.map(e => e.textContent)")
    assert all(re.match(r"\d+ tokens · \d+\.\d s", t) for t in stats), stats  # tokens and time per reply
    assert all("cut at max tokens" in t for t in stats)  # 12 tokens of a story: both were cut
    page.screenshot(path=str(tmp_path / "two-replies.png"))

    # keep A: one choice, a Drift profile of one pair, described in words, its weights drawn
    vote_a.click()
    expect(page.locator("#choice-count")).to_have_text("1", timeout=60_000)
    assert page.inner_text("#pair-count") == "1"
    expect(page.locator("#learned-words")).to_contain_text("You seem to prefer")
    assert page.inner_text("#last-change").startswith("Your last choice moved me toward")
    page.locator("#details summary").click()
    assert page.is_visible("#chart")
    rows = page.eval_on_selector_all("#chart .weight-row", "els => els.map(e => [e.dataset.attribute, "
                                     "Number(e.dataset.weight), e.classList.contains('in-use')])")
    assert len(rows) >= 2 and any(w != 0 for _, w, _ in rows) and any(u for *_, u in rows)
    assert "kept" in page.inner_text("#history")
    assert "chosen" in page.get_attribute("#turns .reply[data-index='0']", "class")
    prof = httpx.get(f"{url}/v1/profiles/alice", headers={"Authorization": f"Bearer {key}"}).json()
    assert prof["drift_profile"]["num_pairs"] == 1

    # undo: the feedback is deleted, nothing learned is left, the turn can be voted on again
    page.click("#turns .undo")
    expect(page.locator("#choice-count")).to_have_text("0", timeout=60_000)
    expect(page.locator("#learned-words")).to_contain_text("Nothing yet")
    expect(page.locator("#turns .vote[data-vote='b']")).to_be_enabled()
    fb = httpx.get(f"{url}/v1/feedback?user=alice", headers={"Authorization": f"Bearer {key}"}).json()
    assert fb["data"] == []

    # a method that needs a stated preference, without one: a readable error naming it
    page.check("input[name='mode'][value='methods']")
    page.select_option("#method-a", "preference_prompting")
    page.select_option("#method-b", "base")
    page.fill("#message", "The dog ran")
    page.click("#send")
    page.wait_for_selector("#error:not([hidden])")
    assert "preference" in page.inner_text("#error-text")

    # the profile's stated preference, saved
    page.fill("#preference", "happy stories about dogs")
    page.click("#profile-form button[type=submit]")
    expect(page.locator("#profile-saved")).not_to_be_empty(timeout=10_000)
    prof = httpx.get(f"{url}/v1/profiles/alice", headers={"Authorization": f"Bearer {key}"}).json()
    assert prof["preference"] == "happy stories about dogs"

    # parameters a method does not take: a sentence naming the method, never a config class
    page.select_option("#method", "preference_prompting")
    page.fill("#params", '{"beta": 1.0}')
    page.click("#profile-form button[type=submit]")
    page.wait_for_selector("#error:not([hidden])")
    err = page.inner_text("#error-text")
    assert "preference_prompting" in err and "Config" not in err, err
    page.fill("#params", "")
    page.select_option("#method", "")

    # an empty message: a readable error, not a blank reply
    page.click("#error-close")
    page.fill("#message", "   ")
    page.click("#send")
    page.wait_for_selector("#error:not([hidden])")
    assert "message" in page.inner_text("#error-text").lower()

    outside = [u for u in requested if not u.startswith(url + "/")]
    assert not outside, outside
    assert any(u.endswith("/v1/chat/completions") for u in requested)
    page.close()


def test_a_message_sent_while_a_choice_is_learned_continues_from_the_chosen_reply(served, browser):
    from playwright.sync_api import expect

    url, key = served
    page, requested = _connect(browser, url, key, "sam")
    _send(page, "Once upon a time", 0)
    b_text = page.locator("#turns > li").nth(0).locator(".reply[data-index='1'] .reply-text").inner_text()
    held = []  # the choice's POST is held back: it is still being learned when the next message goes
    page.route("**/v1/feedback", lambda route: held.append(route))
    page.click("#turns .vote[data-vote='b']")
    expect(page.locator("#turns .turn-status")).to_contain_text("learning")
    page.fill("#message", "And then?")
    page.click("#send")  # before the choice is learned
    expect(page.locator("#turns > li")).to_have_count(2)
    expect(page.locator("#turns > li").nth(1).locator(".vote[data-vote='a']")).to_be_enabled(timeout=60_000)
    assert len(held) == 1
    held[0].continue_()
    page.unroute("**/v1/feedback")
    expect(page.locator("#choice-count")).to_have_text("1", timeout=60_000)
    body = _chat_bodies(requested)[-1]
    assistant = [m["content"] for m in body["messages"] if m["role"] == "assistant"]
    assert assistant == [b_text], body["messages"]  # the chosen reply once, never reply A beside it
    assert "chosen" in page.get_attribute("#turns > li:nth-child(1) .reply[data-index='1']", "class")
    page.close()


def test_tie_and_both_bad_fold_nothing_and_two_methods_are_blind_until_the_vote(served, browser):
    from playwright.sync_api import expect

    url, key = served
    httpx.post(f"{url}/v1/profiles", json={"user": "tia", "preference": "happy stories"},
               headers={"Authorization": f"Bearer {key}"}).raise_for_status()
    page, requested = _connect(browser, url, key, "tia")
    page.check("input[name='mode'][value='methods']")
    page.select_option("#method-a", "base")
    page.select_option("#method-b", "preference_prompting")
    for turn, (key_press, outcome) in enumerate([("t", "tie"), ("x", "bad"), ("a", "a")]):
        _send(page, f"Tell me about the number {turn}", turn)
        li = page.locator("#turns > li").nth(turn)
        metas = li.locator(".reply-meta")
        assert not metas.nth(0).is_visible() and not metas.nth(1).is_visible()  # blind before the vote
        page.locator("#chat-h").click()  # focus out of the message box: the page's keys apply
        page.keyboard.press(key_press)
        expect(li.locator(f".vote[data-vote='{outcome}']")).to_have_class(re.compile("picked"))
        expect(metas.nth(0)).to_be_visible()  # revealed after the vote
        shown = sorted(m.split("·")[0].strip() for m in metas.all_inner_texts())
        assert shown == ["method: base", "method: preference_prompting"], shown
    expect(page.locator("#choice-count")).to_have_text("1", timeout=60_000)  # only the A vote is feedback
    fb = httpx.get(f"{url}/v1/feedback?user=tia", headers={"Authorization": f"Bearer {key}"}).json()["data"]
    assert len(fb) == 1
    table = page.eval_on_selector_all("#leaderboard tbody tr", "els => els.map(e => [e.dataset.method, "
                                      "[...e.children].slice(1, 5).map(c => Number(c.textContent))])")
    got = dict(table)
    assert set(got) == {"base", "preference_prompting"}
    assert sum(v[0] for v in got.values()) == 1 and sum(v[1] for v in got.values()) == 1  # one win, one loss
    assert all(v[2] == 1 and v[3] == 1 for v in got.values())  # one tie, one both-bad each
    page.close()


def test_stop_regenerate_and_a_reload_keeps_the_conversation(served, browser):
    from playwright.sync_api import expect

    url, key = served
    page, requested = _connect(browser, url, key, "rey")
    # stop: the request is held back so it is still running when Stop is pressed
    held = []
    page.route("**/v1/chat/completions", lambda route: held.append(route))
    page.fill("#message", "A long story please")
    page.click("#send")
    expect(page.locator("#stop")).to_be_visible()
    page.click("#stop")
    expect(page.locator("#turns .turn-status")).to_contain_text("stopped")
    assert page.locator("#turns .vote[data-vote='a']").is_disabled()  # nothing was recorded to vote on
    page.unroute("**/v1/chat/completions")
    for route in held:
        with contextlib.suppress(Exception):  # the page already dropped the request
            route.abort()
    # regenerate: the stopped turn is asked again, and answered
    page.click("#turns .regenerate")
    expect(page.locator("#turns .vote[data-vote='a']")).to_be_enabled(timeout=60_000)
    expect(page.locator("#turns > li")).to_have_count(1)
    first = page.locator("#turns .reply-text").all_inner_texts()
    ids = [b["messages"][-1]["content"] for b in _chat_bodies(requested)]
    assert ids[-1] == "A long story please"
    page.click("#turns .regenerate")  # again: another pair of replies for the same message
    expect(page.locator("#turns .vote[data-vote='a']")).to_be_enabled(timeout=60_000)
    assert len(_chat_bodies(requested)) == len(ids) + 1
    page.locator("#chat-h").click()
    page.keyboard.press("a")
    expect(page.locator("#choice-count")).to_have_text("1", timeout=60_000)
    kept = page.locator("#turns .reply-text").all_inner_texts()
    assert first is not None and all(t for t in kept)
    # a reload keeps the conversation (local storage) and the choice made in it
    page.reload()
    page.wait_for_selector("#workspace:not([hidden])")
    expect(page.locator("#turns > li")).to_have_count(1)
    assert page.locator("#turns .reply-text").all_inner_texts() == kept
    assert "chosen" in page.get_attribute("#turns .reply[data-index='0']", "class")
    assert page.locator("#conversation-select option").count() >= 1
    page.close()


def test_a_new_user_comparing_with_drift_reads_a_sentence(served, browser):
    url, key = served
    page, _ = _connect(browser, url, key, "carol")
    page.check("input[name='mode'][value='methods']")
    page.select_option("#method-a", "base")
    page.select_option("#method-b", "drift")
    assert "Drift needs a choice first" in page.inner_text("#mode-note")
    page.fill("#message", "Hello")
    page.click("#send")
    page.wait_for_selector("#error:not([hidden])")
    err = page.inner_text("#error-text")
    assert "choose a reply" in err and "POST /v1/feedback" not in err, err
    page.close()


def test_on_a_phone_both_replies_are_on_screen_at_once(served, browser, tmp_path):
    url, key = served
    page, _ = _connect(browser, url, key, "pia", viewport={"width": 390, "height": 844})
    assert page.evaluate("document.documentElement.scrollWidth") <= 390  # nothing wider than the phone
    _send(page, "Tell me a short story", 0)
    replies = page.locator("#turns .reply")
    replies.nth(0).scroll_into_view_if_needed()
    boxes = [replies.nth(i).bounding_box() for i in range(2)]
    assert abs(boxes[0]["y"] - boxes[1]["y"]) < 2  # side by side
    assert all(b["y"] >= 0 and b["y"] + b["height"] <= 844 for b in boxes), boxes  # both fully on screen
    box = page.locator("#message").bounding_box()
    assert box["width"] >= 0.85 * 390 - 40  # the message box spans the phone
    chat_top = page.locator("#chat").bounding_box()["y"] + page.evaluate("window.scrollY")
    assert chat_top < 200, chat_top  # the chat starts near the top
    page.screenshot(path=str(tmp_path / "phone.png"))
    page.close()
