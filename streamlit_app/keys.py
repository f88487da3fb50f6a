"""Every key the chat page keeps in `st.session_state`, in one place.

Widgets of one reply or conversation carry its id in their key, so each keeps its own state
across reruns; the generation settings of a chat not yet created live under "new" and move to
the conversation's id when its first message creates it (`adopt_new_settings`).
"""

from __future__ import annotations

CHAT_BOX = "chat_box"  # the message being typed
CONVERSATION = "conversation_id"  # the open conversation (None: a new chat)
EDITING = "editing"  # the reply whose edit form is open
NOTICE = "notice"  # an error to show once, at the top of the next run
USER_ID = "user_id"
USERNAME = "username"  # whose user_id that is (a changed sign-in looks the user up again)
UNSAVED_VOTES = "unsaved_votes"  # votes the database has not taken yet (ChatSession.unsaved)
NEW = "new"
SETTINGS = ("system", "temperature", "max_tokens")  # per-conversation generation widgets


def setting(name: str, conversation_id: int | None) -> str:
    assert name in SETTINGS, name
    return f"{name}_{conversation_id if conversation_id is not None else NEW}"


def adopt_new_settings(state, conversation_id: int) -> None:
    """The new chat's settings become the conversation's, once it exists."""
    for name in SETTINGS:
        if setting(name, None) in state:
            state[setting(name, conversation_id)] = state[setting(name, None)]


def vote(message_id: int) -> str:
    return f"vote_{message_id}"


def reasons(message_id: int, value: int) -> str:  # one per thumb: their options differ
    return f"reasons_{message_id}_{value}"


def comment(message_id: int, value: int) -> str:
    return f"comment_{message_id}_{value}"


def edit_text(message_id: int) -> str:
    return f"edit_text_{message_id}"


def title(conversation_id: int) -> str:
    return f"title_{conversation_id}"


def widget(kind: str, item_id: int) -> str:
    """A button or form of one reply or conversation (never read back from the state)."""
    return f"{kind}_{item_id}"
