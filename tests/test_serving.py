"""The engine, prompt trimming and the generate CLI on a tiny random model; one test on the
real embedded model."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import os
import time
from pathlib import Path

import pytest

from serving.chat import PromptTooLong, build_prompt
from serving.config import GenerationSettings, InvalidSettings, ServingConfig
from serving.engine import Engine
from serving.model import load
from serving.registry import Registry
from tests.conftest import ROOT

GREEDY = GenerationSettings(temperature=0, max_new_tokens=12, repetition_penalty=1.0)


@pytest.fixture
def engine(tiny_model):
    # float32, so that a reply decoded in a batch is bit-for-bit the reply decoded alone.
    config = ServingConfig(max_batch=8, dtype="float32")
    eng = Engine(load(str(tiny_model), version="tiny", config=config), config)
    yield eng
    eng.close()


def conv(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_history_is_trimmed_oldest_first_to_fit(tiny_model):
    tok = load(str(tiny_model), version="tiny").tokenizer
    history = []
    for i in range(30):
        history += [{"role": "user", "content": f"question {i} " + "word " * 20},
                    {"role": "assistant", "content": f"answer {i} " + "word " * 20}]
    history.append({"role": "user", "content": "the last question"})
    prompt = build_prompt(tok, history, context_window=512, max_new_tokens=64,
                          system_prompt="Be kind.")
    assert prompt.trimmed > 0 and prompt.trimmed % 2 == 0
    assert len(prompt.input_ids) <= 512 - 64
    text = tok.decode(prompt.input_ids)
    assert "Be kind." in text and "the last question" in text and "question 0 " not in text
    assert build_prompt(tok, history[-3:], context_window=512, max_new_tokens=64).trimmed == 0
    with pytest.raises(PromptTooLong, match="context window"):
        build_prompt(tok, conv("word " * 600), context_window=512, max_new_tokens=64)


def test_concurrent_replies_are_the_same_as_alone(engine):
    prompts = [conv(f"Tell me about topic number {i}") for i in range(5)]
    alone = [engine.submit(p, GREEDY).wait() for p in prompts]
    replies = []
    for p in prompts:  # staggered: each newcomer joins a batch already decoding
        replies.append(engine.submit(p, GREEDY))
        time.sleep(0.01)
    assert [r.wait() for r in replies] == alone
    assert all(r.version == "tiny" and r.finish_reason in ("stop", "length") for r in replies)


def test_every_stream_progresses_while_another_is_long(engine):
    long = engine.submit(conv("long one"), GenerationSettings(temperature=0, max_new_tokens=400))
    while long.n_tokens < 3:
        time.sleep(0.005)
    short = engine.submit(conv("short one"), GREEDY)
    short.wait(timeout=60)
    assert not long.done, "the short reply had to wait for the long one"
    long.cancel()
    long.wait(timeout=60)


def test_a_reply_can_be_stopped_and_keeps_its_text(engine):
    reply = engine.submit(conv("go on"), GenerationSettings(temperature=1.0, max_new_tokens=400))
    while reply.n_tokens < 5:
        time.sleep(0.005)
    reply.cancel()
    text = reply.wait(timeout=60)
    assert reply.finish_reason == "cancelled" and 0 < reply.n_tokens < 400 and text


def test_closing_the_engine_ends_every_reply(tiny_model):
    config = ServingConfig(dtype="float32")
    eng = Engine(load(str(tiny_model), version="tiny", config=config), config)
    replies = [eng.submit(conv(f"q{i}"), GenerationSettings(max_new_tokens=400))
               for i in range(3)]
    eng.close()
    for r in replies:
        r.wait(timeout=30)
        assert r.done and r.finish_reason in ("cancelled", "stop", "length")


def test_stream_resumes_from_the_start_after_an_interruption(engine):
    reply = engine.submit(conv("hello"), GREEDY)
    first = next(reply.stream())
    reply.wait()
    assert "".join(reply.stream()) == reply.text and reply.text.startswith(first)


@pytest.mark.parametrize("kwargs", [{"temperature": -1}, {"temperature": 3}, {"top_p": 0},
                                    {"max_new_tokens": 0}, {"max_new_tokens": 10**6},
                                    {"max_new_tokens": 2.5}, {"temperature": "hot"},
                                    {"repetition_penalty": 0.5}, {"seed": -1}, {"seed": True}])
def test_bad_settings_are_refused(engine, kwargs):
    with pytest.raises(InvalidSettings, match=next(iter(kwargs))):
        engine.submit(conv("hi"), GenerationSettings(**kwargs))


def test_each_setting_is_declared_once_and_the_cli_and_page_follow_it():
    from serving.setting import allowed, help_of, limits

    # the page's widget limits and the CLI's flags come from the same declaration
    assert limits(GenerationSettings, "temperature") == (0.0, 2.0)
    assert limits(GenerationSettings, "max_new_tokens") == (1, 2048)
    usage = subprocess.run([sys.executable, "-m", "serving", "generate", "--help"], cwd=ROOT,
                           capture_output=True, text=True, timeout=60).stdout
    flat = " ".join(usage.split())
    for name in ("temperature", "top_p", "max_new_tokens", "repetition_penalty"):
        assert " ".join(help_of(GenerationSettings, name).split()) in flat, name
        assert allowed(GenerationSettings, name).describe() in flat, name
    with pytest.raises(InvalidSettings, match=r"slots must be in \[1, 256\], not 0"):
        ServingConfig(slots=0)
    with pytest.raises(InvalidSettings, match="flash_attention must be auto, on, off"):
        ServingConfig(flash_attention="maybe")


def test_seeded_sampling_is_reproducible(engine):
    s = GenerationSettings(temperature=1.0, max_new_tokens=10, seed=7)
    assert engine.submit(conv("x"), s).wait() == engine.submit(conv("x"), s).wait()


def test_the_batched_sampler_keeps_top_p_and_seeds_per_row(engine):
    """One batched top-k/top-p for the whole batch: a nucleus of one token is greedy, and a
    seeded row draws the same tokens whoever shares its batch."""
    tiny_nucleus = GenerationSettings(temperature=1.0, top_p=1e-6, max_new_tokens=10,
                                      repetition_penalty=1.0)
    greedy = GenerationSettings(temperature=0, max_new_tokens=10, repetition_penalty=1.0)
    assert engine.submit(conv("x"), tiny_nucleus).wait(60) == engine.submit(conv("x"),
                                                                            greedy).wait(60)
    seeded = GenerationSettings(temperature=1.0, max_new_tokens=10, seed=3)
    alone = engine.submit(conv("y"), seeded).wait(60)
    crowd = [engine.submit(conv(t), GenerationSettings(temperature=1.2, max_new_tokens=10))
             for t in ("a", "b")] + [engine.submit(conv("y"), seeded)]
    assert crowd[-1].wait(60) == alone


def test_generate_cli_batches_and_records_the_version(tiny_model, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"id": i, "messages": conv(f"q{i}")}) + "\n"
                           for i in range(6)) + json.dumps(conv("bare list")) + "\n")
    out = tmp_path / "out.jsonl"
    done = subprocess.run([sys.executable, "-m", "serving", "generate", "--in", str(src),
                           "--out", str(out), "--max-new-tokens", "6", "--temperature", "0"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [0, 1, 2, 3, 4, 5, 7]
    assert all(r["model_version"] == tiny_model.name and r["reply"] for r in rows)
    assert rows[0]["generation_settings"]["max_new_tokens"] == 6

    src.write_text(json.dumps(conv("ok")) + "\n" + json.dumps({"messages": [
        {"role": "assistant", "content": "no user turn"}]}) + "\n")
    bad = subprocess.run([sys.executable, "-m", "serving", "generate", "--in", str(src),
                          "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 1 and "line 2" in bad.stderr

    # an output it cannot write is named before any reply is generated, and nothing is lost
    src.write_text(json.dumps(conv("ok")) + "\n")
    (tmp_path / "a-file").write_text("kept")
    for out, says in [(tmp_path, f"{tmp_path} is a folder"),
                      (tmp_path / "a-file" / "out.jsonl", f"{tmp_path / 'a-file'} is a file"),
                      (tmp_path / "." / "in.jsonl", "the replies would overwrite")]:
        bad = subprocess.run([sys.executable, "-m", "serving", "generate", "--in", str(src),
                              "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                             timeout=300)
        assert bad.returncode == 1 and says in bad.stderr, bad.stderr
        assert "Traceback" not in bad.stderr
    assert src.read_text() == json.dumps(conv("ok")) + "\n"
    assert (tmp_path / "a-file").read_text() == "kept" and not list(tmp_path.glob("*.tmp"))

    # a setting out of its range is a usage error naming the flag, before anything is read
    for flag, value, says in [("--max-new-tokens", "0", "must be in [1, 2048], not 0"),
                              ("--temperature", "nan", "must be in [0, 2], not nan"),
                              ("--top-p", "1.5", "must be in (0, 1], not 1.5"),
                              ("--slots", "0", "must be in [1, 256], not 0"),
                              ("--seed", "x", "invalid int value: 'x'")]:
        bad = subprocess.run([sys.executable, "-m", "serving", "generate", "--in", "missing",
                              "--out", str(tmp_path / "o.jsonl"), flag, value], cwd=ROOT,
                             capture_output=True, text=True, timeout=300)
        assert bad.returncode == 2 and f"argument {flag}: {says}" in bad.stderr, bad.stderr


def test_registry_current_moves_atomically_and_defaults_to_base(tiny_model):
    reg = Registry()
    assert reg.current_name() == tiny_model.name
    with pytest.raises(LookupError, match="No model version"):
        reg.set_current("nope")


@pytest.mark.parametrize("backend", ["transformers", "llama.cpp"])
def test_a_promoted_version_is_picked_up_without_a_restart(tiny_model, backend):
    import shutil

    from serving.backends import follow_current, open_engine

    reg = Registry()
    staging = reg.staging("v2")
    shutil.copytree(tiny_model, staging.model)
    reg.register("v2", staging, {"parent": tiny_model.name, "kind": "full"})
    config = ServingConfig(dtype="float32")
    eng = open_engine(reg, config=config, backend=backend)
    assert eng.kind == backend
    follow_current(eng, reg, interval_s=0.05, config=config)
    try:
        streaming = eng.submit(conv("long"), GenerationSettings(temperature=0,
                                                                max_new_tokens=300))
        while streaming.n_tokens < 3:
            time.sleep(0.005)
        reg.set_current("v2", why="test")
        deadline = time.monotonic() + 30
        while eng.version != "v2":
            assert time.monotonic() < deadline, "the new version was not picked up"
            time.sleep(0.05)
        after = eng.submit(conv("next"), GREEDY)
        after.wait(timeout=60)
        streaming.wait(timeout=60)
    finally:
        eng.close()
    assert streaming.version == tiny_model.name and streaming.finish_reason != "error"
    assert streaming.n_tokens == 300 or streaming.finish_reason == "stop"
    assert after.version == "v2"
    assert reg.history()[-1]["to"] == "v2"


@pytest.mark.slow
def test_the_embedded_model_is_served_by_llama_cpp_from_its_own_file(monkeypatch):
    """What the product guarantees of the real model, not what it happens to say."""
    from serving.backends import open_engine
    from serving.model import EMBEDDED_NAME, embedded_gguf_path

    monkeypatch.delenv("CHAT_MODEL", raising=False)
    eng = open_engine()
    try:
        assert eng.kind == "llama.cpp" and "smollm2-135m-instruct.q8_0.gguf" in eng.describe()
        assert embedded_gguf_path().is_file()
        reply = eng.submit(conv("What is the capital of France?"),
                           GenerationSettings(temperature=0, max_new_tokens=24))
        reply.wait(timeout=120)
    finally:
        eng.close()
    assert reply.version == EMBEDDED_NAME and reply.finish_reason in ("stop", "length")
    assert 1 <= reply.n_tokens <= 24 and re.search(r"\w", reply.text)
    # re-encoded from the shipped GGUF: no transformers conversion was needed to serve it
    assert not (Path(os.environ["CHAT_DATA_DIR"]) / "models" / "base" / EMBEDDED_NAME).exists()


# ---- llama.cpp ---------------------------------------------------------------------------------

@pytest.fixture
def llama(tiny_model):
    from serving.backends import open_engine
    # float32 weights: the crowd test below compares a batched reply with the solo one
    config = ServingConfig(slots=4, gguf_quant="F32")
    eng = open_engine(Registry(), config=config, backend="llama.cpp")
    yield eng
    eng.close()


def test_a_version_written_as_gguf_answers_as_transformers_does(tiny_model, tmp_path):
    """The converter (names, the q/k permutation, tied head, tokenizer) is exact: written as
    float32, llama.cpp's greedy reply is the transformers engine's, token for token."""
    from serving.gguf_export import export_gguf
    from serving.llamacpp import GGUFModel, LlamaEngine
    from serving.model import embedded_gguf_path

    config = ServingConfig(dtype="float32")
    loaded = load(str(tiny_model), version="tiny", config=config)
    path = export_gguf(loaded.model, tmp_path / "tiny.gguf", name="tiny",
                       tokenizer_gguf=embedded_gguf_path(), quant="F32")
    torch_engine = Engine(loaded, config)
    llama_engine = LlamaEngine(GGUFModel(path, version="tiny", tokenizer=loaded.tokenizer,
                                         config=config, threads=1), config)
    try:
        for text in ("hello", "What is the capital of France?", "Ünïcode ✓ text"):
            a = torch_engine.submit(conv(text), GREEDY)
            b = llama_engine.submit(conv(text), GREEDY)
            assert b.wait(60) == a.wait(60) and b.n_tokens == a.n_tokens
    finally:
        torch_engine.close()
        llama_engine.close()


def test_llama_cpp_decodes_a_crowd_as_it_decodes_each_alone(llama):
    prompts = ["one", "a longer question about several different things", "three", "4"]
    alone = [llama.submit(conv(p), GREEDY).wait(60) for p in prompts]
    crowd = [llama.submit(conv(p), GREEDY) for p in prompts * 2]  # more than the 4 slots
    assert [r.wait(60) for r in crowd] == alone * 2
    assert all(r.finish_reason == "length" and r.version == llama.version for r in crowd)


def test_llama_cpp_weight_repacking_follows_its_setting(tiny_model, llama, monkeypatch):
    """`CHAT_LLAMA_REPACK`: off serves the weights as stored (and says so), a bad value is
    refused with the allowed ones, and auto repacks unless llama.cpp reports AMX (whose path
    crashed the process on the first reply, on a Xeon VM)."""
    import llama_cpp

    from serving.backends import open_engine
    from serving.hardware import BadSetting
    from serving.llamacpp import repack_setting

    config = ServingConfig(slots=4, gguf_quant="F32")
    monkeypatch.setenv("CHAT_LLAMA_REPACK", " OFF ")
    plain = open_engine(Registry(), config=config, backend="llama.cpp")
    try:
        assert plain.describe().endswith(", weights not repacked")
        assert plain.submit(conv("one"), GREEDY).wait(60) == llama.submit(conv("one"),
                                                                          GREEDY).wait(60)
    finally:
        plain.close()
    status = subprocess.run([sys.executable, "-m", "training", "status"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert "llama.cpp weight repacking off (set by CHAT_LLAMA_REPACK)" in status.stdout
    monkeypatch.setenv("CHAT_LLAMA_REPACK", "sideways")
    with pytest.raises(BadSetting, match="CHAT_LLAMA_REPACK must be auto, on or off, not "
                                         "'sideways'"):
        open_engine(Registry(), config=config, backend="llama.cpp")
    status = subprocess.run([sys.executable, "-m", "training", "status"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert status.returncode == 1 and "CHAT_LLAMA_REPACK must be" in status.stderr
    monkeypatch.setenv("CHAT_LLAMA_REPACK", "auto")
    amx = "AMX_INT8 = 1" in llama_cpp.llama_print_system_info().decode()
    assert repack_setting()[0] is not amx
    assert ("AMX" in repack_setting()[1]) is amx


def test_default_dtype_is_bfloat16_only_where_this_process_can_use_it(monkeypatch):
    """`CHAT_DTYPE=auto`: bfloat16 where the CPU has it natively and torch may use it; oneDNN
    capped at AVX2 (as on a CPU without it) makes it float32, and `training status` says why."""
    import torch

    from serving.hardware import BF16_CPU_FLAGS, cpu_flags

    if torch.cuda.is_available():
        pytest.skip("with a GPU, its bfloat16 decides the default, not the CPU's")
    native = bool(BF16_CPU_FLAGS & cpu_flags())
    monkeypatch.delenv("CHAT_DTYPE", raising=False)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)

    def machine() -> str:
        out = subprocess.run([sys.executable, "-m", "training", "status"], cwd=ROOT,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        return next(line for line in out.stdout.splitlines() if line.startswith("machine:"))

    assert machine().startswith("machine: bfloat16 " if native else "machine: float32 ")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    capped = machine()
    assert capped.startswith("machine: float32 ")
    assert ("ONEDNN_MAX_CPU_ISA=AVX2" in capped) is native
    monkeypatch.setenv("CHAT_DTYPE", "bfloat16")  # a choice is still obeyed
    assert machine().startswith("machine: bfloat16 (set by CHAT_DTYPE)")


def test_llama_cpp_reuses_a_conversations_evaluated_prefix(llama):
    history = conv("first question")
    first = llama.submit(history, GREEDY)
    history += [{"role": "assistant", "content": first.wait(60)},
                {"role": "user", "content": "and a second one"}]
    before = dict(llama.stats)
    llama.submit(history, GREEDY).wait(60)
    total = llama.stats["prompt_tokens"] - before["prompt_tokens"]
    reused = llama.stats["prompt_tokens_reused"] - before["prompt_tokens_reused"]
    assert reused >= 10 and reused > total / 2


def test_llama_cpp_stops_a_reply_when_asked_and_serves_the_next(llama):
    reply = llama.submit(conv("long"), GenerationSettings(temperature=0, max_new_tokens=400))
    while reply.n_tokens < 3:
        time.sleep(0.005)
    reply.cancel()
    reply.wait(60)
    assert reply.finish_reason == "cancelled" and 3 <= reply.n_tokens < 400
    assert llama.submit(conv("next"), GREEDY).wait(60)


# ---- registry hardening ------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["../outside", "/tmp/abs", "a/b", "..", "x..y", "", "-x",
                                  "a\nb"])
def test_version_names_cannot_escape_the_registry(tiny_model, name):
    reg = Registry()
    with pytest.raises(LookupError, match="not a version name"):
        reg.set_current(name)
    with pytest.raises(LookupError, match="not a version name"):
        reg.get(name)
    assert not (reg.root / "CURRENT").exists()


def test_rollback_to_a_path_is_refused_by_the_cli(tiny_model):
    done = subprocess.run([sys.executable, "-m", "training", "rollback", "../outside"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "not a version name" in done.stderr
    assert "Traceback" not in done.stderr and "now serves" not in done.stdout


def test_a_data_folder_in_the_way_is_named_not_a_bare_file_exists(data_dir, tmp_path,
                                                                   monkeypatch):
    from serving.model import embedded_checkpoint
    from training.evaluate import Kept

    # its models folder a link to a disk that is not there: the embedded model's conversion
    # and the base's GGUF name the link and where it points
    data_dir.mkdir(parents=True)
    (data_dir / "models").symlink_to(tmp_path / "unmounted" / "models")
    for make in (lambda: embedded_checkpoint(data_dir),
                 lambda: Registry().gguf_path(quant="Q8_0")):
        with pytest.raises(NotADirectoryError, match=re.escape(
                f"{data_dir / 'models'} is a link to {tmp_path / 'unmounted' / 'models'}, "
                f"which does not exist")):
            make()
    assert not (tmp_path / "unmounted").exists()  # nothing made behind the link
    # the rounds' own folders: the lock's and schedule's a link to nothing, the reports' a file
    def training(*command: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "training", *command], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)

    (data_dir / "training").symlink_to(tmp_path / "unmounted" / "training")
    for command in ("run", "schedule", "prepare"):
        done = training(command)
        assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
        assert f"{data_dir / 'training'} is a link to {tmp_path / 'unmounted'}" in done.stderr
    (data_dir / "training").unlink()
    (data_dir / "reports").write_text("not a folder")
    done = training("run")
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert f"{data_dir / 'reports'} is a file, not a folder" in done.stderr
    (data_dir / "reports").unlink()
    # the gate's kept replies and log-probabilities: their folder a link to nothing
    (data_dir / "training").mkdir(exist_ok=True)  # made by the run above
    (data_dir / "training" / "gate_cache").symlink_to(tmp_path / "unmounted" / "gate")
    kept = Kept(data_dir / "training" / "gate_cache", "smollm2")
    kept.values["a"] = 1.0
    with pytest.raises(NotADirectoryError, match=re.escape(
            f"{data_dir / 'training' / 'gate_cache'} is a link to")):
        kept.save()
    assert not (tmp_path / "unmounted").exists()
    # the versions folder a file: the CLIs say so and exit 1, without a traceback
    (data_dir / "versions").rmdir()  # made, empty, by the Registry above
    (data_dir / "versions").write_text("not a folder")
    done = training("rollback", "base")
    assert done.returncode == 1, done.stderr
    assert f"{data_dir / 'versions'} is a file, not a folder" in done.stderr
    assert "Traceback" not in done.stderr
    # the data folder itself a file, or a link to nothing: named too, nothing made
    monkeypatch.setenv("CHAT_DATA_DIR", str(data_dir / "versions"))
    with pytest.raises(NotADirectoryError, match="is a file, not a folder"):
        Registry()
    assert (data_dir / "versions").read_text() == "not a folder"  # left as it was
    (tmp_path / "linked").symlink_to(tmp_path / "unmounted" / "data")
    monkeypatch.setenv("CHAT_DATA_DIR", str(tmp_path / "linked"))
    with pytest.raises(NotADirectoryError, match=re.escape(
            f"{tmp_path / 'linked'} is a link to {tmp_path / 'unmounted' / 'data'}, which")):
        Registry()
    assert not (tmp_path / "unmounted").exists()


@pytest.mark.parametrize("content", [b"deleted-version\n", b"\xff\xfe\x00bad", b"../../etc\n"])
def test_an_unusable_current_serves_the_base_and_says_how_to_fix_it(tiny_model, content):
    reg = Registry()
    (reg.root / "CURRENT").write_bytes(content)
    (reg.root / "history.jsonl").write_text('{"from": "a"}\nnot json\n')
    assert reg.current_name() == tiny_model.name and reg.previous() is None
    assert "python -m training rollback" in reg.current_problem()
    status = subprocess.run([sys.executable, "-m", "training", "status"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert status.returncode == 0 and "warning:" in status.stdout
    from tests.test_app import open_page
    at = open_page()  # the page starts, on the base model, with the warning
    assert any("python -m training rollback" in w.value for w in at.warning)


@pytest.mark.parametrize("line,why", [
    (b"[" * 100_000, "nested more than"),
    (b'{"messages": [{"role": "user", "content": "q"}], "id": ' + b"9" * 5000 + b"}",
     "cannot be read"),
    (b'{"messages": [{"role": "user", "content": "caf\xe9"}]}', "not UTF-8"),
    (b'{"system": 1, "messages": [{"role": "user", "content": "q"}]}', '"system" must be text'),
    (b'{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}',
     "message 2 must be"),
    (b'{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""},'
     b' {"role": "user", "content": "b"}]}', "message 2 has no text"),
    (b'{"id": null, "messages": [{"role": "user", "content": "q"}]}', '"id" must be'),
    (b'{"messages": [{"role": "user", "content": "\\ud800"}]}', "lone UTF-16 surrogate"),
])
def test_generate_refuses_each_bad_line_by_number_before_generating(tmp_path, line, why):
    from serving.__main__ import InputError, read_conversations
    src = tmp_path / "in.jsonl"
    src.write_bytes(b'{"messages": [{"role": "user", "content": "fine"}]}\n' + line + b"\n")
    with pytest.raises(InputError, match="line 2") as caught:
        read_conversations(src)
    assert why in str(caught.value)
