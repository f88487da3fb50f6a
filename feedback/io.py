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

from sqlalchemy import func, insert, select
from sqlalchemy.orm import Session

from feedback import store
from feedback.config import output_file
from feedback.errors import InvalidInput
from feedback.jsonl import read_jsonl
from feedback.models import Conversation, Message, Preference, User, Vote, VoteEvent, utcnow

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
    """Import every conversation in `path`, or nothing at all if any line is malformed.

    Every line is checked first; then the rows go in with a few multi-row INSERTs per batch
    of conversations (one per depth of the message trees, one each for votes, their history
    and preferences), so a large import holds the write lock for seconds, not a minute."""
    records = [_parse_line(lineno, value) for lineno, value in read_jsonl(path)]
    counts: Counter[str] = Counter()
    users = {name: store.get_or_create_user(session=session, username=name).id
             for name in dict.fromkeys(r["user"] for r in records)}
    for start in range(0, len(records), IMPORT_BATCH):
        _write_batch(session, records[start:start + IMPORT_BATCH], users, counts)
    return dict(counts)


IMPORT_BATCH = 500


def _title(rec: dict) -> str:
    if rec.get("title"):
        return rec["title"]
    first = next((m["content"] for m in rec["messages"] if m["role"] == "user"), "")
    line = first.strip().splitlines()[0] if first.strip() else store.DEFAULT_TITLE
    return line[:60] + ("…" if len(line) > 60 else "")


def _insert(session: Session, model, rows: list[dict]) -> list[int]:
    """Insert `rows` in one statement; their new ids, in order."""
    if not rows:
        return []
    stmt = insert(model).returning(model.id, sort_by_parameter_order=True)
    return list(session.scalars(stmt, rows))


def _write_batch(session: Session, records: list[dict], users: dict[str, int],
                 counts: Counter) -> None:
    now = utcnow()
    convs = [(rec, rec["messages"][1:] if rec["messages"][0]["role"] == "system"
              else rec["messages"]) for rec in records]
    conv_ids = _insert(session, Conversation, [
        {"user_id": users[rec["user"]], "title": _title(rec), "created_at": now,
         "updated_at": now, "settings": {"system_prompt": rec["messages"][0]["content"]}
         if rec["messages"][0]["role"] == "system" else {}} for rec, _ in convs])
    counts["conversations"] += len(conv_ids)
    # The message trees, one depth at a time: every row's parent already has its id.
    parents: list[int | None] = [None] * len(convs)
    kept: list[tuple[int, dict, int]] = []  # (conversation index, message, id): main line
    rejected_of: list[tuple[int, int, dict]] = []  # (conversation index, chosen id, message)
    depth = 0
    while True:
        level = [(i, msgs[depth]) for i, (_, msgs) in enumerate(convs) if depth < len(msgs)]
        if not level:
            break
        rows, extra = [], []
        for i, m in level:
            base = {"conversation_id": conv_ids[i], "parent_id": parents[i], "role": m["role"],
                    "content": m["content"], "source": "import", "selected": True,
                    "created_at": now}
            if m["role"] == "assistant":
                base.update(model_version=m.get("model_version") or "imported",
                            generation_settings={})
            rows.append(base)
            for text in m.get("rejected", []):
                extra.append((i, {**base, "content": text, "selected": False}))
        ids = _insert(session, Message, rows)
        other_ids = _insert(session, Message, [row for _, row in extra])
        for (i, m), new_id in zip(level, ids):
            parents[i] = new_id
            if m["role"] == "assistant":
                kept.append((i, m, new_id))
        for (i, _), other_id in zip(extra, other_ids):
            rejected_of.append((i, parents[i], other_id))
        depth += 1
    counts["replies"] += len(kept)
    prefs = [{"user_id": users[convs[i][0]["user"]], "conversation_id": conv_ids[i],
              "chosen_id": chosen, "rejected_id": other, "source": "import",
              "created_at": now} for i, chosen, other in rejected_of]
    _insert(session, Preference, prefs)
    counts["preferences"] += len(prefs)
    voted = [(i, m, mid) for i, m, mid in kept
             if m.get("vote") and m["vote"].get("value") is not None]
    vote_rows = [{"message_id": mid, "user_id": users[convs[i][0]["user"]],
                  "value": m["vote"]["value"], "reasons": list(m["vote"].get("reasons", [])),
                  "comment": m["vote"].get("comment", ""), "created_at": now,
                  "updated_at": now} for i, m, mid in voted]
    vote_ids = _insert(session, Vote, vote_rows)
    _insert(session, VoteEvent, [{"vote_id": vid, "value": row["value"],
                                  "reasons": row["reasons"], "comment": row["comment"],
                                  "created_at": now} for vid, row in zip(vote_ids, vote_rows)])
    counts["votes"] += len(vote_ids)


def reply_prompt(session: Session, message: Message) -> list[dict[str, str]]:
    """The exact prompt reply `message` was generated from (`store.prompt_for`), with the
    system prompt stored in its settings (an edit keeps its original's), not the
    conversation's current one; replies stored without one (imports) take the current one."""
    settings = message.generation_settings or {}
    if "system_prompt" in settings:
        system = settings["system_prompt"]
    else:
        system = (message.conversation.settings or {}).get("system_prompt")
    return store.prompt_for(session=session, parent_id=message.parent_id, system_prompt=system)


def iter_vote_rows(*, session: Session) -> Iterator[dict[str, Any]]:
    """Current (not withdrawn) votes as TRL unpaired rows, oldest first."""
    for vote, msg in session.execute(
            select(Vote, Message).join(Message, Vote.message_id == Message.id)
            .where(Vote.value.is_not(None)).order_by(Vote.id)):
        yield {"prompt": reply_prompt(session, msg),
               "completion": [{"role": "assistant", "content": msg.content}],
               "label": vote.value == 1,
               "vote_id": vote.id, "message_id": msg.id, "user_id": vote.user_id,
               "conversation_id": msg.conversation_id, "voted_at": vote.updated_at.isoformat(),
               "model_version": msg.model_version, "reasons": list(vote.reasons),
               "comment": vote.comment or ""}


def iter_pair_rows(*, session: Session) -> Iterator[dict[str, Any]]:
    """Preference pairs as TRL preference rows, oldest first."""
    for pref in session.scalars(select(Preference).order_by(Preference.id)):
        chosen = session.get(Message, pref.chosen_id)
        rejected = session.get(Message, pref.rejected_id)
        yield {"prompt": reply_prompt(session, chosen),
               "chosen": [{"role": "assistant", "content": chosen.content}],
               "rejected": [{"role": "assistant", "content": rejected.content}],
               "preference_id": pref.id, "source": pref.source, "user_id": pref.user_id,
               "conversation_id": pref.conversation_id, "chosen_id": chosen.id,
               "rejected_id": rejected.id}


def write_jsonl(rows: Iterator[dict[str, Any]], path: Path) -> int:
    """Write rows to `path` atomically (a temp file renamed into place); returns the count.
    A path that cannot be a file (a folder, a file or a link to nothing where a folder goes,
    no permission) raises InvalidInput naming it, and leaves no temp file behind."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    n, made = 0, False
    try:
        output_file(path)
        with open(tmp, "w", encoding="utf-8") as fh:
            made = True
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
                n += 1
        tmp.replace(path)
    except OSError as exc:
        if made:
            tmp.unlink(missing_ok=True)
        raise InvalidInput(f"cannot write {path}: {exc.strerror if exc.filename else exc}") \
            from exc
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
