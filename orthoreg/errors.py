"""User-facing errors: the CLI prints these in one line and exits with status 2.

Anything else escaping the CLI is a bug in orthoreg and is shown with its traceback.
"""


class OrthoRegError(Exception):
    """Base of every error caused by the user's input (files, configs, models, vectors)."""


class ConfigError(OrthoRegError, ValueError):
    """A configuration value is unknown, of the wrong type or out of range; names the key."""


class RunLocked(OrthoRegError, RuntimeError):
    """Another live process holds the output directory."""
