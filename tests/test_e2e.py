"""The real thing: `streamlit run` on the embedded model, driven by Playwright in Debian's chromium.

Types a message, watches the reply stream in, votes on it while a second, long reply is still
streaming, and checks in the database that the vote landed and the long reply was not cut off.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from feedback import db, store
from tests.conftest import ROOT

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync",
                 "--disable-quic"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(data_dir, monkeypatch, tmp_path):
    monkeypatch.delenv("CHAT_MODEL", raising=False)
    port = free_port()
    log = open(tmp_path / "streamlit.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", str(ROOT / "streamlit_app" / "app.py"),
         "--server.headless", "true", "--server.port", str(port), "--server.address",
         "127.0.0.1", "--browser.gatherUsageStats", "false",
         "--server.fileWatcherType", "none"],
        cwd=ROOT, env={**os.environ, "CHAT_DATA_DIR": str(data_dir)}, stdout=log,
        stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(url + "/_stcore/health", timeout=2)
            break
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, \
                (tmp_path / "streamlit.log").read_text()
            time.sleep(0.5)
    yield url
    proc.terminate()
    proc.wait(timeout=30)
    log.close()


@pytest.mark.slow
def test_chat_stream_and_vote_in_a_real_browser(server, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page()
        page.goto(server)
        box = page.get_by_test_id("stChatInputTextArea")
        box.wait_for(timeout=240_000)  # first start converts the embedded model
        messages = page.get_by_test_id("stChatMessage")

        # Temperature 0 (slider to its start with the keyboard): greedy replies, so the story
        # below always runs to the 256-token cap (~15 s here) and the vote lands mid-stream.
        page.get_by_text("Generation settings").click()
        page.get_by_role("slider").press("Home")
        expect(page.get_by_test_id("stSliderThumbValue")).to_have_text("0.00")

        box.fill("Say hello in five words.")
        box.press("Enter")
        expect(messages.nth(1).get_by_label("Thumbs up")).to_be_visible(timeout=120_000)
        first_reply = messages.nth(1).get_by_test_id("stMarkdown").first.inner_text()
        assert first_reply.strip()

        box.fill("Write a long story about a brave dragon who learns to fly.")
        box.press("Enter")
        streaming = messages.nth(3)
        expect(streaming.get_by_test_id("stMarkdown")).to_contain_text(" ", timeout=60_000)
        seen_while_streaming = streaming.get_by_test_id("stMarkdown").first.inner_text()
        # Vote on the first reply while the second is still streaming. By keyboard: a mouse
        # click there was not taken in 1 run of ~20 (the page moves as the reply grows and the
        # click can land beside the button); the vote, once the page shows it, is what counts.
        thumb = messages.nth(1).get_by_label("Thumbs up")
        thumb.press("Space")
        expect(thumb, "the page did not take the vote").to_have_attribute("aria-checked", "true")
        assert messages.nth(3).get_by_label("Thumbs up").count() == 0, "it had already ended"
        expect(messages.nth(3).get_by_label("Thumbs up")).to_be_visible(timeout=180_000)
        page.screenshot(path=str(tmp_path / "chat.png"), full_page=True)
        browser.close()

    with db.transaction() as s:
        [conv] = store.list_conversations(session=s, user_id=1)
        turns = store.get_thread(session=s, user_id=1, conversation_id=conv.id)
    assert [t.role for t in turns] == ["user", "assistant", "user", "assistant"]
    assert turns[1].vote == store.VoteView(1)
    assert turns[1].content.strip()[:20] in first_reply
    assert turns[3].generation_settings["temperature"] == 0.0
    assert turns[3].finish_reason == "length"
    assert len(turns[3].content) >= len(seen_while_streaming.strip())
