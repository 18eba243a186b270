"""The trainer's base error, in a module of its own so that every layer can raise it without importing the config
(`config.py` re-exports it: `from .config import ConfigError` keeps working)."""

PACKAGE = "decoupled_dmd"


def public_name(cls: type) -> type:
    """Give an exception class the module name it has when installed with pip, wherever it was imported from.

    ComfyUI imports the pack under its folder's path (module `/…/custom_nodes/ComfyUI-DecoupledDMD.trainer.errors`)
    and names an exception by module and class in its error report, so a creator saw a file path where the type
    belongs. The path part is the package's name (dots in it are `_x_`), so it is the first dotted part."""
    module = cls.__module__
    if module != PACKAGE and not module.startswith(PACKAGE + "."):
        cls.__module__ = f"{PACKAGE}.{module.split('.', 1)[1]}" if "." in module else PACKAGE
    return cls


@public_name
class ConfigError(ValueError):
    """A configuration value or key the user must change; the message says what to write instead."""
