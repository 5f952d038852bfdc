"""The one base class of the errors a user can fix."""

from __future__ import annotations


class UserError(Exception):
    """Bad input or a setting that cannot work here. Its message names the
    file or option and the fix, so the command line prints it on one line
    instead of a traceback. Each module's error derives from it (and from
    the built-in type it has always been, for callers that catch that)."""


class ConfigError(UserError, ValueError):
    """A setting that cannot work: an option's value, or one this machine
    cannot run (a GPU asked for and none there, a runtime not installed)."""
