"""What a signed-in user can do in the chat, each action in one database transaction.

The page (`app.py`) only draws widgets and binds them to a `ChatSession`; `bench/loop.py`
records its simulated users' replies and votes through the same object, so both write exactly
the same rows. A method either does what it says and returns what to show, or raises
`ChatError` whose message is for the user (and nothing of the action is stored).

Votes are never lost to a busy or unreachable database: `vote` queues the vote in the
session's `unsaved` table first and removes it once it is written; `flush_votes` (called on the
next page run) tries the rest again. A vote the store refuses for good (the reply was deleted)
is dropped with its message.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from feedback import store
from feedback.db import transaction
from feedback.errors import FeedbackError, InvalidInput, StoreUnavailable
from serving.chat import PromptTooLong
from serving.config import GenerationSettings, InvalidSettings
from streamlit_app.replies import BUSY, InFlight, PendingReply

KEEP = object()  # `vote`: leave this part of the vote as it is
VOTE_WAITS = "Your vote is kept here and will be saved when the database answers. "


class ChatError(Exception):
    """An action the user asked for did not happen; the message says why, for the page."""


@dataclass
class View:
    """Everything the page shows for one conversation, read in one transaction."""

    conversations: list = field(default_factory=list)  # the user's, newest first
    conversation_id: int | None = None  # None: a new chat (or the one asked for is gone)
    thread: list[store.Turn] = field(default_factory=list)
    settings: dict = field(default_factory=dict)  # the conversation's last generation settings
    pending: PendingReply | None = None  # the reply being written (or saved), not yet in `thread`

    @property
    def title(self) -> str:
        return next((c.title for c in self.conversations if c.id == self.conversation_id), "")

    @property
    def waiting_for_reply(self) -> bool:
        """The last message is the user's and has no reply (a restart, a failed reply)."""
        return bool(self.thread) and self.thread[-1].role == "user"


