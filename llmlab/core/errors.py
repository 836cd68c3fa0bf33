"""Errors a user can cause. The CLI turns each into one stderr line and an exit code."""


class LlmlabError(Exception):
    """Base class: the message is one line naming the problem and the fix."""

    exit_code = 1


class UsageError(LlmlabError):
    """An invalid option value or combination."""

    exit_code = 2


class DataError(LlmlabError):
    """An input file that is missing, unreadable or malformed."""

    exit_code = 3


class TemplateError(LlmlabError):
    """A prompt template that is missing or malformed."""

    exit_code = 3


class ModelError(LlmlabError):
    """A model that cannot be found or loaded."""

    exit_code = 4


class ContextOverflowError(LlmlabError):
    """A prompt that does not fit the model's context window."""

    exit_code = 5


class Interrupted(LlmlabError):
    """A run stopped by Ctrl-C (exit 130) or SIGTERM (exit 143) with its finished records kept: the
    message says how many and how to finish."""

    def __init__(self, message: str, exit_code: int = 130):
        super().__init__(message)
        self.exit_code = exit_code
