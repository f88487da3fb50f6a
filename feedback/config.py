"""Where state lives: the data directory and the database URL (the only two environment settings).

`CHAT_DATA_DIR` chooses the folder that holds everything (database file, model versions, caches,
reports); `CHAT_DATABASE_URL` overrides the database (any SQLAlchemy URL, PostgreSQL included).
"""

from __future__ import annotations

import os
from pathlib import Path

DATA_DIR_ENV = "CHAT_DATA_DIR"
DATABASE_URL_ENV = "CHAT_DATABASE_URL"
DEFAULT_DATA_DIR = Path(__file__).resolve().parent.parent / "data"


def data_dir() -> Path:
    """The data directory, created on first use."""
    path = Path(os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def database_url() -> str:
    """The database URL: `CHAT_DATABASE_URL`, else a SQLite file in the data directory."""
    return os.environ.get(DATABASE_URL_ENV) or f"sqlite:///{data_dir() / 'feedback.db'}"
