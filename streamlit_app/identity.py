"""Who is chatting: the signed-in user when `st.login` (OIDC) is configured, else one local user.

Auth is configured by an `[auth]` section in `.streamlit/secrets.toml` (see README).
"""

from __future__ import annotations

from dataclasses import dataclass

import streamlit as st


@dataclass(frozen=True)
class Identity:
    username: str
    display_name: str

    @property
    def is_local(self) -> bool:
        return self == LOCAL_USER


LOCAL_USER = Identity("local", "Local user")


def auth_configured() -> bool:
    try:
        return "auth" in st.secrets
    except Exception:  # no secrets file at all
        return False


def current_user() -> Identity | None:
    """Who is chatting, or None while sign-in is required and not done."""
    if not auth_configured():
        return LOCAL_USER
    if not st.user.is_logged_in:
        return None
    username = st.user.get("email") or st.user.get("sub")
    return Identity(str(username), str(st.user.get("name") or username))
