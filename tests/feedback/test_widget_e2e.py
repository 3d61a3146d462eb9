"""The feedback widget and the demo page in headless Chromium (Debian's chromium, driven by Playwright).

Fast tests serve the app on the fake engine in-process (uvicorn in a thread) and capture what the
widget posts with `page.route`, so they check the widget's side of the contract whatever the
feedback routes do. The end-to-end test drives the real server (vLLM on the embedded model, SQLite)
and finds the rating row in its database.

Without /usr/bin/chromium (or Playwright) the browser tests skip, unless
LOOPCHAT_TEST_REQUIRE_BROWSER=1, which turns the skip into a failure.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, text

from loopchat.settings import Settings
from serving.app import create_app
from tests.conftest import LiveServer
from tests.utils.fake_engine import FakeEngine
from tests.utils.processes import serve_in_thread

try:
    from playwright.sync_api import Browser, Page, Route, expect, sync_playwright
except ImportError:  # checked by the `browser` fixture, which skips or fails with the reason
    sync_playwright = None

CHROMIUM = Path("/usr/bin/chromium")
LAUNCH_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
HOSTILE = '<script>alert(1)</script><img src=x onerror="alert(2)">'
SAVED = "Thanks — feedback saved"

# Records every distinct text of the newest assistant message: more than one means it streamed.
COUNT_TEXT_UPDATES = """
window.__answerTexts = [];
new MutationObserver(() => {
  const nodes = document.querySelectorAll('.msg-assistant .msg-text');
  const text = nodes.length ? nodes[nodes.length - 1].textContent : '';
  const seen = window.__answerTexts;
  if (text && seen[seen.length - 1] !== text) seen.push(text);
}).observe(document, {childList: true, subtree: true, characterData: true});
"""


# --- the browser --------------------------------------------------------------------------------


def _browser_missing() -> str | None:
    if sync_playwright is None:
        return "Playwright for Python is not installed (pip install playwright)"
    if not CHROMIUM.exists():
        return f"{CHROMIUM} is missing (deploy/install.sh installs Debian's chromium as root)"
    return None


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    reason = _browser_missing()
    if reason is not None:
        if os.environ.get("LOOPCHAT_TEST_REQUIRE_BROWSER") == "1":
            pytest.fail(f"browser required (LOOPCHAT_TEST_REQUIRE_BROWSER=1): {reason}")
        pytest.skip(reason)
    expect.set_options(timeout=15_000)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=LAUNCH_ARGS, headless=True)
        yield browser
        browser.close()


@dataclass
class Tab:
    page: Page
    dialogs: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def assert_clean(self) -> None:
        """No dialog ever opened (injected script ran), no script error, no CSP refusal."""
        assert self.dialogs == []
        assert self.errors == []


@pytest.fixture
def tab(browser: Browser) -> Iterator[Tab]:
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(15_000)
    result = Tab(page)

    def on_dialog(dialog) -> None:
        result.dialogs.append(dialog.message)
        dialog.dismiss()

    def on_console(message) -> None:
        if "Content Security Policy" in message.text or "Refused to" in message.text:
            result.errors.append(message.text)

    page.on("dialog", on_dialog)
    page.on("pageerror", lambda error: result.errors.append(str(error)))
    page.on("console", on_console)
    page.add_init_script(COUNT_TEXT_UPDATES)
    yield result
    context.close()
    assert result.dialogs == [], "a dialog opened: hostile text ran as code"


# --- the in-process server on the fake engine -----------------------------------------------------


@pytest.fixture(scope="module")
def server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The app (fake engine, SQLite in a temporary folder) served by uvicorn in a thread."""
    data = tmp_path_factory.mktemp("widget-server")
    engine = FakeEngine(max_model_len=1024, token_delay=0.02)
    app = create_app(
        Settings(data_dir=data, base_model=data / "fake-base"), engine=engine, exit_on_engine_failure=False
    )
    with serve_in_thread(app, "widget-test-server") as url:
        yield url


