"""Keyword-only store functions: everything the page, the CLIs and training read or write.

Each function takes an open `session` (see `feedback.db.transaction`) and checks that the
conversation or message belongs to `user_id`, so a user only ever sees and changes their own.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from feedback.errors import Busy, InvalidInput, NotFound
from feedback.models import Conversation, Message, Preference, User, Vote, VoteEvent, utcnow

MAX_MESSAGE_CHARS = 8000
MAX_TITLE_CHARS = 200
MAX_COMMENT_CHARS = 2000
MAX_USERNAME_CHARS = 320
MAX_VERSION_CHARS = 200
DEFAULT_TITLE = "New chat"
UP_REASONS = ("accurate", "followed instructions", "clear", "creative", "thorough")
DOWN_REASONS = ("too verbose", "not helpful", "factually wrong", "didn't follow instructions",
                "refused when it shouldn't", "bad style")


@dataclass(frozen=True)
class VoteView:
    value: int | None
    reasons: tuple[str, ...] = ()
    comment: str = ""


@dataclass(frozen=True)
class Turn:
    """One message of the shown thread, with its siblings (regenerations, edits) and its vote."""

    id: int
    role: str
    content: str
    source: str
    model_version: str | None
    generation_settings: dict[str, Any] | None
    finish_reason: str | None
    created_at: datetime
    parent_id: int | None
    sibling_ids: tuple[int, ...] = field(default=())
    vote: VoteView | None = None

    @property
    def sibling_index(self) -> int:
        return self.sibling_ids.index(self.id)


# ---- validation -----------------------------------------------------------------------------

def check_message_text(content: str, *, what: str = "Your message") -> str:
    """The text if it can be sent; `InvalidInput` with what to do if it is empty or too long."""
    if not isinstance(content, str) or not content.strip():
        raise InvalidInput(f"{what} is empty: type something first.")
    if len(content) > MAX_MESSAGE_CHARS:
        raise InvalidInput(
            f"{what} is {len(content):,} characters; the limit is {MAX_MESSAGE_CHARS:,}. "
            "Shorten it and send again."
        )
    return content


def _check_title(title: str) -> str:
    title = (title or "").strip()
    if not title:
        raise InvalidInput("A conversation needs a title: type one.")
    if len(title) > MAX_TITLE_CHARS:
        raise InvalidInput(f"Titles are at most {MAX_TITLE_CHARS} characters.")
    return title


def check_vote(value: int | None, reasons: list[str] | tuple[str, ...], comment: str) -> None:
    if not (value is None or (type(value) is int and value in (1, -1))):  # True is no vote
        raise InvalidInput("A vote is thumbs up (1), thumbs down (-1) or none.")
    if not isinstance(reasons, (list, tuple)) or not all(isinstance(r, str) for r in reasons):
        raise InvalidInput("The reasons of a vote are a list of words such as "
                           f"{UP_REASONS[0]!r}.")
    if not isinstance(comment, str):
        raise InvalidInput("A vote's comment is text.")
    allowed = UP_REASONS if value == 1 else DOWN_REASONS if value == -1 else ()
    unknown = [r for r in reasons if r not in allowed]
    if unknown:
        raise InvalidInput(f"Unknown reason(s) for this vote: {', '.join(unknown)}. "
                           f"Choose from: {', '.join(allowed) or 'none (vote first)'}.")
    if len(comment or "") > MAX_COMMENT_CHARS:
        raise InvalidInput(f"The comment is {len(comment):,} characters; the limit is "
                           f"{MAX_COMMENT_CHARS:,}.")


# ---- users and conversations ----------------------------------------------------------------

def get_or_create_user(*, session: Session, username: str, display_name: str = "") -> User:
    user = session.scalar(select(User).where(User.username == username))
    if user is None:
        user = User(username=username, display_name=display_name or username)
        session.add(user)
        session.flush()
    return user


def create_conversation(*, session: Session, user_id: int, title: str = DEFAULT_TITLE,
                        settings: dict[str, Any] | None = None) -> Conversation:
    conv = Conversation(user_id=user_id, title=_check_title(title), settings=settings or {})
    session.add(conv)
    session.flush()
    return conv


def list_conversations(*, session: Session, user_id: int) -> list[Conversation]:
    """The user's conversations, most recently active first."""
    return list(session.scalars(
        select(Conversation).where(Conversation.user_id == user_id)
        .order_by(Conversation.updated_at.desc(), Conversation.id.desc())
    ))


