"""`ChatSession`, the user's actions the page and the loop benchmark share, on a real SQLite
file."""

from __future__ import annotations

import sqlite3
import time

import pytest
from sqlalchemy import func, select

from feedback import db, store
from feedback.models import Preference
from streamlit_app.chat_session import ChatError, ChatSession


def conversation(chat: ChatSession, replies: int = 1) -> list[int]:
    parent = chat.start_conversation([{"role": "user", "content": "Name a colour."}])
    return [chat.record_reply(parent, f"Blue {i}.", model_version="v1",
                              generation_settings={"temperature": 0.7},
                              source="chat" if i == 0 else "regenerate")
            for i in range(replies)]


def vote_of(chat: ChatSession, message_id: int) -> store.VoteView | None:
    with db.transaction() as s:
        return store.get_vote(session=s, user_id=chat.user_id, message_id=message_id)


def test_each_vote_change_keeps_what_it_does_not_touch():
    chat = ChatSession(ChatSession.sign_in("ann"))
    [reply] = conversation(chat)
    chat.vote(reply, value=1)
    chat.vote(reply, reasons=["clear", "accurate"])
    chat.vote(reply, comment="short and right")
    assert vote_of(chat, reply) == store.VoteView(1, ("clear", "accurate"), "short and right")
    chat.vote(reply, value=1)  # the same thumb again: nothing lost (and no new event)
    assert vote_of(chat, reply) == store.VoteView(1, ("clear", "accurate"), "short and right")
    chat.vote(reply, value=-1)  # a flip: the reasons were the other thumb's, the comment stays
    assert vote_of(chat, reply) == store.VoteView(-1, (), "short and right")
    chat.vote(reply, value=None)  # withdrawn: nothing of it stays
    assert vote_of(chat, reply) is None
    with db.transaction() as s:
        assert [e.value for e in store.vote_history(session=s, user_id=chat.user_id,
                                                    message_id=reply)] == [1, 1, 1, -1, None]


def test_a_vote_the_database_cannot_take_waits_in_the_session_and_is_written_later(
        data_dir, monkeypatch):
    monkeypatch.setenv("CHAT_DATABASE_URL", f"sqlite:///{data_dir / 'feedback.db'}?timeout=0.2")
    chat = ChatSession(ChatSession.sign_in("ann"))
    [reply] = conversation(chat)
    chat.vote(reply, comment="")  # nothing to keep yet: no vote
    blocker = sqlite3.connect(data_dir / "feedback.db", isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        notice = chat.vote(reply, value=-1)
        assert "kept here" in notice
        notice = chat.vote(reply, reasons=["too verbose"])  # changes the vote that waits
        assert "kept here" in notice
        with pytest.raises(ChatError, match="Unknown reason"):  # checked now, not at the flush
            chat.vote(reply, reasons=["too long"])
        assert chat.unsaved == {reply: (-1, ("too verbose",), "")}
        assert "kept here" in chat.flush_votes()
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    # The page keeps `unsaved` in the browser session: a new ChatSession over it writes it.
    later = ChatSession(chat.user_id, unsaved=chat.unsaved)
    assert later.flush_votes() is None
    assert chat.unsaved == {}
    assert vote_of(chat, reply) == store.VoteView(-1, ("too verbose",))


def test_refused_actions_say_why_and_store_nothing():
    ann = ChatSession(ChatSession.sign_in("ann"))
    bob = ChatSession(ChatSession.sign_in("bob"))
    first, second = conversation(ann, replies=2)
    with pytest.raises(ChatError):
        bob.vote(first, value=1)  # not his
    with pytest.raises(ChatError):
        bob.prefer(first)
    with pytest.raises(ChatError, match="reason"):
        ann.vote(first, value=1, reasons=["not a reason"])
    with pytest.raises(ChatError):
        ann.edit(first, "   ")
    assert vote_of(ann, first) is None and ann.unsaved == {}
    with db.transaction() as s:
        assert s.scalar(select(func.count()).select_from(Preference)) == 0
    ann.delete(ann.view(None).conversations[0].id)
    with pytest.raises(ChatError):
        ann.vote(second, value=1)  # the reply went with its conversation
    with pytest.raises(ChatError, match="user message"):
        ann.start_conversation([{"role": "system", "content": "only a system prompt"}])
    assert ann.view(None).conversations == []  # nothing half-made


def test_the_view_is_the_users_own():
    ann = ChatSession(ChatSession.sign_in("ann"))
    bob = ChatSession(ChatSession.sign_in("bob"))
    conversation(ann, replies=2)
    view = ann.view(ann.view(None).conversations[0].id)
    assert [t.role for t in view.thread] == ["user", "assistant"]
    assert len(view.thread[1].sibling_ids) == 2 and not view.waiting_for_reply
    assert bob.view(view.conversation_id).conversation_id is None  # another user's: not shown
    assert bob.view(view.conversation_id).thread == []


def test_a_reply_being_saved_is_always_in_the_view_once(tiny_model):
    """A view read at any moment shows the reply either in flight or in the thread, never
    neither (a regenerated reply once vanished from the page: it was saved between the read
    of the thread and the look-up of the reply in flight) and never both."""
    from serving.backends import open_engine
    from serving.config import GenerationSettings
    from streamlit_app.replies import InFlight

    engine = open_engine()
    try:
        chat = ChatSession(ChatSession.sign_in("ann"), engine=engine, in_flight=InFlight())
        settings = GenerationSettings(temperature=0, max_new_tokens=16)
        cid = chat.send(None, "Name a colour.", settings)
        for attempt in range(20):  # each a regenerate: a new reply saved while views are read
            if attempt:
                parent = chat.view(cid).thread[0].id
                chat.reply_to(cid, parent, settings, source="regenerate")
            while True:
                view = chat.view(cid)
                replies = [t for t in view.thread if t.role == "assistant"]
                stored = len(replies[0].sibling_ids) if replies else 0
                if view.pending is not None:
                    assert view.pending.message_id not in {t.id for t in view.thread}
                assert stored + (view.pending is not None) == attempt + 1, (attempt, view)
                if view.pending is None:
                    break
            while chat.busy(cid):  # stored and shown; the slot frees a moment later
                time.sleep(0.01)
    finally:
        engine.close()