class Captured:
    """Answers the widget's feedback posts itself and keeps their JSON bodies."""

    def __init__(self, status: int = 200, body: Any = None, content_type: str = "application/json"):
        self.bodies: list[dict[str, Any]] = []
        self.status = status
        self.body = body
        self.content_type = content_type

    def __call__(self, route: Route) -> None:
        request = route.request
        sent = request.post_data_json
        self.bodies.append(sent)
        body = self.body if self.body is not None else {"object": "feedback", **sent}
        payload = body if isinstance(body, str) else json.dumps(body)
        route.fulfill(status=self.status, content_type=self.content_type, body=payload)


def open_chat(tab: Tab, url: str, *, max_tokens: int = 8) -> Page:
    page = tab.page
    page.goto(url + "/")
    page.wait_for_function("() => window.LoopchatWidget !== undefined")
    page.fill("#max-tokens", str(max_tokens))
    return page


def ask(page: Page, message: str, *, timeout: float = 30_000) -> tuple[str, dict[str, Any]]:
    """Sends `message` with Enter; returns the answer's completion id and the request body sent."""
    count = page.locator("article.msg-assistant[data-completion-id]").count()
    page.fill("#prompt", message)
    with page.expect_request("**/v1/chat/completions") as request_info:
        page.press("#prompt", "Enter")
    answer = page.locator("article.msg-assistant[data-completion-id]").nth(count)
    answer.wait_for(timeout=timeout)
    return answer.get_attribute("data-completion-id"), request_info.value.post_data_json


def widget_state(page: Page, completion_id: str):
    return page.locator(f'.loopchat-feedback[data-loopchat-for="{completion_id}"]')


# --- no browser needed ----------------------------------------------------------------------------


