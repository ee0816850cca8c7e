"""Small name -> object registries filled by a decorator (torchvision/timm style)."""

from __future__ import annotations

from typing import Any, Callable, Generic, Iterator, TypeVar

from capsbench.core.errors import CapsbenchError

T = TypeVar("T")


class Registry(Generic[T]):
    """One dict per kind of thing (models, attacks, suites...). Duplicates are refused."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        self._meta: dict[str, dict[str, Any]] = {}

    def register(self, name: str, **meta: Any) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = obj
            self._meta[name] = meta
            return obj

        return deco

    def remove(self, name: str) -> None:
        """Forget ``name`` (something registered for a while: a test's throwaway part)."""
        self._items.pop(name, None)
        self._meta.pop(name, None)

    def get(self, name: str) -> T:
        if name not in self._items:
            known = ", ".join(sorted(self._items)) or "(none)"
            plural = self.kind + ("es" if self.kind.endswith("s") else "s")
            raise CapsbenchError(f"unknown {self.kind} {name!r}; known {plural}: {known}")
        return self._items[name]

    def meta(self, name: str) -> dict[str, Any]:
        self.get(name)
        return self._meta[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
