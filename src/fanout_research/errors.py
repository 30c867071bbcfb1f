"""User-facing errors.

Anything raised as a :class:`FanoutError` is the user's to fix: the CLI prints its message as one
line and exits with status 2. Everything else is a bug and keeps its traceback.
"""

from pydantic import ValidationError


def first_problem(exc: ValidationError) -> str:
    """A pydantic error as one line a user can act on: where, then what (the first problem only)."""
    first = exc.errors()[0]
    return f"{'.'.join(str(part) for part in first['loc'])}: {first['msg']}"


class FanoutError(Exception):
    """Bad input or an impossible request; the message says what to do about it."""


class NotAGitRepoError(FanoutError):
    pass


class DirtyTreeError(FanoutError):
    pass


class UnknownRevisionError(FanoutError):
    pass


class ConfigError(FanoutError):
    pass


class BackendError(FanoutError):
    """A backend refused or failed an operation."""


class UnknownBackendError(BackendError):
    pass


class UnknownJobError(BackendError):
    def __init__(self, slugs: list[str] | tuple[str, ...] | str) -> None:
        self.slugs = [slugs] if isinstance(slugs, str) else list(slugs)
        super().__init__(f"unknown job: {', '.join(self.slugs)}")


class JobSpecError(BackendError):
    """The spec cannot run on this backend (missing command, name taken by another job...)."""