class ChatSession:
    """One signed-in user's actions. `engine` and `in_flight` are the server's shared ones;
    `unsaved` is where this browser session keeps votes not yet written."""

    def __init__(self, user_id: int, *, engine=None, in_flight: InFlight | None = None,
                 unsaved: dict | None = None) -> None:
        self.user_id = user_id
        self.engine = engine
        self.in_flight = in_flight
        self.unsaved: dict[int, tuple[int | None, tuple[str, ...], str]] = (
            {} if unsaved is None else unsaved)

    @staticmethod
    def sign_in(username: str, display_name: str = "") -> int:
        """The user's id (created on first sign-in)."""
        with transaction(write=True) as session:
            return store.get_or_create_user(session=session, username=username,
                                            display_name=display_name).id

    # ---- reading --------------------------------------------------------------------------------
    def view(self, conversation_id: int | None) -> View:
        # The reply in flight is looked up before the thread is read: one saved in between is
        # then in the thread (and dropped from `pending`) or still pending, never neither.
        pending = self.pending(conversation_id)
        with transaction() as session:
            view = View(store.list_conversations(session=session, user_id=self.user_id))
            if conversation_id in {c.id for c in view.conversations}:
                view.conversation_id = conversation_id
                view.thread = store.get_thread(session=session, user_id=self.user_id,
                                               conversation_id=conversation_id)
                view.settings = store.get_conversation(
                    session=session, user_id=self.user_id,
                    conversation_id=conversation_id).settings or {}
                if pending is not None and pending.message_id not in {t.id for t in view.thread}:
                    view.pending = pending
        return view

    def pending(self, conversation_id: int | None) -> PendingReply | None:
        if conversation_id is None or self.in_flight is None:
            return None
        return self.in_flight.get(self.user_id, conversation_id)

    def busy(self, conversation_id: int | None) -> bool:
        return self.in_flight is not None and self.in_flight.busy(self.user_id, conversation_id)

    # ---- chatting -------------------------------------------------------------------------------
    def send(self, conversation_id: int | None, text: str, settings: GenerationSettings) -> int:
        """Store the user's message (in a new conversation when `conversation_id` is None)
        and start the reply; returns the conversation's id. On `ChatError` nothing is stored."""
        if conversation_id is not None and self.busy(conversation_id):
            raise ChatError(BUSY)  # refused here, whatever the browser let through
        try:
            store.check_message_text(text)
            self.engine.check([{"role": "user", "content": text}], settings)
            with transaction(write=True) as session:
                if conversation_id is None:
                    conversation_id = store.create_conversation(
                        session=session, user_id=self.user_id).id
                store.update_conversation_settings(
                    session=session, user_id=self.user_id, conversation_id=conversation_id,
                    settings=settings.to_dict())
                message = store.add_user_message(session=session, user_id=self.user_id,
                                                 conversation_id=conversation_id, content=text)
        except (FeedbackError, PromptTooLong, InvalidSettings) as exc:
            raise ChatError(str(exc)) from exc
        self.reply_to(conversation_id, message.id, settings)
        return conversation_id

    def reply_to(self, conversation_id: int, parent_id: int, settings: GenerationSettings,
                 source: str = "chat") -> PendingReply:
        """Start a reply to user message `parent_id` (`source` "regenerate" for another one)."""
        try:
            return self.in_flight.start(engine=self.engine, user_id=self.user_id,
                                        conversation_id=conversation_id, parent_id=parent_id,
                                        settings=settings, source=source)
        except (FeedbackError, PromptTooLong, InvalidSettings) as exc:
            raise ChatError(str(exc)) from exc

    def record_reply(self, parent_id: int, content: str, *, model_version: str,
                     generation_settings: dict, finish_reason: str | None = None,
                     source: str = "chat") -> int:
        """Store a reply generated elsewhere (the in-flight saver, a benchmark); its id."""
        with transaction(write=True) as session:
            return store.add_reply(session=session, user_id=self.user_id, parent_id=parent_id,
                                   content=content, model_version=model_version,
                                   generation_settings=generation_settings,
                                   finish_reason=finish_reason, source=source).id

    def start_conversation(self, messages: list[dict]) -> int:
        """A new conversation holding `messages` as already said (a benchmark's prompt); the
        id of its last user message, to reply to."""
        if not any(m["role"] == "user" for m in messages):
            raise ChatError("A conversation needs at least one user message.")
        with transaction(write=True) as session:
            conversation = store.create_conversation(session=session, user_id=self.user_id)
            parent = None
            for m in messages:
                if m["role"] == "user":
                    parent = store.add_user_message(session=session, user_id=self.user_id,
                                                    conversation_id=conversation.id,
                                                    content=m["content"])
                elif parent is not None:
                    store.add_reply(session=session, user_id=self.user_id, parent_id=parent.id,
                                    content=m["content"], model_version="prompt-set",
                                    generation_settings={})
        return parent.id

    def _write(self, fn, **kwargs):
        try:
            with transaction(write=True) as session:
                return fn(session=session, user_id=self.user_id, **kwargs)
        except FeedbackError as exc:
            raise ChatError(str(exc)) from exc

    def show_reply(self, message_id: int) -> None:
        """Show this one of a message's replies (‹ ›)."""
        self._write(store.select_reply, message_id=message_id)

    def prefer(self, message_id: int) -> None:
        """This reply is better than its siblings: a preference pair for each."""
        self._write(store.prefer_reply, message_id=message_id)

    def edit(self, message_id: int, content: str) -> None:
        """The user's better version of a reply: a new sibling, preferred to the original."""
        self._write(store.edit_reply, message_id=message_id, content=content)

    def rename(self, conversation_id: int, title: str) -> None:
        self._write(store.rename_conversation, conversation_id=conversation_id, title=title)

    def delete(self, conversation_id: int) -> None:
        self._write(store.delete_conversation, conversation_id=conversation_id)

    # ---- votes ----------------------------------------------------------------------------------
    def vote(self, message_id: int, value=KEEP, reasons=KEEP, comment=KEEP) -> str | None:
        """Change a reply's vote: a new thumb (None withdraws it; a flip starts its reasons
        over, the comment stays), reasons or a comment (the rest kept), read and written in
        one transaction. A vote the database cannot take now is kept in `unsaved` and written
        on a later run. Returns a notice for the page, if any."""
        queued = self.unsaved.get(message_id)  # newer than what is stored
        try:
            with transaction(write=True) as session:
                base = queued
                if base is None:
                    old = store.get_vote(session=session, user_id=self.user_id,
                                         message_id=message_id)
                    base = (old.value, tuple(old.reasons), old.comment) if old else (None, (), "")
                new = _changed(base, value, reasons, comment)
                store.set_vote(session=session, user_id=self.user_id, message_id=message_id,
                               value=new[0], reasons=list(new[1]), comment=new[2])
            self.unsaved.pop(message_id, None)
        except StoreUnavailable as exc:
            new = _changed(queued or (None, (), ""), value, reasons, comment)
            try:
                store.check_vote(new[0], new[1], new[2])  # kept for later only if valid
            except FeedbackError as invalid:
                raise ChatError(str(invalid)) from invalid
            self.unsaved[message_id] = new
            return VOTE_WAITS + str(exc)
        except InvalidInput as exc:  # this change is refused; a vote waiting stays
            raise ChatError(str(exc)) from exc
        except FeedbackError as exc:  # the reply is gone: nothing to keep for it
            self.unsaved.pop(message_id, None)
            raise ChatError(str(exc)) from exc
        return self.flush_votes() if self.unsaved else None

    def flush_votes(self) -> str | None:
        """Write the queued votes; returns a notice if some are still waiting or refused."""
        notice = None
        for message_id, (value, reasons, comment) in list(self.unsaved.items()):
            try:
                with transaction(write=True) as session:
                    store.set_vote(session=session, user_id=self.user_id, message_id=message_id,
                                   value=value, reasons=list(reasons), comment=comment)
                del self.unsaved[message_id]
            except StoreUnavailable as exc:
                return VOTE_WAITS + str(exc)
            except FeedbackError as exc:
                del self.unsaved[message_id]
                notice = str(exc)
        return notice


def _changed(base: tuple, value, reasons, comment) -> tuple[int | None, tuple[str, ...], str]:
    new_value = base[0] if value is KEEP else value
    if reasons is KEEP:
        new_reasons = base[1] if new_value == base[0] else ()  # reasons belong to one thumb
    else:
        new_reasons = tuple(reasons or ())
    new_comment = base[2] if comment is KEEP else comment
    if new_value is None:
        return None, (), ""
    return new_value, new_reasons, new_comment
