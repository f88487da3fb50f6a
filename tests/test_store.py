"""The store against real databases: a SQLite file and a PostgreSQL server (see `db_url`)."""

from __future__ import annotations

import sqlite3
import threading

import pytest
from sqlalchemy import create_engine, inspect

from feedback import db, store
from feedback.errors import InvalidInput, NotFound, StoreUnavailable

EXPECTED_COLUMNS = {
    "users": ["id", "username", "display_name", "created_at"],
    "conversations": ["id", "user_id", "title", "settings", "created_at", "updated_at"],
    "messages": ["id", "conversation_id", "parent_id", "role", "content", "source", "selected",
                 "model_version", "generation_settings", "finish_reason", "edited_from_id",
                 "created_at"],
    "votes": ["id", "message_id", "user_id", "value", "reasons", "comment", "created_at",
              "updated_at"],
    "vote_events": ["id", "vote_id", "value", "reasons", "comment", "created_at"],
    "preferences": ["id", "user_id", "conversation_id", "chosen_id", "rejected_id", "source",
                    "created_at"],
}


def test_migrating_a_blank_database_creates_exactly_the_schema(db_url):
    db.get_engine(db_url)
    insp = inspect(create_engine(db_url))
    tables = set(insp.get_table_names()) - {"alembic_version"}
    assert tables == set(EXPECTED_COLUMNS)
    for table, columns in EXPECTED_COLUMNS.items():
        assert [c["name"] for c in insp.get_columns(table)] == columns, table


def test_sqlite_uses_wal_and_foreign_keys(data_dir):
    url = f"sqlite:///{data_dir / 'feedback.db'}"
    engine = db.get_engine(url)
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1


def _user(session, name="alice"):
    return store.get_or_create_user(session=session, username=name).id


def _exchange(session, uid, text="Hi", reply="Hello!"):
    conv = store.create_conversation(session=session, user_id=uid)
    q = store.add_user_message(session=session, user_id=uid, conversation_id=conv.id, content=text)
    a = store.add_reply(session=session, user_id=uid, parent_id=q.id, content=reply,
                        model_version="v1", generation_settings={"temperature": 0.7})
    return conv, q, a


def test_conversation_lifecycle_and_titles(db_url):
    with db.transaction(write=True, url=db_url) as s:
        uid = _user(s)
        conv, q, a = _exchange(s, uid, text="How do tides work?\nPlease explain.")
    with db.transaction(url=db_url) as s:
        [c] = store.list_conversations(session=s, user_id=uid)
        assert c.title == "How do tides work?"
        thread = store.get_thread(session=s, user_id=uid, conversation_id=conv.id)
        assert [(t.role, t.content) for t in thread] == [
            ("user", "How do tides work?\nPlease explain."), ("assistant", "Hello!")]
        assert thread[1].model_version == "v1"
        assert thread[1].generation_settings == {"temperature": 0.7}
    with db.transaction(write=True, url=db_url) as s:
        store.rename_conversation(session=s, user_id=uid, conversation_id=conv.id, title="Tides")
        with pytest.raises(InvalidInput):
            store.rename_conversation(session=s, user_id=uid, conversation_id=conv.id, title=" ")
    with db.transaction(write=True, url=db_url) as s:
        assert store.list_conversations(session=s, user_id=uid)[0].title == "Tides"
        store.delete_conversation(session=s, user_id=uid, conversation_id=conv.id)
    with db.transaction(url=db_url) as s:
        assert store.list_conversations(session=s, user_id=uid) == []


def test_a_user_sees_and_changes_only_their_own(db_url):
    with db.transaction(write=True, url=db_url) as s:
        alice, bob = _user(s, "alice"), _user(s, "bob")
        conv, q, a = _exchange(s, alice)
    with db.transaction(write=True, url=db_url) as s:
        assert store.list_conversations(session=s, user_id=bob) == []
        with pytest.raises(NotFound):
            store.get_thread(session=s, user_id=bob, conversation_id=conv.id)
        with pytest.raises(NotFound):
            store.set_vote(session=s, user_id=bob, message_id=a.id, value=1)
        with pytest.raises(NotFound):
            store.delete_conversation(session=s, user_id=bob, conversation_id=conv.id)


