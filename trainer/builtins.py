"""Built-in teachers by name (`builtin:<name>`): a registry that the packages holding them fill.

The trainer registers its random-weight plumbing models (`tiny_models`); the demo registers its trained
teachers (`demo/__init__.py`, run by the pack's top-level import before anything reads a config). Nothing here
knows where a teacher lives: each entry is a function that returns a diffusers folder.
"""

from __future__ import annotations

import logging
from typing import Callable

logger = logging.getLogger(__name__)

PREFIX = "builtin:"
_FOLDERS: dict[str, Callable[[], str]] = {}
_DESCRIPTIONS: dict[str, str] = {}
_RENAMED: dict[str, str] = {}  # old name -> current name (still accepted, with a note)


def register(name: str, folder: Callable[[], str], description: str, old_names: tuple[str, ...] = ()) -> None:
    """`builtin:<name>` resolves to `folder()`; `old_names` keep working with a note."""
    _FOLDERS[name], _DESCRIPTIONS[name] = folder, description
    _RENAMED.update({old: name for old in old_names})


def names() -> tuple[str, ...]:
    """The current names (old names excluded), in registration order."""
    return tuple(_FOLDERS)


def accepted() -> tuple[str, ...]:
    """Every name `resolve` takes: the current ones and the old ones."""
    return (*_FOLDERS, *_RENAMED)


def describe() -> str:
    """One line per built-in teacher, for help texts."""
    return "; ".join(f"{PREFIX}{name}: {_DESCRIPTIONS[name]}" for name in _FOLDERS)


def current_name(name: str) -> str:
    """The current name of a built-in teacher (an old one is mapped, with a note in the log)."""
    if name in _RENAMED:
        logger.warning("%s%s is now called %s%s; the old name keeps working", PREFIX, name, PREFIX, _RENAMED[name])
        return _RENAMED[name]
    return name


def resolve(name_or_path: str) -> str:
    """The folder of `builtin:<name>`; any other path or id passes through."""
    if not name_or_path.startswith(PREFIX):
        return name_or_path
    name = current_name(name_or_path[len(PREFIX):])
    if name not in _FOLDERS:
        raise ValueError(f"unknown built-in model {name_or_path!r}; choose one of: "
                         + ", ".join(PREFIX + n for n in _FOLDERS))
    return _FOLDERS[name]()
