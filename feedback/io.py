"""JSONL in and TRL-format JSONL out, plus the counts `stats` prints.

Import: one conversation per line (see `IMPORT_FORMAT`). The whole file is checked before
anything is written, and written in one transaction, so a bad line leaves nothing half-imported.

Export, in TRL's conversational form (loadable by `datasets.load_dataset("json", ...)`):
- votes -> unpaired rows `{"prompt": [...], "completion": [...], "label": bool}` (KTO);
- preferences -> `{"prompt": [...], "chosen": [...], "rejected": [...]}` (DPO, reward model).
Each row keeps its link back to the store (`vote_id` / `preference_id`, `message_id`s).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from feedback import store
from feedback.errors import InvalidInput
from feedback.jsonl import read_jsonl
from feedback.models import Conversation, Message, Preference, User, Vote

IMPORT_FORMAT = """\
{"user": "alice", "title": "optional", "messages": [
  {"role": "system", "content": "optional, first only"},
  {"role": "user", "content": "..."},
  {"role": "assistant", "content": "...", "model_version": "optional",
   "vote": 1 | -1 | {"value": 1, "reasons": ["clear"], "comment": "..."},
   "rejected": ["optional other replies this one was preferred over"]}]}"""


RECORD_KEYS = {"user", "title", "messages"}
MESSAGE_KEYS = {"role", "content", "model_version", "vote", "rejected"}


def _parse_line(lineno: int, record: Any) -> dict[str, Any]:
    """Check every field's type, size and encoding (with the page's limits) before anything
    is written; `InvalidInput` names the line, the message and the field."""
    def bad(why: str) -> InvalidInput:
        return InvalidInput(f"line {lineno}: {why}. Nothing was imported. Expected:\n"
                            f"{IMPORT_FORMAT}")

    def text(value: Any, what: str, limit: int, *, blank_ok: bool = False) -> str:
        if not isinstance(value, str):
            raise bad(f"{what} must be a string, not {type(value).__name__}")
        if not blank_ok and not value.strip():
            raise bad(f"{what} is empty")
        if len(value) > limit:
            raise bad(f"{what} is {len(value):,} characters; the limit is {limit:,}")
        return value

    if not isinstance(record, dict):
        raise bad("a line must be a JSON object")
    unknown = set(record) - RECORD_KEYS
    if unknown:
        raise bad(f"unknown field(s) {', '.join(sorted(map(repr, unknown)))}")
    record["user"] = text(record.get("user", "local"), '"user"', store.MAX_USERNAME_CHARS).strip()
    if "title" in record:
        record["title"] = text(record["title"], '"title"', store.MAX_TITLE_CHARS).strip()
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad('"messages" must be a non-empty list')
    expected = "user"
    for i, m in enumerate(messages):
        where = f"message {i + 1}"
        if not isinstance(m, dict):
            raise bad(f"{where} is not an object")
        unknown = set(m) - MESSAGE_KEYS
        if unknown:
            raise bad(f"{where}: unknown field(s) {', '.join(sorted(map(repr, unknown)))}")
        role = m.get("role")
        if role == "system" and i == 0:
            text(m.get("content"), "the system message", store.MAX_MESSAGE_CHARS)
            if set(m) - {"role", "content"}:
                raise bad("the system message has only a role and a content")
            continue
        if role != expected:
            raise bad(f"{where} has role {role!r}; expected {expected!r} "
                      "(turns alternate user, assistant)")
        text(m.get("content"), where, store.MAX_MESSAGE_CHARS)
        if role == "user" and set(m) - {"role", "content"}:
            raise bad(f"{where}: only assistant messages carry a model_version, votes or "
                      "rejected replies")
        if "model_version" in m:
            text(m["model_version"], f'{where}: "model_version"', store.MAX_VERSION_CHARS)
        if "vote" in m:
            vote = m["vote"]
            vote = vote if isinstance(vote, dict) or vote is None else {"value": vote}
            if vote is not None:
                if set(vote) - {"value", "reasons", "comment"}:
                    raise bad(f"{where}: a vote has a value, reasons and a comment only")
                try:
                    store.check_vote(vote.get("value"), vote.get("reasons", []),
                                     vote.get("comment", ""))
                except InvalidInput as exc:
                    raise bad(f"{where}: {exc}") from None
            m["vote"] = vote
        rejected = m.get("rejected", [])
        if not isinstance(rejected, list):
            raise bad(f'{where}: "rejected" must be a list of replies')
        for j, r in enumerate(rejected):
            text(r, f'{where}: rejected reply {j + 1}', store.MAX_MESSAGE_CHARS)
        expected = "assistant" if role == "user" else "user"
    return record


def import_jsonl(*, session: Session, path: Path) -> dict[str, int]:
    """Import every conversation in `path`, or nothing at all if any line is malformed."""
    records = [_parse_line(lineno, value) for lineno, value in read_jsonl(path)]
    counts: Counter[str] = Counter()
    for rec in records:
        user = store.get_or_create_user(session=session, username=rec["user"])
        messages = rec["messages"]
        settings = {}
        if messages[0]["role"] == "system":
            settings["system_prompt"] = messages[0]["content"]
            messages = messages[1:]
        conv = store.create_conversation(session=session, user_id=user.id,
                                         title=rec.get("title") or store.DEFAULT_TITLE,
                                         settings=settings)
        counts["conversations"] += 1
        for m in messages:
            if m["role"] == "user":
                parent = store.add_user_message(session=session, user_id=user.id,
                                                conversation_id=conv.id, content=m["content"])
                parent.source = "import"
                continue
            version = m.get("model_version") or "imported"
            others = [store.add_reply(session=session, user_id=user.id, parent_id=parent.id,
                                      content=text, model_version=version,
                                      generation_settings={}, source="import")
                      for text in m.get("rejected", [])]
            reply = store.add_reply(session=session, user_id=user.id, parent_id=parent.id,
                                    content=m["content"], model_version=version,
                                    generation_settings={}, source="import")
            counts["replies"] += 1
            for other in others:
                store.record_preference(session, user_id=user.id, chosen=reply,
                                         rejected=other, source="import")
                counts["preferences"] += 1
            if m.get("vote"):
                v = m["vote"]
                store.set_vote(session=session, user_id=user.id, message_id=reply.id,
                               value=v.get("value"), reasons=v.get("reasons", []),
                               comment=v.get("comment", ""))
                counts["votes"] += v.get("value") is not None
    return dict(counts)


def prompt_for(session: Session, message: Message) -> list[dict[str, str]]:
    """The conversation that led to `message`, following parents, with the system prompt the
    reply was generated under (stored in its settings; an edit keeps its original's), not the
    conversation's current one; replies stored without one (imports) take the current one."""
    chain: list[Message] = []
    node = session.get(Message, message.parent_id) if message.parent_id else None
    while node is not None:
        chain.append(node)
        node = session.get(Message, node.parent_id) if node.parent_id else None
    prompt = [{"role": m.role, "content": m.content} for m in reversed(chain)]
    settings = message.generation_settings or {}
    if "system_prompt" in settings:
        system = settings["system_prompt"]
    else:
        system = (message.conversation.settings or {}).get("system_prompt")
    return ([{"role": "system", "content": system}] if system else []) + prompt


def iter_vote_rows(*, session: Session) -> Iterator[dict[str, Any]]:
    """Current (not withdrawn) votes as TRL unpaired rows, oldest first."""
    for vote, msg in session.execute(
            select(Vote, Message).join(Message, Vote.message_id == Message.id)
            .where(Vote.value.is_not(None)).order_by(Vote.id)):
        yield {"prompt": prompt_for(session, msg),
               "completion": [{"role": "assistant", "content": msg.content}],
               "label": vote.value == 1,
               "vote_id": vote.id, "message_id": msg.id, "user_id": vote.user_id,
               "conversation_id": msg.conversation_id, "voted_at": vote.updated_at.isoformat(),
               "model_version": msg.model_version, "reasons": list(vote.reasons)}


def iter_pair_rows(*, session: Session) -> Iterator[dict[str, Any]]:
    """Preference pairs as TRL preference rows, oldest first."""
    for pref in session.scalars(select(Preference).order_by(Preference.id)):
        chosen = session.get(Message, pref.chosen_id)
        rejected = session.get(Message, pref.rejected_id)
        yield {"prompt": prompt_for(session, chosen),
               "chosen": [{"role": "assistant", "content": chosen.content}],
               "rejected": [{"role": "assistant", "content": rejected.content}],
               "preference_id": pref.id, "source": pref.source, "user_id": pref.user_id,
               "conversation_id": pref.conversation_id, "chosen_id": chosen.id,
               "rejected_id": rejected.id}


def write_jsonl(rows: Iterator[dict[str, Any]], path: Path) -> int:
    """Write rows to `path` atomically (a temp file renamed into place); returns the count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    n = 0
    with open(tmp, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    tmp.replace(path)
    return n


def stats(*, session: Session) -> dict[str, Any]:
    """Counts for the operator: totals, votes by version, reasons, preferences by source."""
    def count(stmt) -> int:
        return session.scalar(stmt) or 0

    by_version: dict[str, dict[str, int]] = {}
    for version, value, n in session.execute(
            select(Message.model_version, Vote.value, func.count())
            .join(Vote, Vote.message_id == Message.id)
            .group_by(Message.model_version, Vote.value)):
        row = by_version.setdefault(version or "unknown", {"up": 0, "down": 0, "withdrawn": 0})
        row["up" if value == 1 else "down" if value == -1 else "withdrawn"] += n
    for row in by_version.values():
        rated = row["up"] + row["down"]
        row["approval"] = round(row["up"] / rated, 3) if rated else None
    reasons: Counter[str] = Counter()
    for (rs,) in session.execute(select(Vote.reasons).where(Vote.value.is_not(None))):
        reasons.update(rs or [])
    return {
        "users": count(select(func.count()).select_from(User)),
        "conversations": count(select(func.count()).select_from(Conversation)),
        "messages": count(select(func.count()).select_from(Message)),
        "replies": count(select(func.count()).select_from(Message)
                         .where(Message.role == "assistant")),
        "votes_up": count(select(func.count()).select_from(Vote).where(Vote.value == 1)),
        "votes_down": count(select(func.count()).select_from(Vote).where(Vote.value == -1)),
        "votes_withdrawn": count(select(func.count()).select_from(Vote)
                                 .where(Vote.value.is_(None))),
        "preferences": dict(session.execute(
            select(Preference.source, func.count()).group_by(Preference.source)).all()),
        "by_model_version": by_version,
        "reasons": dict(reasons.most_common()),
    }