@pytest.mark.parametrize("text", ["", "   ", "\n\t", "x" * (store.MAX_MESSAGE_CHARS + 1)])
def test_empty_and_overlong_messages_are_refused(db_url, text):
    with db.transaction(write=True, url=db_url) as s:
        uid = _user(s)
        conv = store.create_conversation(session=s, user_id=uid)
    with pytest.raises(InvalidInput) as err, db.transaction(write=True, url=db_url) as s:
        store.add_user_message(session=s, user_id=uid, conversation_id=conv.id, content=text)
    assert "empty" in str(err.value) or f"{store.MAX_MESSAGE_CHARS:,}" in str(err.value)
    with db.transaction(url=db_url) as s:
        assert store.get_thread(session=s, user_id=uid, conversation_id=conv.id) == []


def test_votes_change_withdraw_and_keep_history(db_url):
    with db.transaction(write=True, url=db_url) as s:
        uid = _user(s)
        conv, q, a = _exchange(s, uid)
        store.set_vote(session=s, user_id=uid, message_id=a.id, value=1, reasons=["clear"])
        store.set_vote(session=s, user_id=uid, message_id=a.id, value=-1,
                       reasons=["too verbose"], comment="shorter please")
    with db.transaction(url=db_url) as s:
        assert store.get_thread(session=s, user_id=uid, conversation_id=conv.id)[1].vote == \
            store.VoteView(-1, ("too verbose",), "shorter please")
    with db.transaction(write=True, url=db_url) as s:
        store.set_vote(session=s, user_id=uid, message_id=a.id, value=None)
    with db.transaction(url=db_url) as s:
        assert store.get_thread(session=s, user_id=uid, conversation_id=conv.id)[1].vote is None
        events = store.vote_history(session=s, user_id=uid, message_id=a.id)
        assert [e.value for e in events] == [1, -1, None]
        assert events[1].comment == "shorter please"


@pytest.mark.parametrize("value,reasons", [(1, ["too verbose"]), (-1, ["clear"]), (2, []),
                                           (None, ["clear"])])
def test_invalid_votes_are_refused(db_url, value, reasons):
    with db.transaction(write=True, url=db_url) as s:
        uid = _user(s)
        _, q, a = _exchange(s, uid)
        with pytest.raises(InvalidInput):
            store.set_vote(session=s, user_id=uid, message_id=a.id, value=value, reasons=reasons)
        with pytest.raises(InvalidInput):  # user messages are not rated
            store.set_vote(session=s, user_id=uid, message_id=q.id, value=1)


def test_regenerate_pick_and_edit_record_preferences(db_url):
    with db.transaction(write=True, url=db_url) as s:
        uid = _user(s)
        conv, q, first = _exchange(s, uid, reply="first")
        second = store.add_reply(session=s, user_id=uid, parent_id=q.id, content="second",
                                 model_version="v1", generation_settings={},
                                 source="regenerate")
    with db.transaction(write=True, url=db_url) as s:
        thread = store.get_thread(session=s, user_id=uid, conversation_id=conv.id)
        assert thread[1].content == "second" and thread[1].sibling_ids == (first.id, second.id)
        store.select_reply(session=s, user_id=uid, message_id=first.id)
        assert store.get_thread(session=s, user_id=uid, conversation_id=conv.id)[1].content == \
            "first"
        [pref] = store.prefer_reply(session=s, user_id=uid, message_id=first.id)
        assert (pref.chosen_id, pref.rejected_id, pref.source) == (first.id, second.id,
                                                                   "regenerate")
        # Changing one's mind replaces the opposite pair instead of keeping both.
        [pref] = store.prefer_reply(session=s, user_id=uid, message_id=second.id)
        assert (pref.chosen_id, pref.rejected_id) == (second.id, first.id)
        edited = store.edit_reply(session=s, user_id=uid, message_id=second.id,
                                  content="second, improved")
        with pytest.raises(InvalidInput):
            store.edit_reply(session=s, user_id=uid, message_id=second.id, content="second ")
    with db.transaction(url=db_url) as s:
        from feedback import io
        pairs = list(io.iter_pair_rows(session=s))
        assert {(p["chosen_id"], p["rejected_id"], p["source"]) for p in pairs} == {
            (second.id, first.id, "regenerate"), (edited.id, second.id, "edit")}
        shown = store.get_thread(session=s, user_id=uid, conversation_id=conv.id)[1]
        assert shown.content == "second, improved" and shown.source == "edit"
        assert shown.model_version == "v1"