def test_page_and_widget_are_served_with_caching_headers(server_url: str) -> None:
    page = httpx.get(server_url + "/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert '<script src="/widget.js" defer></script>' in page.text
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp
    # No external resource: every src/href is same-origin or a data: URL.
    assert re.findall(r'(?:src|href)="(?!/|data:)[^"]*"', page.text) == []

    widget = httpx.get(server_url + "/widget.js")
    assert widget.status_code == 200
    assert widget.headers["content-type"].startswith("application/javascript")
    max_age = re.search(r"max-age=(\d+)", widget.headers["cache-control"])
    assert max_age and 0 < int(max_age.group(1)) <= 3600
    # Its only requests go to the configured API; its styles load nothing (no @import, no url()).
    assert re.findall(r"fetch\(([^,]+),", widget.text) == ["config.endpoint + path"]
    assert "@import" not in widget.text and "url(" not in widget.text
    assert "innerHTML" not in widget.text.replace("never innerHTML", "")

    etag = widget.headers["etag"]
    revalidated = httpx.get(server_url + "/widget.js", headers={"If-None-Match": etag})
    assert revalidated.status_code == 304 and revalidated.content == b""
    assert httpx.get(server_url + "/widget.js", headers={"If-None-Match": '"other"'}).status_code == 200
    assert httpx.head(server_url + "/widget.js").status_code == 200


# --- fast browser tests ---------------------------------------------------------------------------


@pytest.mark.browser
def test_streamed_answer_then_thumbs_down_and_comment(tab: Tab, server_url: str) -> None:
    feedback = Captured()
    tab.page.route("**/v1/feedback", feedback)
    page = open_chat(tab, server_url, max_tokens=12)
    user = page.evaluate("LoopchatWidget.user()")
    assert user.startswith("u-")

    completion_id, sent = ask(page, "hello there")
    assert completion_id.startswith("chatcmpl-")
    assert sent["stream"] is True and sent["user"] == user and sent["max_completion_tokens"] == 12
    assert sent["messages"] == [{"role": "user", "content": "hello there"}]
    answer = page.locator("article.msg-assistant .msg-text")
    assert answer.inner_text().startswith("echo")
    assert len(page.evaluate("window.__answerTexts")) > 1, "the answer arrived in one piece"

    controls = widget_state(page, completion_id)
    expect(controls).to_have_attribute("role", "group")
    up = controls.get_by_role("button", name="Good answer (thumbs up)")
    down = controls.get_by_role("button", name="Bad answer (thumbs down)")
    expect(up).to_have_attribute("aria-pressed", "false")
    expect(down).to_have_attribute("aria-pressed", "false")
    status = controls.get_by_role("status")
    expect(status).to_have_attribute("aria-live", "polite")

    down.click()
    expect(controls).to_have_attribute("data-loopchat-state", "saved")
    expect(status).to_have_text(SAVED)
    expect(down).to_have_attribute("aria-pressed", "true")
    expect(up).to_have_attribute("aria-pressed", "false")
    assert feedback.bodies == [{"completion_id": completion_id, "user": user, "rating": "down"}]

    # A thumbs down opens the comment box; the next post carries the thumb and the comment.
    expect(controls.get_by_role("button", name="Add a comment")).to_have_attribute("aria-expanded", "true")
    controls.get_by_label("Your comment (optional)").fill("  Too vague.  ")
    controls.get_by_role("button", name="Send comment").click()
    expect(controls).to_have_attribute("data-loopchat-state", "saved")
    expect(status).to_have_text(SAVED)
    assert feedback.bodies[1] == {
        "completion_id": completion_id,
        "user": user,
        "rating": "down",
        "comment": "Too vague.",
    }
    tab.assert_clean()


@pytest.mark.browser
def test_keyboard_only(tab: Tab, server_url: str) -> None:
    feedback = Captured()
    tab.page.route("**/v1/feedback", feedback)
    page = tab.page
    page.goto(server_url + "/")
    page.wait_for_function("() => window.LoopchatWidget !== undefined")
    # The page starts with focus in the message box: type and press Enter, no mouse.
    page.keyboard.type("hi")
    with page.expect_request("**/v1/chat/completions"):
        page.keyboard.press("Enter")
    page.locator("article.msg-assistant[data-completion-id]").wait_for()
    focused = "() => document.activeElement && document.activeElement.className"

    for _ in range(30):
        page.keyboard.press("Tab")
        if "loopchat-thumb-up" in page.evaluate(focused):
            break
    else:
        pytest.fail("thumbs up is not reachable with Tab")
    outline = page.evaluate(
        "() => { const s = getComputedStyle(document.activeElement); "
        "return [s.outlineStyle, s.outlineWidth]; }"
    )
    assert outline[0] != "none" and outline[1] != "0px", "no visible focus outline"

    page.keyboard.press("Space")
    expect(page.locator(".loopchat-thumb-up")).to_have_attribute("aria-pressed", "true")
    expect(page.locator(".loopchat-feedback")).to_have_attribute("data-loopchat-state", "saved")
    assert feedback.bodies[-1]["rating"] == "up"

    page.keyboard.press("Tab")  # thumbs down
    page.keyboard.press("Tab")  # Comment
    page.keyboard.press("Tab")  # Suggest a better answer
    assert "loopchat-toggle-correction" in page.evaluate(focused)
    page.keyboard.press("Enter")
    expect(page.locator(".loopchat-toggle-correction")).to_have_attribute("aria-expanded", "true")
    assert "loopchat-correction" in page.evaluate(focused), "focus did not move into the opened box"
    page.keyboard.type("A better answer.")
    page.keyboard.press("Tab")
    assert "loopchat-send-correction" in page.evaluate(focused)
    page.keyboard.press("Enter")
    expect(page.locator(".loopchat-feedback")).to_have_attribute("data-loopchat-state", "saved")
    assert feedback.bodies[-1] == {
        "completion_id": feedback.bodies[0]["completion_id"],
        "user": feedback.bodies[0]["user"],
        "rating": "up",
        "correction": "A better answer.",
    }

    # Ctrl+Enter sends from the box; Escape closes it and hands focus back to its toggle.
    page.keyboard.press("Shift+Tab")
    page.keyboard.press("Control+End")
    page.keyboard.type(" More.")
    page.keyboard.press("Control+Enter")
    expect(page.locator(".loopchat-feedback")).to_have_attribute("data-loopchat-state", "saved")
    assert feedback.bodies[-1]["correction"] == "A better answer. More."
    page.keyboard.press("Escape")
    expect(page.locator(".loopchat-toggle-correction")).to_have_attribute("aria-expanded", "false")
    assert "loopchat-toggle-correction" in page.evaluate(focused)
    tab.assert_clean()


@pytest.mark.browser
def test_hostile_text_shows_as_text(tab: Tab, server_url: str) -> None:
    page = tab.page

    def hostile_answer(route: Route) -> None:
        chunks = [HOSTILE[:20], HOSTILE[20:]]
        events = "".join(
            "data: "
            + json.dumps({"id": "chatcmpl-hostile", "choices": [{"index": 0, "delta": {"content": c}}]})
            + "\n\n"
            for c in chunks
        )
        route.fulfill(
            status=200,
            content_type="text/event-stream",
            headers={"x-loopchat-completion-id": "chatcmpl-hostile", "x-loopchat-conversation-id": "conv-1"},
            body=events + "data: [DONE]\n\n",
        )

    page.route("**/v1/chat/completions", hostile_answer)
    # The server refuses the comment and echoes it in its error message.
    page.route(
        "**/v1/feedback",
        Captured(400, {"error": {"message": "rejected: " + HOSTILE, "type": "invalid_request_error"}}),
    )
    open_chat(tab, server_url)
    ask(page, HOSTILE)

    expect(page.locator("article.msg-user .msg-text")).to_have_text(HOSTILE)
    expect(page.locator("article.msg-assistant .msg-text")).to_have_text(HOSTILE)
    page.locator(".loopchat-toggle-comment").click()
    page.locator("textarea.loopchat-comment").fill(HOSTILE)
    page.locator(".loopchat-send-comment").click()
    status = page.locator(".loopchat-feedback .loopchat-status")
    expect(status).to_have_text("rejected: " + HOSTILE)
    expect(status).to_have_class(re.compile("loopchat-error"))
    assert page.locator("body img, #messages script").count() == 0
    page.wait_for_timeout(300)  # an injected <img onerror> would have fired by now
    tab.assert_clean()


@pytest.mark.browser
def test_api_errors_show_their_message(tab: Tab, server_url: str) -> None:
    page = open_chat(tab, server_url, max_tokens=2000)
    # The real server (vLLM's serving layer) refuses: the fake engine's context is 1024 tokens.
    page.fill("#prompt", "too long please")
    page.press("#prompt", "Enter")
    error = page.get_by_role("alert")
    expect(error).to_contain_text("cannot be greater than max_model_len=1024")
    assert page.locator("article.msg-assistant").count() == 0

    page.fill("#max-tokens", "4")
    completion_id, _ = ask(page, "hello")
    controls = widget_state(page, completion_id)
    status = controls.get_by_role("status")
    responses = [
        (Captured(404, {"error": {"message": f"Unknown completion {completion_id}.", "type": "x"}}), None),
        (Captured(502, "<html>Bad gateway</html>", "text/html"), "Feedback not saved (HTTP 502)."),
    ]
    for handler, message in responses:
        page.unroute("**/v1/feedback")
        page.route("**/v1/feedback", handler)
        controls.get_by_role("button", name="Good answer (thumbs up)").click()
        expect(controls).to_have_attribute("data-loopchat-state", "error")
        expect(status).to_have_text(message or f"Unknown completion {completion_id}.")
        expect(status).to_have_class(re.compile("loopchat-error"))

    page.unroute("**/v1/feedback")
    page.route("**/v1/feedback", lambda route: route.abort())
    controls.get_by_role("button", name="Bad answer (thumbs down)").click()
    expect(status).to_have_text("Network error: feedback not saved. Please try again.")
    tab.assert_clean()


@pytest.mark.browser
def test_compare_shows_a_pair_and_the_choice_continues_the_conversation(tab: Tab, server_url: str) -> None:
    page = tab.page
    comparison = {
        "object": "chat.comparison",
        "id": "cmp-1",
        "conversation_id": "conv-compare-1",
        "completions": [
            _completion("chatcmpl-a", "model-alpha", "First answer."),
            _completion("chatcmpl-b", "model-beta", "Second <b>answer</b>."),
        ],
    }
    compare_bodies: list[dict] = []

    def compare(route: Route) -> None:
        compare_bodies.append(route.request.post_data_json)
        route.fulfill(status=200, content_type="application/json", body=json.dumps(comparison))

    page.route("**/v1/chat/compare", compare)
    preferences = Captured()
    page.route("**/v1/feedback/preference", preferences)
    open_chat(tab, server_url)
    user = page.evaluate("LoopchatWidget.user()")

    page.check("#compare")
    page.fill("#prompt", "Which is better?")
    page.press("#prompt", "Enter")
    pair = page.locator(".pair")
    expect(pair.get_by_role("heading")).to_have_text(["Answer A", "Answer B"])
    assert compare_bodies[0]["messages"] == [{"role": "user", "content": "Which is better?"}]
    assert compare_bodies[0]["user"] == user and "stream" not in compare_bodies[0]
    text = page.locator("#messages").inner_text()
    assert "model-alpha" not in text and "model-beta" not in text, "the pair reveals its models"
    expect(pair.locator(".msg-text").nth(1)).to_have_text("Second <b>answer</b>.")
    # Each answer has its own rating controls too.
    expect(pair.locator(".loopchat-feedback")).to_have_count(2)

    # Sending on before choosing is refused with a hint.
    page.fill("#prompt", "thanks")
    page.press("#prompt", "Enter")
    expect(page.locator("#notice")).to_contain_text("Choose Answer A or Answer B first")

    choice = page.get_by_role("group", name="Which answer is better?")
    choice.get_by_role("button", name="Answer B is better").click()
    expect(choice).to_have_attribute("data-loopchat-state", "saved")
    expect(choice.get_by_role("button", name="Answer B is better")).to_have_attribute("aria-pressed", "true")
    expect(choice.get_by_role("button", name="Answer A is better")).to_have_attribute("aria-pressed", "false")
    assert preferences.bodies == [
        {"chosen_completion_id": "chatcmpl-b", "rejected_completion_id": "chatcmpl-a", "user": user}
    ]

    # The chosen answer continues the conversation (now streamed by the server, compare off).
    page.uncheck("#compare")
    _, sent = ask(page, "thanks")
    assert sent["messages"] == [
        {"role": "user", "content": "Which is better?"},
        {"role": "assistant", "content": "Second <b>answer</b>."},
        {"role": "user", "content": "thanks"},
    ]
    assert sent["metadata"] == {"conversation_id": "conv-compare-1"}
    tab.assert_clean()


def _completion(completion_id: str, model: str, content: str) -> dict[str, Any]:
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": 0,
        "model": model,
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }


HOST_PAGE = """<!doctype html><html><head><title>host</title>
<style>button { padding: 9px; }</style>
<script src="/widget.js" defer></script></head><body>
<button id="host-button">host</button>
<div id="one" data-loopchat-completion-id="chatcmpl-one"><p>An answer.</p></div>
</body></html>"""


@pytest.mark.browser
def test_declarative_use_on_a_host_page(tab: Tab, server_url: str) -> None:
    """One script tag: marked elements get controls, also when added later; pairs by attribute."""
    page = tab.page
    page.route(
        "**/host.html", lambda route: route.fulfill(status=200, content_type="text/html", body=HOST_PAGE)
    )
    feedback, preferences = Captured(), Captured()
    page.route("**/v1/feedback", feedback)
    page.route("**/v1/feedback/preference", preferences)
    page.goto(server_url + "/host.html")
    expect(page.locator("#one .loopchat-feedback")).to_have_count(1)
    page.evaluate("LoopchatWidget.configure({user: 'host-user-7'})")
    # attach() on an element that already has controls changes nothing.
    page.evaluate("LoopchatWidget.attach(document.getElementById('one'), 'chatcmpl-one')")
    expect(page.locator("#one .loopchat-feedback")).to_have_count(1)

    hostile_id = 'x"><img src=x onerror="alert(3)">'
    page.evaluate(
        """(hostileId) => {
          for (const [id, cid, pair] of [['two', 'chatcmpl-a', 'p1'], ['three', 'chatcmpl-b', 'p1'],
                                         ['four', hostileId, null]]) {
            const node = document.createElement('div');
            node.id = id;
            node.dataset.loopchatCompletionId = cid;
            if (pair) node.dataset.loopchatPair = pair;
            node.textContent = 'answer ' + id;
            document.body.append(node);
          }
        }""",
        hostile_id,
    )
    expect(page.locator(".loopchat-feedback")).to_have_count(4)
    expect(page.locator(".loopchat-pair")).to_have_count(1)

    page.locator("#four .loopchat-thumb-up").click()
    expect(page.locator("#four .loopchat-feedback")).to_have_attribute("data-loopchat-state", "saved")
    assert feedback.bodies == [{"completion_id": hostile_id, "user": "host-user-7", "rating": "up"}]

    page.get_by_role("button", name="Answer A is better").click()
    expect(page.locator(".loopchat-pair")).to_have_attribute("data-loopchat-state", "saved")
    assert preferences.bodies == [
        {"chosen_completion_id": "chatcmpl-a", "rejected_completion_id": "chatcmpl-b", "user": "host-user-7"}
    ]

    # Scoped styles: every widget rule is under a loopchat- class; the host's buttons keep theirs.
    scoped = page.evaluate(
        """() => [...document.getElementById('loopchat-widget-style').sheet.cssRules].every(
               (rule) => rule.selectorText.split(',').every((s) => s.trim().startsWith('.loopchat-')))"""
    )
    assert scoped
    assert page.evaluate("getComputedStyle(document.getElementById('host-button')).paddingTop") == "9px"
    assert page.locator("img").count() == 0
    tab.assert_clean()


