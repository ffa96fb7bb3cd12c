"""Errors a user can fix: the command line prints their message alone, without a traceback.

Everything rlhfkit raises because of what the user asked for (a bad option value, a malformed
data row, a missing file, a mistyped model path, an unwritable run directory) derives from
:class:`UserError`. ``rlhfkit <command>`` prints ``rlhfkit <command>: error: <message>`` and
exits with status 2; any other exception is a bug and keeps its traceback. ``--debug`` (or the
environment variable ``RLHFKIT_DEBUG=1``) shows the traceback of user errors too.

The subclasses also derive from the built-in exception that code catching errors by their
kind expects (``ValueError``, ``FileNotFoundError``), so ``except ValueError`` keeps working.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's input; its message says what is wrong and where."""


class ConfigError(UserError, ValueError):
    """An invalid option value, config file, model path or run directory."""


class MissingFileError(UserError, FileNotFoundError):
    """A file the user named does not exist."""


class DiskSpaceError(UserError, OSError):
    """A directory the run writes to has too little free space for what it must write."""