def test_a_follow_up_continues_from_the_shown_reply(db_url):
    with db.transaction(write=True, url=db_url) as s:
        uid = _user(s)
        conv, q, first = _exchange(s, uid, reply="first")
        second = store.add_reply(session=s, user_id=uid, parent_id=q.id, content="second",
                                 model_version="v1", generation_settings={}, source="regenerate")
        store.select_reply(session=s, user_id=uid, message_id=first.id)
        more = store.add_user_message(session=s, user_id=uid, conversation_id=conv.id,
                                      content="More?")
        assert store.prompt_for(session=s, parent_id=more.id, user_id=uid,
                                system_prompt="Be brief.") == [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "first"},
            {"role": "user", "content": "More?"}]
        # the path to a message, not what is shown now: showing "second" changes nothing
        store.select_reply(session=s, user_id=uid, message_id=second.id)
        assert [m["content"] for m in store.prompt_for(session=s, parent_id=more.id)] == [
            "Hi", "first", "More?"]
        with pytest.raises(NotFound):
            store.prompt_for(session=s, parent_id=more.id, user_id=uid + 1)


def test_concurrent_sqlite_writers_wait_instead_of_failing(data_dir):
    """Two engines (as two processes would have) write at once; every write lands."""
    url = f"sqlite:///{data_dir / 'feedback.db'}"
    with db.transaction(write=True, url=url) as s:
        uid = _user(s)
        cid = store.create_conversation(session=s, user_id=uid).id
    errors = []

    def writer(n: int) -> None:
        engine = db.make_engine(url)
        from sqlalchemy.orm import Session
        try:
            for i in range(25):
                with Session(engine.execution_options(write=True)) as s, s.begin():
                    # Read first, then write: the pattern that fails with a deferred BEGIN.
                    store.get_thread(session=s, user_id=uid, conversation_id=cid)
                    q = store.add_user_message(session=s, user_id=uid, conversation_id=cid,
                                               content=f"{n}-{i}")
                    store.add_reply(session=s, user_id=uid, parent_id=q.id, content="ok",
                                    model_version="m", generation_settings={})
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with db.transaction(url=url) as s:
        assert len(store.get_thread(session=s, user_id=uid, conversation_id=cid)) == 200


def test_a_locked_database_gives_a_clear_error_and_writes_nothing(data_dir):
    path = data_dir / "feedback.db"
    url = f"sqlite:///{path}?timeout=0.3"
    with db.transaction(write=True, url=url) as s:
        uid = _user(s)
        cid = store.create_conversation(session=s, user_id=uid).id
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(StoreUnavailable, match="busy"), \
                db.transaction(write=True, url=url) as s:
            store.add_user_message(session=s, user_id=uid, conversation_id=cid, content="hello")
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    with db.transaction(url=url) as s:
        assert store.get_thread(session=s, user_id=uid, conversation_id=cid) == []


def test_an_unreachable_database_gives_a_clear_error():
    url = "postgresql+psycopg://nobody:secret@127.0.0.1:1/none"
    with pytest.raises(StoreUnavailable, match="cannot be reached") as caught:
        with db.transaction(url=url):
            pass
    assert "127.0.0.1" not in str(caught.value) and "nobody" not in str(caught.value)
    assert "127.0.0.1" in caught.value.detail and "secret" not in caught.value.detail


@pytest.mark.parametrize("url", ["postgresql+psycopg://u:secret@localhost:abc/db",
                                 "nosuchdriver://x", "not a url"])
