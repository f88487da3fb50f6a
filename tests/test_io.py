"""Import and export through the real CLI and store: JSONL in, TRL-format JSONL out."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from datasets import load_dataset

from feedback import db, io, store
from tests.conftest import ROOT

GOOD = [
    {"user": "alice", "title": "Tides", "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What causes tides?"},
        {"role": "assistant", "content": "The Moon's gravity.", "model_version": "v1",
         "vote": {"value": 1, "reasons": ["accurate"], "comment": "nice"},
         "rejected": ["Wind."]},
        {"role": "user", "content": "And the Sun?"},
        {"role": "assistant", "content": "It has no effect.", "vote": -1}]},
    {"user": "bob", "messages": [{"role": "user", "content": "Hi"},
                                 {"role": "assistant", "content": "Hello", "vote": 1}]},
]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "feedback", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def write_lines(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_import_then_export_gives_trl_datasets(tmp_path, db_url):
    src = write_lines(tmp_path / "in.jsonl", GOOD)
    done = cli("--database-url", db_url, "import", str(src))
    assert done.returncode == 0, done.stderr
    assert "2 conversations" in done.stdout and "3 votes" in done.stdout
    done = cli("--database-url", db_url, "export", "--votes-out", str(tmp_path / "v.jsonl"),
               "--pairs-out", str(tmp_path / "p.jsonl"))
    assert done.returncode == 0, done.stderr

    votes = load_dataset("json", data_files=str(tmp_path / "v.jsonl"), split="train")
    assert votes.num_rows == 3
    assert {"prompt", "completion", "label"} <= set(votes.column_names)
    second = votes.filter(lambda r: r["completion"][0]["content"] == "It has no effect.")[0]
    assert second["label"] is False
    assert second["prompt"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What causes tides?"},
        {"role": "assistant", "content": "The Moon's gravity."},
        {"role": "user", "content": "And the Sun?"}]

    pairs = load_dataset("json", data_files=str(tmp_path / "p.jsonl"), split="train")
    assert pairs.num_rows == 1
    assert pairs[0]["chosen"] == [{"role": "assistant", "content": "The Moon's gravity."}]
    assert pairs[0]["rejected"] == [{"role": "assistant", "content": "Wind."}]
    assert pairs[0]["prompt"][-1] == {"role": "user", "content": "What causes tides?"}

    done = cli("--database-url", db_url, "stats", "--json")
    stats = json.loads(done.stdout)
    assert (stats["votes_up"], stats["votes_down"], stats["users"]) == (2, 1, 2)
    assert stats["by_model_version"]["v1"] == {"up": 1, "down": 0, "withdrawn": 0,
                                               "approval": 1.0}
    assert cli("--database-url", db_url, "stats").returncode == 0


@pytest.mark.parametrize("bad,why", [
    ("{not json", "not valid JSON"),
    (json.dumps({"messages": []}), "non-empty list"),
    (json.dumps({"messages": [{"role": "assistant", "content": "x"}]}), "expected 'user'"),
    (json.dumps({"messages": [{"role": "user", "content": "  "}]}), "empty"),
    (json.dumps({"messages": [{"role": "user", "content": "q"},
                              {"role": "assistant", "content": "a", "vote": 5}]}), "vote"),
    (json.dumps({"messages": [{"role": "user", "content": "q"},
                              {"role": "assistant", "content": "a", "vote": 1,
                               "rejected": "oops"}]}), '"rejected" must be a list'),
    (json.dumps([1, 2]), "JSON object"),
])
def test_a_malformed_line_is_reported_and_nothing_is_imported(tmp_path, db_url, bad, why):
    src = write_lines(tmp_path / "in.jsonl", [GOOD[0], GOOD[1], bad])
    done = cli("--database-url", db_url, "import", str(src))
    assert done.returncode == 1
    assert "line 3" in done.stderr and why in done.stderr
    with db.transaction(url=db_url) as s:
        assert io.stats(session=s)["conversations"] == 0


def test_export_skips_withdrawn_votes_and_counts_a_changed_vote_once(db_url):
    with db.transaction(write=True, url=db_url) as s:
        uid = store.get_or_create_user(session=s, username="alice").id
        conv = store.create_conversation(session=s, user_id=uid)
        q = store.add_user_message(session=s, user_id=uid, conversation_id=conv.id, content="q")
        a = store.add_reply(session=s, user_id=uid, parent_id=q.id, content="a1",
                            model_version="v", generation_settings={})
        b = store.add_reply(session=s, user_id=uid, parent_id=q.id, content="a2",
                            model_version="v", generation_settings={}, source="regenerate")
        store.set_vote(session=s, user_id=uid, message_id=a.id, value=1)
        store.set_vote(session=s, user_id=uid, message_id=a.id, value=-1)
        store.set_vote(session=s, user_id=uid, message_id=b.id, value=1)
        store.set_vote(session=s, user_id=uid, message_id=b.id, value=None)
    with db.transaction(url=db_url) as s:
        rows = list(io.iter_vote_rows(session=s))
    assert [(r["message_id"], r["label"]) for r in rows] == [(a.id, False)]


def test_cli_usage_errors(tmp_path):
    assert cli("export").returncode == 1
    assert "--votes-out" in cli("export").stderr
    missing = cli("import", str(tmp_path / "nope.jsonl"))
    assert missing.returncode == 1 and "not a file" in missing.stderr
    assert cli("--help").returncode == 0


def test_a_byte_order_mark_opening_the_file_is_skipped_elsewhere_refused(tmp_path):
    lines = [json.dumps(r).encode() for r in GOOD]
    src = tmp_path / "bom.jsonl"
    src.write_bytes(b"\xef\xbb\xbf" + lines[0] + b"\n" + b"\xef\xbb\xbf" + lines[1] + b"\n")
    done = cli("import", str(src))  # a BOM inside the file: refused, nothing imported
    assert done.returncode == 1 and "line 2" in done.stderr and "BOM" in done.stderr
    src.write_bytes(b"\xef\xbb\xbf" + b"\r\n".join(lines) + b"\r\n")  # as Windows writes it
    done = cli("import", str(src))
    assert done.returncode == 0 and "2 conversations" in done.stdout, done.stderr


def test_export_names_an_output_it_cannot_write_and_leaves_nothing_behind(tmp_path):
    assert cli("import", str(write_lines(tmp_path / "in.jsonl", GOOD))).returncode == 0
    w = tmp_path / "w"  # the default store (CHAT_DATA_DIR) is beside it
    w.mkdir()
    (w / "a-file").write_text("kept")
    (w / "out").mkdir()
    (w / "gone").symlink_to(tmp_path / "unmounted")
    for args, says in [
            (["--votes-out", str(w / "out")], f"{w / 'out'} is a folder"),
            (["--votes-out", str(w / "a-file" / "v.jsonl")],
             f"{w / 'a-file'} is a file, not a folder"),
            (["--pairs-out", str(w / "gone" / "p.jsonl")],
             f"{w / 'gone'} is a link to {tmp_path / 'unmounted'}, which does not exist"),
            (["--votes-out", str(w / "both.jsonl"), "--pairs-out", f"{w}/./both.jsonl"],
             "the pairs would overwrite the votes")]:
        done = cli("export", *args)
        assert done.returncode == 1 and says in done.stderr, (args, done.stderr)
        assert "Traceback" not in done.stderr
    # nothing written, made or left half-written
    assert sorted(p.name for p in w.iterdir()) == ["a-file", "gone", "out"]
    assert (w / "a-file").read_text() == "kept" and not any((w / "out").iterdir())
    assert not (tmp_path / "unmounted").exists()
    # a folder that is missing is made, as before
    assert cli("export", "--votes-out", str(w / "new" / "v.jsonl")).returncode == 0
    assert len((w / "new" / "v.jsonl").read_text().splitlines()) == 3


def test_each_exported_prompt_has_the_system_prompt_its_reply_was_written_under(db_url):
    """Changing the system prompt mid-conversation must not rewrite older replies' prompts."""
    with db.transaction(write=True, url=db_url) as s:
        uid = store.get_or_create_user(session=s, username="alice").id
        conv = store.create_conversation(session=s, user_id=uid,
                                         settings={"system_prompt": "Be brief."})
        q1 = store.add_user_message(session=s, user_id=uid, conversation_id=conv.id, content="q1")
        r1 = store.add_reply(session=s, user_id=uid, parent_id=q1.id, content="r1",
                             model_version="v", generation_settings={"system_prompt": "Be brief."})
        store.update_conversation_settings(session=s, user_id=uid, conversation_id=conv.id,
                                           settings={"system_prompt": "Be a pirate."})
        q2 = store.add_user_message(session=s, user_id=uid, conversation_id=conv.id, content="q2")
        r2 = store.add_reply(session=s, user_id=uid, parent_id=q2.id, content="r2",
                             model_version="v",
                             generation_settings={"system_prompt": "Be a pirate."})
        r2b = store.add_reply(session=s, user_id=uid, parent_id=q2.id, content="r2b",
                              model_version="v", generation_settings={"system_prompt": ""},
                              source="regenerate")
        for m in (r1, r2, r2b):
            store.set_vote(session=s, user_id=uid, message_id=m.id, value=1)
    with db.transaction(url=db_url) as s:
        prompts = {r["message_id"]: r["prompt"] for r in io.iter_vote_rows(session=s)}
    assert prompts[r1.id] == [{"role": "system", "content": "Be brief."},
                              {"role": "user", "content": "q1"}]
    assert prompts[r2.id][0] == {"role": "system", "content": "Be a pirate."}
    assert prompts[r2.id][1:] == [{"role": "user", "content": "q1"},
                                  {"role": "assistant", "content": "r1"},
                                  {"role": "user", "content": "q2"}]
    assert prompts[r2b.id][0] == {"role": "user", "content": "q1"}  # written with none