def get_conversation(*, session: Session, user_id: int, conversation_id: int) -> Conversation:
    conv = session.get(Conversation, conversation_id)
    if conv is None or conv.user_id != user_id:
        raise NotFound(f"Conversation {conversation_id} does not exist (or is not yours).")
    return conv


def rename_conversation(*, session: Session, user_id: int, conversation_id: int,
                        title: str) -> Conversation:
    conv = get_conversation(session=session, user_id=user_id, conversation_id=conversation_id)
    conv.title = _check_title(title)
    return conv


def update_conversation_settings(*, session: Session, user_id: int, conversation_id: int,
                                 settings: dict[str, Any]) -> Conversation:
    conv = get_conversation(session=session, user_id=user_id, conversation_id=conversation_id)
    conv.settings = dict(settings)
    return conv


def delete_conversation(*, session: Session, user_id: int, conversation_id: int) -> None:
    """Delete a conversation with its messages, votes and preferences."""
    conv = get_conversation(session=session, user_id=user_id, conversation_id=conversation_id)
    session.delete(conv)


# ---- the thread -----------------------------------------------------------------------------

def _messages(session: Session, conversation_id: int) -> list[Message]:
    return list(session.scalars(
        select(Message).where(Message.conversation_id == conversation_id).order_by(Message.id)
    ))


def _shown_path(messages: list[Message]) -> tuple[list[Message], dict[int | None, list[Message]]]:
    children: dict[int | None, list[Message]] = defaultdict(list)
    for m in messages:
        children[m.parent_id].append(m)
    path: list[Message] = []
    parent: int | None = None
    while children.get(parent):
        kids = children[parent]
        chosen = [k for k in kids if k.selected] or kids
        path.append(chosen[-1])
        parent = chosen[-1].id
    return path, children


def get_thread(*, session: Session, user_id: int, conversation_id: int) -> list[Turn]:
    """The conversation as shown: the selected sibling at each step, with siblings and votes."""
    get_conversation(session=session, user_id=user_id, conversation_id=conversation_id)
    path, children = _shown_path(_messages(session, conversation_id))
    votes = {
        v.message_id: v for v in session.scalars(
            select(Vote).where(Vote.user_id == user_id,
                               Vote.message_id.in_([m.id for m in path]))
        )
    }
    turns = []
    for m in path:
        v = votes.get(m.id)
        turns.append(Turn(
            id=m.id, role=m.role, content=m.content, source=m.source,
            model_version=m.model_version, generation_settings=m.generation_settings,
            finish_reason=m.finish_reason, created_at=m.created_at, parent_id=m.parent_id,
            sibling_ids=tuple(k.id for k in children[m.parent_id]),
            vote=VoteView(v.value, tuple(v.reasons), v.comment) if v and v.value else None,
        ))
    return turns


def prompt_for(*, session: Session, parent_id: int, system_prompt: str | None = None,
               user_id: int | None = None) -> list[dict[str, str]]:
    """The prompt of a reply to message `parent_id`, as chat messages: the system prompt (if
    any), then the conversation from its first message through `parent_id`, following parents
    (whichever siblings the page shows now). The one place a prompt is rebuilt: serving asks it
    for a new reply, the export (so training) for every stored one, so both see the same turns.
    One query (the conversation's messages, linked in memory). With `user_id`, the message must
    be that user's."""
    if user_id is not None:
        parent = _owned_message(session, user_id, parent_id)
    else:
        parent = session.get(Message, parent_id)
        if parent is None:
            raise NotFound(f"Message {parent_id} does not exist.")
    by_id = {m.id: m for m in _messages(session, parent.conversation_id)}
    chain: list[Message] = []
    node: Message | None = parent
    while node is not None:
        chain.append(node)
        node = by_id.get(node.parent_id) if node.parent_id is not None else None
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return system + [{"role": m.role, "content": m.content} for m in reversed(chain)]