def test_an_unusable_database_url_is_one_clear_line_in_the_cli(url):
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT
    done = subprocess.run([sys.executable, "-m", "feedback", "stats"], cwd=ROOT,
                          env={**os.environ, "CHAT_DATABASE_URL": url},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "CHAT_DATABASE_URL" in done.stderr and "secret" not in done.stderr


def test_a_sqlite_folder_in_the_way_is_named_and_nothing_is_made(tmp_path):
    (tmp_path / "gone").symlink_to(tmp_path / "unmounted")
    (tmp_path / "a-file").write_text("kept")
    for folder, says in ((tmp_path / "gone", "is a link to"),
                         (tmp_path / "a-file", "is a file, not a folder")):
        with pytest.raises(StoreUnavailable, match="folder cannot be made") as caught:
            with db.transaction(url=f"sqlite:///{folder / 'feedback.db'}"):
                pass
        assert f"{folder} {says}" in caught.value.detail
    assert not (tmp_path / "unmounted").exists() and (tmp_path / "a-file").read_text() == "kept"


def test_opening_a_blank_file_waits_while_another_program_holds_its_write_lock(tmp_path):
    """Switching a rollback-mode file to WAL upgrades a read lock, which SQLite refuses at once
    (no busy handler) while another connection holds the write lock: the store waits and
    retries instead (the 16-processes test below failed on this once in CI). A lock held
    past the busy timeout still ends in the clear 'busy' message."""
    path = tmp_path / "feedback.db"
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    other.execute("create table notes (x)")
    threading.Timer(0.4, lambda: other.execute("COMMIT")).start()
    engine = db.make_engine(f"sqlite:///{path}?timeout=10")
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    engine.dispose()

    held = sqlite3.connect(tmp_path / "held.db", isolation_level=None)
    held.execute("BEGIN IMMEDIATE")
    held.execute("create table notes (x)")
    url = f"sqlite:///{tmp_path / 'held.db'}?timeout=0.3"
    with pytest.raises(StoreUnavailable, match="busy"), db.transaction(url=url):
        pass
    held.execute("COMMIT")
    with db.transaction(write=True, url=url) as session:
        store.get_or_create_user(session=session, username="u")


def test_alembic_on_the_command_line_migrates_through_the_stores_engine(tmp_path):
    """`alembic -x url=... upgrade head` (the operator's path) makes the same schema, with the
    store's pragmas (WAL), as the first use does."""
    import argparse

    from alembic import command
    from alembic.config import Config

    url = f"sqlite:///{tmp_path / 'cli.db'}"
    cfg = Config(cmd_opts=argparse.Namespace(x=[f"url={url}"]))
    cfg.set_main_option("script_location", str(db.MIGRATIONS_DIR))
    command.upgrade(cfg, "head")
    con = sqlite3.connect(tmp_path / "cli.db")
    assert con.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    assert "users" in {r[0] for r in con.execute("select name from sqlite_master")}
    with db.transaction(write=True, url=url) as session:  # first use: nothing left to migrate
        store.get_or_create_user(session=session, username="u")


def test_sixteen_processes_opening_a_blank_database_all_succeed(tmp_path):
    """First use races: every process migrates under BEGIN IMMEDIATE, so none fails with
    'database is locked' and the schema is made once."""
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    env = {**os.environ, "CHAT_DATA_DIR": str(tmp_path / "blank")}
    env.pop("CHAT_DATABASE_URL", None)
    code = ("from feedback import db, store\n"
            "with db.transaction(write=True) as s:\n"
            "    store.get_or_create_user(session=s, username='u')\n")
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env,
                              stderr=subprocess.PIPE, text=True) for _ in range(16)]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * 16, [e[-500:] for e in errors if e]
    con = sqlite3.connect(tmp_path / "blank" / "feedback.db")
    assert con.execute("select count(*) from users").fetchone() == (1,)
    assert con.execute("select count(*) from alembic_version").fetchone() == (1,)


def test_a_preference_needs_two_sibling_replies_of_the_users_own(db_url):
    with db.transaction(write=True) as s:
        alice, bob = _user(s), store.get_or_create_user(session=s, username="bob").id
        conv = store.create_conversation(session=s, user_id=alice)
        q = store.add_user_message(session=s, user_id=alice, conversation_id=conv.id,
                                   content="q")
        a = store.add_reply(session=s, user_id=alice, parent_id=q.id, content="a",
                            model_version="m", generation_settings={})
        b = store.add_reply(session=s, user_id=alice, parent_id=q.id, content="b",
                            model_version="m", generation_settings={}, source="regenerate")
        q2 = store.add_user_message(session=s, user_id=alice, conversation_id=conv.id,
                                    content="q2")
        c = store.add_reply(session=s, user_id=alice, parent_id=q2.id, content="c",
                            model_version="m", generation_settings={})
        with pytest.raises(NotFound):
            store.record_preference(s, user_id=bob, chosen=a, rejected=b, source="pick")
        with pytest.raises(InvalidInput, match="same message"):
            store.record_preference(s, user_id=alice, chosen=a, rejected=c, source="pick")
        with pytest.raises(InvalidInput, match="same message"):
            store.record_preference(s, user_id=alice, chosen=a, rejected=q, source="pick")
        assert store.record_preference(s, user_id=alice, chosen=a, rejected=b,
                                       source="pick").chosen_id == a.id
