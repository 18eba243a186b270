"""The trainer's base error, in a module of its own so that every layer can raise it without importing the config
(`config.py` re-exports it: `from .config import ConfigError` keeps working)."""


class ConfigError(ValueError):
    """A configuration value or key the user must change; the message says what to write instead."""
