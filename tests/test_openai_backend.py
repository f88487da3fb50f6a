"""The `openai` backend against a real OpenAI-compatible server: llama-cpp-python's own server,
started here on the tiny model written as GGUF. The page and `serving generate` use it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from serving.config import GenerationSettings
from serving.registry import Registry
from tests.conftest import ROOT, free_port, http_server


# `python -m llama_cpp.server`, its weights repacked as our engine's (`CHAT_LLAMA_REPACK`: on a
# CPU with AMX its default crashed, and the server has no switch for it)
SERVER = ("import runpy; from serving.llamacpp import repack_as_set_for_library; "
          "repack_as_set_for_library(); runpy.run_module('llama_cpp.server', run_name='__main__')")


@pytest.fixture
def server(tiny_model, tmp_path, monkeypatch):
    gguf = Registry().gguf_path()
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1"
    cmd = [sys.executable, "-c", SERVER, "--model", str(gguf), "--host", "127.0.0.1",
           "--port", str(port), "--n_ctx", "512", "--n_threads", "1",
           "--interrupt_requests", "False"]  # its default cuts a stream off for the next
    with http_server(cmd, url + "/models", tmp_path / "server.log"):
        monkeypatch.setenv("CHAT_BACKEND", "openai")
        monkeypatch.setenv("CHAT_OPENAI_BASE_URL", url)
        yield url


def conv(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_replies_stream_from_an_openai_compatible_server(server, tiny_model):
    from serving.backends import open_engine

    engine = open_engine()
    try:
        assert engine.kind == "openai" and server in engine.describe()
        settings = GenerationSettings(temperature=0, max_new_tokens=12)
        replies = [engine.submit(conv(f"question {i}"), settings) for i in range(3)]
        for r in replies:
            r.wait(120)
        # (the tiny random model may end a reply at once: its text is not the point here)
        assert all(r.finish_reason in ("stop", "length") for r in replies), \
            [(r.finish_reason, r.error, r.text) for r in replies]
        assert all(r.version == tiny_model.name and r.n_tokens <= 12 for r in replies)
        # greedy through the same server twice: the same text (the server is the arbiter)
        again = engine.submit(conv("question 0"), settings)
        assert again.wait(120) == replies[0].text
    finally:
        engine.close()


def test_serving_generate_and_the_page_use_the_server(server, tiny_model, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"id": "a", "messages": conv("hi")}) + "\n")
    done = subprocess.run([sys.executable, "-m", "serving", "generate", "--in", str(src),
                           "--out", str(tmp_path / "out.jsonl"), "--max-new-tokens", "6"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    row = json.loads((tmp_path / "out.jsonl").read_text())
    assert row["model_version"] == tiny_model.name and row["finish_reason"] in ("stop", "length")

    from tests.test_app import open_page, send, thread
    log = tmp_path / "server.log"
    before = log.read_text().count("POST /v1/chat/completions")
    at = send(open_page(), "hello from the page")
    assert log.read_text().count("POST /v1/chat/completions") == before + 1
    turns = thread()
    assert turns[0].content == "hello from the page"
    # stored with the version that wrote it, or (an empty reply) said on the page
    assert (len(turns) == 2 and turns[1].model_version == tiny_model.name) or \
        any("empty reply" in e.value for e in at.error)


def test_a_server_that_is_down_fails_the_reply_with_a_clear_message(tiny_model, monkeypatch):
    from serving.backends import open_engine

    monkeypatch.setenv("CHAT_BACKEND", "openai")
    monkeypatch.setenv("CHAT_OPENAI_BASE_URL", f"http://127.0.0.1:{free_port()}/v1")
    engine = open_engine()
    try:
        reply = engine.submit(conv("hi"), GenerationSettings(max_new_tokens=4))
        reply.wait(60)
    finally:
        engine.close()
    assert reply.finish_reason == "error" and "failed" in reply.error