def _owned_message(session: Session, user_id: int, message_id: int) -> Message:
    msg = session.get(Message, message_id)
    if msg is None or msg.conversation.user_id != user_id:
        raise NotFound(f"Message {message_id} does not exist (or is not yours).")
    return msg


def _touch(conv: Conversation) -> None:
    conv.updated_at = utcnow()


def add_user_message(*, session: Session, user_id: int, conversation_id: int,
                     content: str) -> Message:
    """Append a user message at the end of the shown thread (titles a new conversation).
    Refused (`Busy`) while the thread ends with a user message: its reply comes first."""
    check_message_text(content)
    conv = get_conversation(session=session, user_id=user_id, conversation_id=conversation_id)
    path, _ = _shown_path(_messages(session, conversation_id))
    if path and path[-1].role == "user":
        raise Busy("The last message has no reply yet. Wait for it (or use Get a reply), "
                   "then send this one; your text is kept.")
    msg = Message(conversation_id=conv.id, parent_id=path[-1].id if path else None, role="user",
                  content=content, source="chat", selected=True)
    session.add(msg)
    if conv.title == DEFAULT_TITLE:
        first_line = content.strip().splitlines()[0]
        conv.title = first_line[:60] + ("…" if len(first_line) > 60 else "")
    _touch(conv)
    session.flush()
    return msg


def _select(session: Session, msg: Message) -> None:
    for sib in session.scalars(select(Message).where(
            Message.conversation_id == msg.conversation_id,
            Message.parent_id == msg.parent_id if msg.parent_id is not None
            else Message.parent_id.is_(None))):
        sib.selected = sib.id == msg.id


def add_reply(*, session: Session, user_id: int, parent_id: int, content: str,
              model_version: str, generation_settings: dict[str, Any],
              finish_reason: str | None = None, source: str = "chat") -> Message:
    """Store an assistant reply to the user message `parent_id` and show it."""
    parent = _owned_message(session, user_id, parent_id)
    if parent.role != "user":
        raise InvalidInput("A reply answers a user message.")
    msg = Message(conversation_id=parent.conversation_id, parent_id=parent.id, role="assistant",
                  content=content, source=source, selected=True, model_version=model_version,
                  generation_settings=dict(generation_settings), finish_reason=finish_reason)
    session.add(msg)
    session.flush()
    _select(session, msg)
    _touch(parent.conversation)
    return msg


def select_reply(*, session: Session, user_id: int, message_id: int) -> Message:
    """Show this sibling (paging through regenerations); records no preference."""
    msg = _owned_message(session, user_id, message_id)
    _select(session, msg)
    return msg


def record_preference(session: Session, *, user_id: int, chosen: Message, rejected: Message,
                       source: str) -> Preference:
    """`chosen` over `rejected`: two different assistant replies to the same message, in a
    conversation of `user_id` (`NotFound` otherwise, as for any message of another user)."""
    for msg in (chosen, rejected):
        get_conversation(session=session, user_id=user_id, conversation_id=msg.conversation_id)
    if (chosen.id == rejected.id or chosen.role != "assistant" or rejected.role != "assistant"
            or chosen.parent_id != rejected.parent_id):
        raise InvalidInput("A preference is between two replies to the same message.")
    # A later choice between the same two replies replaces the earlier, opposite one.
    session.execute(delete(Preference).where(Preference.chosen_id == rejected.id,
                                             Preference.rejected_id == chosen.id))
    pref = session.scalar(select(Preference).where(Preference.chosen_id == chosen.id,
                                                   Preference.rejected_id == rejected.id))
    if pref is None:
        pref = Preference(user_id=user_id, conversation_id=chosen.conversation_id,
                          chosen_id=chosen.id, rejected_id=rejected.id, source=source)
        session.add(pref)
    session.flush()
    return pref