# --- end to end: the real server, the real engine, the real database ------------------------------


def _poll_rows(database_url: str, sql: str, params: dict, until, timeout: float = 15.0) -> list[dict]:
    """Rows of `sql` once `until(rows)` holds (writes may commit in the background), or at timeout."""
    engine = create_engine(database_url)
    deadline = time.monotonic() + timeout
    try:
        while True:
            with engine.connect() as connection:
                rows = [dict(row) for row in connection.execute(text(sql), params).mappings()]
            if until(rows) or time.monotonic() > deadline:
                return rows
            time.sleep(0.1)
    finally:
        engine.dispose()


def open_live(tab: Tab, live_server: LiveServer) -> Page:
    missing = [path for path in ("/", "/widget.js") if httpx.get(live_server.url + path).status_code != 200]
    assert not missing, f"the server does not serve {missing}: serving/app.py must include serving.routes.ui"
    tab.page.goto(live_server.url + "/")
    tab.page.wait_for_function("() => window.LoopchatWidget !== undefined")
    return tab.page


@pytest.mark.browser
@pytest.mark.engine
def test_end_to_end_rating_reaches_the_database(tab: Tab, live_server: LiveServer) -> None:
    page = open_live(tab, live_server)
    page.fill("#max-tokens", "32")
    page.fill("#prompt", "Name three colors of the rainbow.")
    with page.expect_response("**/v1/chat/completions") as response_info:
        page.get_by_role("button", name="Send").click()
    header_id = response_info.value.headers["x-loopchat-completion-id"]

    answer = page.locator("article.msg-assistant[data-completion-id]")
    answer.wait_for(timeout=120_000)
    completion_id = answer.get_attribute("data-completion-id")
    assert completion_id == header_id
    assert answer.locator(".msg-text").inner_text().strip()
    assert len(page.evaluate("window.__answerTexts")) > 1, "the answer arrived in one piece"

    controls = widget_state(page, completion_id)
    status = controls.get_by_role("status")
    controls.get_by_role("button", name="Bad answer (thumbs down)").click()
    expect(controls).not_to_have_attribute("data-loopchat-state", "saving")
    expect(status).to_have_text(SAVED)

    comment = "Only two colors — e2e <b>check</b>"
    controls.get_by_label("Your comment (optional)").fill(comment)
    controls.get_by_role("button", name="Send comment").click()
    expect(controls).not_to_have_attribute("data-loopchat-state", "saving")
    expect(status).to_have_text(SAVED)

    user = page.evaluate("LoopchatWidget.user()")
    rows = _poll_rows(
        live_server.database_url,
        "SELECT completion_id, user_key, thumb, comment, correction FROM rating WHERE completion_id = :id",
        {"id": completion_id},
        until=lambda rows: any(row["comment"] == comment for row in rows),
    )
    assert rows == [
        {
            "completion_id": completion_id,
            "user_key": user,
            "thumb": "down",
            "comment": comment,
            "correction": None,
        }
    ]
    tab.assert_clean()