# ---- every field checked before anything is written (the fuzzed minimal cases) ----------------

def _line(**fields) -> str:
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    msgs[1].update(fields.pop("reply", {}))
    return json.dumps({"messages": msgs, **fields})


@pytest.mark.parametrize("line,why", [
    ("[" * 100_000, "nested more than"),
    ('{"messages": [], "n": ' + "7" * 5000 + "}", "cannot be read"),
    (_line(reply={"vote": {"value": 1, "reasons": None}}), "reasons of a vote"),
    (_line(reply={"vote": {"value": 1, "reasons": 5}}), "reasons of a vote"),
    (_line(reply={"vote": {"value": 1, "reasons": [1]}}), "reasons of a vote"),
    (_line(reply={"vote": {"value": 1, "reasons": [{"x": 1}]}}), "reasons of a vote"),
    (_line(reply={"vote": {"value": 1, "comment": 5}}), "comment is text"),
    (_line(reply={"vote": {"value": 1, "comment": {"c": 1}}}), "comment is text"),
    (_line(reply={"vote": True}), "thumbs up (1)"),
    (_line(title=5), '"title" must be a string'),
    (_line(title=["t"]), '"title" must be a string'),
    (_line(title="   "), '"title" is empty'),
    (_line(title="t" * 201), "limit is 200"),
    (_line(reply={"model_version": 9223372036854775808}), '"model_version" must be a string'),
    (_line(reply={"model_version": {}}), '"model_version" must be a string'),
    (_line(reply={"rejected": ["x" * 8001]}), "limit is 8,000"),
    (_line(user="u" * 321), "limit is 320"),
    (_line(user="\ud800"), "lone UTF-16 surrogate"),
    (_line(title="\ud800"), "lone UTF-16 surrogate"),
    (_line(reply={"content": "\ud800"}), "lone UTF-16 surrogate"),
    (json.dumps({"messages": [{"role": "system", "content": "s" * 8001},
                              {"role": "user", "content": "q"}]}), "limit is 8,000"),
    (_line(reply={"reasons": ["clear"]}), "unknown field"),
])
def test_every_bad_field_is_named_with_its_line_and_nothing_is_written(tmp_path, line, why):
    from feedback.errors import InvalidInput
    src = tmp_path / "in.jsonl"
    src.write_text(_line() + "\n" + line.replace("\\ud800", "\\ud800") + "\n")
    with pytest.raises(InvalidInput, match="line 2") as caught, db.transaction(write=True) as s:
        io.import_jsonl(session=s, path=src)
    assert why in str(caught.value)
    with db.transaction() as s:
        assert io.stats(session=s)["conversations"] == 0


