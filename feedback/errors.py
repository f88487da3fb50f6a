"""The user-facing errors of the store; pages and CLIs turn them into a clear message."""


class FeedbackError(Exception):
    """Base class: something the user can act on, with a message that says what to do."""


class InvalidInput(FeedbackError):
    """Input that breaks a stated limit or rule (empty message, unknown reason, bad import line)."""


class NotFound(FeedbackError):
    """A conversation or message that does not exist, or belongs to another user."""


class StoreUnavailable(FeedbackError):
    """The database is locked, unreachable or not migrated; nothing was written.

    The message is safe to show anyone (no host, user or driver text); `detail` holds what an
    operator needs (the URL without its password, the driver's words) for logs and CLIs."""

    def __init__(self, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.detail = detail


class Busy(FeedbackError):
    """The conversation is waiting for a reply; nothing was written. Try again once it is there."""