@pytest.mark.browser
@pytest.mark.engine
def test_end_to_end_side_by_side_choice_reaches_the_database(tab: Tab, live_server: LiveServer) -> None:
    page = open_live(tab, live_server)
    page.fill("#max-tokens", "16")
    page.check("#compare")
    page.fill("#prompt", "Say hello.")
    page.get_by_role("button", name="Send").click()
    answers = page.locator(".pair article.msg-assistant[data-completion-id]")
    expect(answers).to_have_count(2, timeout=120_000)
    id_a, id_b = (answers.nth(i).get_attribute("data-completion-id") for i in range(2))

    choice = page.get_by_role("group", name="Which answer is better?")
    choice.get_by_role("button", name="Answer B is better").click()
    expect(choice).not_to_have_attribute("data-loopchat-state", "saving")
    expect(choice.get_by_role("status")).to_have_text("Thanks — choice saved")

    user = page.evaluate("LoopchatWidget.user()")
    rows = _poll_rows(
        live_server.database_url,
        "SELECT chosen_completion_id, rejected_completion_id, user_key FROM preference "
        "WHERE user_key = :user",
        {"user": user},
        until=bool,
    )
    assert rows == [{"chosen_completion_id": id_b, "rejected_completion_id": id_a, "user_key": user}]
    tab.assert_clean()


