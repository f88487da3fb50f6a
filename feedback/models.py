"""The schema as typed SQLAlchemy 2.x ORM classes; Alembic revisions in `migrations/` create it.

Messages form a tree per conversation: a reply's `parent_id` is the message it answers, so
regenerated replies are siblings, and `selected` marks the sibling the conversation shows.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import JSON, Boolean, DateTime, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

ROLES = ("system", "user", "assistant")
# Where a message came from: typed in chat, a regenerated reply, an edit of a reply, a JSONL import.
MESSAGE_SOURCES = ("chat", "regenerate", "edit", "import")
# Where a preference pair came from: picking among regenerated siblings, editing a reply, an import.
PREFERENCE_SOURCES = ("regenerate", "edit", "import")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(primary_key=True)
    username: Mapped[str] = mapped_column(String(320), unique=True)
    display_name: Mapped[str] = mapped_column(String(200), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Conversation(Base):
    __tablename__ = "conversations"

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    title: Mapped[str] = mapped_column(String(200))
    # The generation settings the page uses for new replies in this conversation.
    settings: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    messages: Mapped[list[Message]] = relationship(
        back_populates="conversation", cascade="all, delete-orphan", passive_deletes=True,
        foreign_keys="Message.conversation_id",
    )


class Message(Base):
    __tablename__ = "messages"

    id: Mapped[int] = mapped_column(primary_key=True)
    conversation_id: Mapped[int] = mapped_column(
        ForeignKey("conversations.id", ondelete="CASCADE"), index=True
    )
    parent_id: Mapped[int | None] = mapped_column(
        ForeignKey("messages.id", ondelete="CASCADE"), index=True
    )
    role: Mapped[str] = mapped_column(String(16))
    content: Mapped[str] = mapped_column(Text)
    source: Mapped[str] = mapped_column(String(16), default="chat")
    selected: Mapped[bool] = mapped_column(Boolean, default=True)
    # For assistant messages: which model version wrote it, with which settings, and why it ended.
    model_version: Mapped[str | None] = mapped_column(String(200))
    generation_settings: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    finish_reason: Mapped[str | None] = mapped_column(String(32))
    edited_from_id: Mapped[int | None] = mapped_column(
        ForeignKey("messages.id", ondelete="SET NULL")
    )
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    conversation: Mapped[Conversation] = relationship(
        back_populates="messages", foreign_keys=[conversation_id]
    )


class Vote(Base):
    """One user's current vote on one reply; `value` is +1, -1, or None once withdrawn."""

    __tablename__ = "votes"
    __table_args__ = (UniqueConstraint("message_id", "user_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    message_id: Mapped[int] = mapped_column(
        ForeignKey("messages.id", ondelete="CASCADE"), index=True
    )
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    value: Mapped[int | None] = mapped_column(Integer)
    reasons: Mapped[list[str]] = mapped_column(JSON, default=list)
    comment: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    events: Mapped[list[VoteEvent]] = relationship(
        cascade="all, delete-orphan", passive_deletes=True, order_by="VoteEvent.id"
    )


class VoteEvent(Base):
    """Every change to a vote, in order: the history behind `Vote`'s latest state."""

    __tablename__ = "vote_events"

    id: Mapped[int] = mapped_column(primary_key=True)
    vote_id: Mapped[int] = mapped_column(ForeignKey("votes.id", ondelete="CASCADE"), index=True)
    value: Mapped[int | None] = mapped_column(Integer)
    reasons: Mapped[list[str]] = mapped_column(JSON, default=list)
    comment: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Preference(Base):
    """A pairwise preference: `chosen` over `rejected`, both replies to the same prompt."""

    __tablename__ = "preferences"
    __table_args__ = (UniqueConstraint("chosen_id", "rejected_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    conversation_id: Mapped[int] = mapped_column(
        ForeignKey("conversations.id", ondelete="CASCADE"), index=True
    )
    chosen_id: Mapped[int] = mapped_column(ForeignKey("messages.id", ondelete="CASCADE"))
    rejected_id: Mapped[int] = mapped_column(ForeignKey("messages.id", ondelete="CASCADE"))
    source: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
