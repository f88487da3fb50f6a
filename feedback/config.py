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


def make_folder(path: Path) -> Path:
    """`path` as a folder, made with its parents where missing. Where a part of it is in the
    way (a file, or a link to something that does not exist: a disk not mounted), raises
    NotADirectoryError naming that part, not mkdir's bare "File exists"."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as exc:
        for part in reversed([path, *path.parents]):
            if part.is_symlink() and not part.exists():
                raise NotADirectoryError(
                    f"{part} is a link to {os.readlink(part)}, which does not exist (a disk "
                    f"not mounted?): make it exist, or remove the link to start that folder "
                    f"afresh") from exc
            if part.exists() and not part.is_dir():
                raise NotADirectoryError(f"{part} is a file, not a folder: {path} cannot be "
                                         f"made there") from exc
        raise
    return path


def output_file(path: Path) -> Path:
    """`path` checked as a file to write, before any work is done: not a folder, and its folder
    made (`make_folder`: what is in the way named). Raises IsADirectoryError or
    NotADirectoryError with a message that says which."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder: give the file to write, e.g. "
                                f"{path / 'out.jsonl'}")
    make_folder(path.parent)
    return path


def data_dir() -> Path:
    """The data directory, created on first use (checked before its links are followed: a
    link to nothing is named, not followed to a folder made where the disk should be)."""
    path = Path(os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR).expanduser()
    make_folder(path.absolute())
    return path.resolve()


def database_url() -> str:
    """The database URL: `CHAT_DATABASE_URL`, else a SQLite file in the data directory."""
    return os.environ.get(DATABASE_URL_ENV) or f"sqlite:///{data_dir() / 'feedback.db'}"