class HostPage(http.server.ThreadingHTTPServer):
    """A web page on an origin of its own (a shop's site), served from loopback: Chromium refuses
    a public page's requests to loopback outright, so the page must be local too."""

    def __init__(self) -> None:
        page_server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the http.server API
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.end_headers()
                self.wfile.write(page_server.page)

            def log_message(self, *args) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        self.page = b""
        self.origin = f"http://127.0.0.1:{self.server_address[1]}"

    def __enter__(self) -> HostPage:
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
        self.server_close()


HOST_WITH_KEY = """<!doctype html><html><body>
<div id="answer" data-loopchat-completion-id="{completion}">an answer</div>
<script src="{api}/widget.js"></script>
<script>LoopchatWidget.configure({{user: 'shopper', headers: {{Authorization: 'Bearer {key}'}}}});</script>
</body></html>"""


@pytest.mark.browser
def test_a_public_key_rates_from_its_sites_pages_only(tab: Tab, tmp_path: Path) -> None:
    """Production mode: the shop's page, on another origin, loads the widget with the shop's
    public key and rates the shop's answer through CORS; the same page on an origin the key does
    not list is refused by the preflight, and nothing is stored from there."""
    from serving.access import create_key

    settings = Settings(
        data_dir=tmp_path,
        base_model=tmp_path / "fake-base",
        environment="production",
        access={"key_cache_s": 0.2},
    )
    app = create_app(settings, engine=FakeEngine(max_model_len=256), exit_on_engine_failure=False)
    with serve_in_thread(app, "public-key-server") as url, HostPage() as shop_site, HostPage() as other_site:
        database = create_engine(settings.db_url)
        shop, secret = create_key(database, "shop")
        _, public = create_key(database, "widget", site=shop.site, kind="public", origins=[shop_site.origin])
        ask = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "user": "shopper"}
        answer = httpx.post(
            f"{url}/v1/chat/completions", json=ask, headers={"Authorization": f"Bearer {secret}"}
        ).json()
        html = HOST_WITH_KEY.format(completion=answer["id"], api=url, key=public).encode()
        shop_site.page = other_site.page = html
        time.sleep(0.5)  # the CORS allowlist picks the new key's origin up (access.key_cache_s)
        page = tab.page
        page.goto(f"{other_site.origin}/shop.html")
        page.locator("#answer .loopchat-thumb-up").click()
        expect(page.locator("#answer .loopchat-feedback")).to_have_attribute("data-loopchat-state", "error")
        page.goto(f"{shop_site.origin}/shop.html")
        page.locator("#answer .loopchat-thumb-up").click()
        expect(page.locator("#answer .loopchat-feedback")).to_have_attribute("data-loopchat-state", "saved")
        rows = _poll_rows(settings.db_url, "SELECT completion_id, thumb FROM rating_event", {}, lambda r: r)
        database.dispose()
    assert [(r["completion_id"], r["thumb"]) for r in rows] == [(answer["id"], "up")]
