"""One registry per axis (methods, objectives, data formats, model sources), and the plugins that extend them.

An entry is registered by the file that defines it (``METHODS.register(Method(name="lora", ...))``); the axis
package imports its built-in files, and a user's own package registers more entries when it is imported:

    python train.py plugins=[my_package.my_method] method=my_method hydra.searchpath=[pkg://my_package.configs]

``plugins`` (a list of importable module names) is imported before any config check, and so is every module an
installed distribution declares under the ``tunelab.plugins`` entry-point group. Nothing outside an entry's
own file tests its name: the rest of the code asks the entry (its config check, head, data kind, flags).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterator, Sequence
from importlib.metadata import entry_points
from typing import Generic, Protocol, TypeVar

from tunelab.errors import ConfigError

PLUGIN_GROUP = "tunelab.plugins"


class Named(Protocol):
    name: str


T = TypeVar("T", bound=Named)


class Registry(Generic[T]):
    """Entries of one axis by name; ``registry[name]`` refuses an unknown name in one sentence."""

    def __init__(self, axis: str) -> None:
        self.axis = axis
        self._entries: dict[str, T] = {}

    def register(self, entry: T) -> T:
        """Add ``entry`` under ``entry.name``; a second, different entry of the same name is refused."""
        known = self._entries.get(entry.name)
        if known is not None and known is not entry:
            raise ConfigError(f"{self.axis}={entry.name!r} is registered twice ({known!r} and {entry!r})")
        self._entries[entry.name] = entry
        return entry

    def __getitem__(self, name: str) -> T:
        if name not in self._entries:
            raise ConfigError(
                f"{self.axis}={name!r} is not one of {sorted(self._entries)}; an entry of your own package is "
                "named with plugins=[your_package.module] (README: Contributing)"
            )
        return self._entries[name]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


def import_submodules(package: str, path: Sequence[str]) -> None:
    """Import every module of an axis package (``package``, its ``__path__``): each registers its entries, so a
    new built-in entry is its file alone (plus its YAML)."""
    for module in pkgutil.iter_modules(path):
        importlib.import_module(f"{package}.{module.name}")


def load_plugins(modules: Sequence[str] = ()) -> None:
    """Import ``modules`` (their import registers their entries) and every ``tunelab.plugins`` entry point."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as error:
            raise ConfigError(f"plugins: cannot import {module!r} ({error}); is its package on PYTHONPATH?") from error
    for point in entry_points(group=PLUGIN_GROUP):
        point.load()