def test_a_file_that_is_not_utf8_is_refused_with_its_line(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_bytes(_line().encode() + b"\n" + _line(title="caf\xe9").encode()[:-30]
                    + b"\xe9\xff" + b"\n")
    done = cli("import", str(src))
    assert done.returncode == 1 and "line 2: not UTF-8" in done.stderr
    assert "Traceback" not in done.stderr and "cannot be reached" not in done.stderr


def test_a_vote_during_a_large_import_waits_and_lands(tmp_path):
    """The import holds the write lock briefly (multi-row inserts); a vote from the page in
    the meantime waits for it and is stored."""
    import threading
    with db.transaction(write=True) as s:
        uid = store.get_or_create_user(session=s, username="alice").id
        conv = store.create_conversation(session=s, user_id=uid)
        q = store.add_user_message(session=s, user_id=uid, conversation_id=conv.id, content="q")
        reply = store.add_reply(session=s, user_id=uid, parent_id=q.id, content="a",
                                model_version="v", generation_settings={})
    rows = [{"user": f"u{i % 7}", "messages": [
        {"role": "user", "content": f"q{i}"},
        {"role": "assistant", "content": "a", "vote": 1, "rejected": ["b"]}]}
        for i in range(3000)]
    src = write_lines(tmp_path / "big.jsonl", rows)
    done = threading.Event()

    def importer():
        with db.transaction(write=True) as s:
            counts = io.import_jsonl(session=s, path=src)
        assert counts == {"conversations": 3000, "replies": 3000, "preferences": 3000,
                          "votes": 3000}
        done.set()

    t = threading.Thread(target=importer)
    t.start()
    with db.transaction(write=True) as s:
        store.set_vote(session=s, user_id=uid, message_id=reply.id, value=1)
    t.join()
    assert done.is_set()
    with db.transaction() as s:
        assert store.get_vote(session=s, user_id=uid, message_id=reply.id).value == 1
        assert io.stats(session=s)["conversations"] == 3001
