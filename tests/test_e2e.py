"""The real thing: `streamlit run` on the embedded model, driven by Playwright in Debian's chromium.

Types a message, watches the reply stream in, votes on it while a second, long reply is still
streaming, and checks in the database that the vote landed and the long reply was not cut off.
"""

from __future__ import annotations

import os
import shutil
import sys

import pytest

from feedback import db, store
from tests.conftest import ROOT, free_port, http_server

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync",
                 "--disable-quic"]


@pytest.fixture
def server(data_dir, monkeypatch, tmp_path):
    monkeypatch.delenv("CHAT_MODEL", raising=False)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "streamlit", "run", str(ROOT / "streamlit_app" / "app.py"),
           "--server.headless", "true", "--server.port", str(port), "--server.address",
           "127.0.0.1", "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none"]
    with http_server(cmd, url + "/_stcore/health", tmp_path / "streamlit.log", cwd=ROOT,
                     env={**os.environ, "CHAT_DATA_DIR": str(data_dir)}):
        yield url


@pytest.mark.slow
def test_chat_stream_and_vote_in_a_real_browser(server, tmp_path):
    """A vote on an earlier reply, taken while a later one streams, is shown and stored, and
    the streaming reply runs on to its end. How long a reply runs is the model's (and the CPU's)
    business, so the test asks for long stories until one is still streaming when the page has
    taken the vote (a few tries at most), and asserts nothing about the text, its length or why
    it ended beyond what the product guarantees."""
    from playwright.sync_api import expect, sync_playwright

    stories = ["Write a long story about a brave dragon who learns to fly.",
               "Tell a long, detailed tale of a sailor lost at sea for a year.",
               "Write a long story about a robot who wants to become a gardener.",
               "Describe, at length, a day in the life of a medieval baker.",
               "Write a long adventure story about two friends crossing a desert."]
    votes = [("Thumbs up", 1), ("Thumbs down", -1)]
    with sync_playwright() as p:
        browser = p.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page()
        page.goto(server)
        box = page.get_by_test_id("stChatInputTextArea")
        box.wait_for(timeout=240_000)  # first start converts the embedded model
        messages = page.get_by_test_id("stChatMessage")

        # The longest replies the page allows, so a story has room to run.
        page.get_by_text("Generation settings").click()
        tokens = page.get_by_label("Max new tokens", exact=True)
        tokens.fill("2048")
        tokens.press("Enter")

        box.fill("Say hello in five words.")
        box.press("Enter")
        expect(messages.nth(1).get_by_label("Thumbs up")).to_be_visible(timeout=120_000)
        first_reply = messages.nth(1).get_by_test_id("stMarkdown").first.inner_text()
        assert first_reply.strip()

        voted_mid_stream = None
        for attempt, story in enumerate(stories):
            label, value = votes[attempt % 2]
            box.fill(story)
            box.press("Enter")
            streaming = messages.nth(3 + 2 * attempt)
            # The reply's own text: an st.markdown element (its caption is one too, but holds
            # a caption container, not a markdown one).
            reply_text = streaming.get_by_test_id("stMarkdown").filter(
                has=page.get_by_test_id("stMarkdownContainer")).first
            expect(reply_text).to_contain_text(" ", timeout=60_000)
            seen_while_streaming = reply_text.inner_text()
            # Vote on the first reply by keyboard: a mouse click can land beside a button that
            # moves as the reply grows; the vote, once the page shows it, is what counts.
            thumb = messages.nth(1).get_by_label(label)
            thumb.press("Space")
            expect(thumb, "the page did not take the vote").to_have_attribute(
                "aria-checked", "true")
            still_streaming = streaming.get_by_label("Thumbs up").count() == 0
            expect(streaming.get_by_label("Thumbs up")).to_be_visible(timeout=180_000)
            if still_streaming:
                voted_mid_stream = (attempt, value, seen_while_streaming)
                break

        # A reply with a code block and markup, put in by editing the last reply: the browser
        # shows the code as a code block and the markup as text, never as elements.
        first = messages.last
        first.get_by_role("button", name="Edit").click()
        editor = page.get_by_label("Your better reply")
        editor.fill("Here:\n```python\nprint('hi')\n```\n<script>window.pwned=1</script> "
                    "<img src=x onerror=\"window.pwned=1\"> [x](javascript:window.pwned=1)")
        page.get_by_role("button", name="Save edit").click()
        code = first.locator("pre code")
        expect(code).to_contain_text("print('hi')", timeout=30_000)
        expect(first.get_by_test_id("stMarkdown").first).to_contain_text("<script>")
        assert first.locator("script, img[onerror]").count() == 0
        assert first.locator("a[href^='javascript']").count() == 0
        assert page.evaluate("window.pwned") is None
        page.screenshot(path=str(tmp_path / "chat.png"), full_page=True)
        browser.close()

    assert voted_mid_stream is not None, \
        f"every one of {len(stories)} stories ended before the vote was taken"
    attempt, value, seen_while_streaming = voted_mid_stream
    with db.transaction() as s:
        [conv] = store.list_conversations(session=s, user_id=1)
        turns = store.get_thread(session=s, user_id=1, conversation_id=conv.id)
    assert [t.role for t in turns] == ["user", "assistant"] * (attempt + 2)
    assert turns[1].vote == store.VoteView(value)
    edited = turns[-1]
    assert edited.source == "edit" and "print('hi')" in edited.content
    [streamed_id] = [i for i in edited.sibling_ids if i != edited.id]
    with db.transaction(write=True) as s:  # show the streamed reply again, to read it
        store.select_reply(session=s, user_id=1, message_id=streamed_id)
        streamed = store.get_thread(session=s, user_id=1, conversation_id=conv.id)[-1]
    assert streamed.generation_settings["max_new_tokens"] == 2048
    assert streamed.finish_reason in ("stop", "length"), "the streaming reply was cut off"
    assert streamed.content.strip()
    assert len(streamed.content) >= len(seen_while_streaming.strip())
