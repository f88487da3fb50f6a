"""Alembic environment: runs the numbered revisions in `versions/` on the connection it is given.

`feedback.db.migrate` passes a live connection in `config.attributes["connection"]`, so the
same code migrates SQLite and PostgreSQL; `alembic` on the command line works too, with
`-x url=...` or the `CHAT_DATABASE_URL` setting (a config whose `script_location` is this
folder), through the store's own engine: SQLite's pragmas, and a write lock taken up front.
"""

from alembic import context

from feedback.config import database_url
from feedback.db import make_engine
from feedback.models import Base

config = context.config
target_metadata = Base.metadata


def run() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        context.configure(connection=connection, target_metadata=target_metadata,
                          render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
        return
    url = context.get_x_argument(as_dictionary=True).get("url") or database_url()
    with make_engine(url).connect() as conn:
        conn.execution_options(write=True)  # BEGIN IMMEDIATE on SQLite, as migrate() does
        context.configure(connection=conn, target_metadata=target_metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()


run()