def prefer_reply(*, session: Session, user_id: int, message_id: int) -> list[Preference]:
    """The user picks this reply among its siblings: it is preferred over each of them."""
    msg = _owned_message(session, user_id, message_id)
    if msg.role != "assistant":
        raise InvalidInput("Only replies can be picked.")
    siblings = [s for s in session.scalars(select(Message).where(
        Message.parent_id == msg.parent_id, Message.role == "assistant", Message.id != msg.id))]
    if not siblings:
        raise InvalidInput("There is nothing to compare this reply with: regenerate it first.")
    _select(session, msg)
    return [record_preference(session, user_id=user_id, chosen=msg, rejected=s,
                               source="regenerate") for s in siblings]


def edit_reply(*, session: Session, user_id: int, message_id: int, content: str) -> Message:
    """Store the user's edit of a reply as a new sibling, preferred over the original."""
    original = _owned_message(session, user_id, message_id)
    if original.role != "assistant":
        raise InvalidInput("Only replies can be edited.")
    check_message_text(content, what="The edited reply")
    if content.strip() == original.content.strip():
        raise InvalidInput("The edited reply is the same as the original: change something.")
    edited = Message(conversation_id=original.conversation_id, parent_id=original.parent_id,
                     role="assistant", content=content, source="edit", selected=True,
                     model_version=original.model_version,
                     generation_settings=original.generation_settings,
                     finish_reason=original.finish_reason, edited_from_id=original.id)
    session.add(edited)
    session.flush()
    _select(session, edited)
    record_preference(session, user_id=user_id, chosen=edited, rejected=original, source="edit")
    _touch(original.conversation)
    return edited


# ---- votes ----------------------------------------------------------------------------------

def set_vote(*, session: Session, user_id: int, message_id: int, value: int | None,
             reasons: list[str] | tuple[str, ...] = (), comment: str = "") -> Vote | None:
    """Cast, change or withdraw (value None) the user's vote on a reply; every change is kept."""
    check_vote(value, reasons, comment)
    msg = _owned_message(session, user_id, message_id)
    if msg.role != "assistant":
        raise InvalidInput("Only replies can be rated.")
    vote = session.scalar(select(Vote).where(Vote.message_id == message_id,
                                             Vote.user_id == user_id))
    if vote is None:
        if value is None:
            return None
        vote = Vote(message_id=message_id, user_id=user_id, value=value, reasons=[], comment="")
        session.add(vote)
    elif (vote.value, list(vote.reasons), vote.comment) == (value, list(reasons), comment or ""):
        return vote
    vote.value = value
    vote.reasons = list(reasons) if value is not None else []
    vote.comment = (comment or "") if value is not None else ""
    vote.updated_at = utcnow()
    session.flush()
    session.add(VoteEvent(vote_id=vote.id, value=vote.value, reasons=list(vote.reasons),
                          comment=vote.comment))
    session.flush()
    return vote


def get_vote(*, session: Session, user_id: int, message_id: int) -> VoteView | None:
    """The user's current vote on a reply, or None (never voted, or withdrawn)."""
    vote = session.scalar(select(Vote).where(Vote.message_id == message_id,
                                             Vote.user_id == user_id))
    return VoteView(vote.value, tuple(vote.reasons), vote.comment) if vote and vote.value else None


def vote_events_since(*, session: Session, after_id: int = 0) -> tuple[int, int]:
    """(how many votes were cast or changed after event `after_id`, the newest event id)."""
    from sqlalchemy import func

    count, newest = session.execute(
        select(func.count(VoteEvent.id), func.max(VoteEvent.id)).where(VoteEvent.id > after_id)
    ).one()
    return count or 0, newest or after_id


def vote_history(*, session: Session, user_id: int, message_id: int) -> list[VoteEvent]:
    vote = session.scalar(select(Vote).where(Vote.message_id == message_id,
                                             Vote.user_id == user_id))
    return list(vote.events) if vote else []
