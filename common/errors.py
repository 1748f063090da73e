"""The error for input a user can fix; commands show it as one line and exit with status 2."""

from __future__ import annotations


class JobError(Exception):
    """A problem with the job's inputs that the user can fix; shown without a traceback."""

    def brief(self) -> str:
        """The one line a command prints for it: the message with its line breaks folded."""
        return " ".join(str(self).split())
