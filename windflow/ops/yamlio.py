"""YAML input with line numbers: every error names the file, the line and the field.

``load(path)`` composes the document (``yaml.compose``: nodes that keep where they
start) and returns a ``Node``; its accessors check types and ranges and raise a
``SpecError`` such as ``examples/workload.yaml line 12: demands[1].fps: expected a number,
got 'fast'``. ``Mapping.allow(...)`` refuses fields it does not know (a typo is an error,
not a silently ignored key).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from windflow.errors import InvalidArgument


class SpecError(InvalidArgument):
    """A malformed workload, catalog or profile: the message names file, line and field."""


_MISSING = object()
_CONSTRUCTOR = yaml.constructor.SafeConstructor()


class Node:
    """One YAML node, with the file it came from and its path in the document."""

    def __init__(self, node: yaml.Node, path: str, file: str) -> None:
        self.node = node
        self.path = path
        self.file = file

    @property
    def line(self) -> int:
        return int(self.node.start_mark.line) + 1

    def error(self, message: str) -> SpecError:
        where = f"{self.path}: " if self.path else ""
        return SpecError(f"{self.file} line {self.line}: {where}{message}")

    def value(self) -> Any:
        """The plain Python value (a scalar, list or dict)."""
        return _CONSTRUCTOR.construct_object(self.node, deep=True)

    def mapping(self) -> Mapping:
        if not isinstance(self.node, yaml.MappingNode):
            raise self.error(f"expected a mapping (key: value lines), got {_kind(self.node)}")
        return Mapping(self)

    def is_sequence(self) -> bool:
        return isinstance(self.node, yaml.SequenceNode)

    def sequence(self) -> list[Node]:
        if not isinstance(self.node, yaml.SequenceNode):
            raise self.error(f"expected a list, got {_kind(self.node)}")
        return [Node(n, f"{self.path}[{i}]", self.file) for i, n in enumerate(self.node.value)]

    def number(self, *, minimum: float | None = None, above: float | None = None) -> float:
        value = self.value() if isinstance(self.node, yaml.ScalarNode) else None
        if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
            raise self.error(f"expected a number, got {_shown(self)}")
        return _ranged(self, float(value), minimum, above)

    def integer(self, *, minimum: int | None = None) -> int:
        value = self.value() if isinstance(self.node, yaml.ScalarNode) else None
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(f"expected a whole number, got {_shown(self)}")
        return int(_ranged(self, value, minimum, None))

    def string(self) -> str:
        value = self.value() if isinstance(self.node, yaml.ScalarNode) else None
        if not isinstance(value, str) or not value:
            raise self.error(f"expected a non-empty string, got {_shown(self)}")
        return value


class Mapping:
    """A mapping node: typed getters by key, each error at the value's own line."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self._items: dict[str, Node] = {}
        self._read: set[str] = set()
        assert isinstance(node.node, yaml.MappingNode)
        for key_node, value_node in node.node.value:
            key = _CONSTRUCTOR.construct_object(key_node)
            key = str(key)
            path = f"{node.path}.{key}" if node.path else key
            if key in self._items:
                raise Node(key_node, path, node.file).error("given twice")
            self._items[key] = Node(value_node, path, node.file)

    def __contains__(self, key: str) -> bool:
        return key in self._items

    def keys(self) -> Iterator[str]:
        return iter(self._items)

    def get(self, key: str) -> Node | None:
        self._read.add(key)
        return self._items.get(key)

    def need(self, key: str) -> Node:
        found = self.get(key)
        if found is None:
            path = f"{self.node.path}.{key}" if self.node.path else key
            raise SpecError(f"{self.node.file} line {self.node.line}: {path}: missing (required)")
        return found

    def number(
        self,
        key: str,
        default: Any = _MISSING,
        *,
        minimum: float | None = None,
        above: float | None = None,
        maximum: float | None = None,
    ) -> float:
        node = self.get(key)
        if node is None:
            if default is _MISSING:
                self.need(key)
            return float(default)
        value = node.number(minimum=minimum, above=above)
        if maximum is not None and value > maximum:
            raise node.error(f"must be at most {maximum:g}, got {value:g}")
        return value

    def integer(self, key: str, default: Any = _MISSING, *, minimum: int | None = None) -> int:
        node = self.get(key)
        if node is None:
            if default is _MISSING:
                self.need(key)
            return int(default)
        return node.integer(minimum=minimum)

    def string(self, key: str, default: Any = _MISSING) -> str:
        node = self.get(key)
        if node is None:
            if default is _MISSING:
                self.need(key)
            return str(default)
        return node.string()

    def allow(self, *known: str) -> Mapping:
        """Refuse any field but ``known`` (checked first: a typo is named as such, not as
        the required field it misspells going missing)."""
        for key, node in self._items.items():
            if key not in known:
                raise node.error(f"unknown field (known here: {', '.join(sorted(known))})")
        return self

    def done(self) -> None:
        """Refuse the fields no getter asked for."""
        for key, node in self._items.items():
            if key not in self._read:
                known = ", ".join(sorted(self._read))
                raise node.error(f"unknown field (known here: {known})")


def load(path: Path) -> Node:
    """The document of ``path`` as a ``Node`` (its root path is '')."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise SpecError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = f" line {mark.line + 1}" if mark is not None else ""
        raise SpecError(f"{path}{line}: not valid YAML: {exc.problem or exc}") from None
    except yaml.YAMLError as exc:
        raise SpecError(f"{path}: not valid YAML: {exc}") from None
    if node is None:
        raise SpecError(f"{path} line 1: the file is empty")
    return Node(node, "", str(path))


def _ranged(node: Node, value: float, minimum: float | None, above: float | None) -> float:
    if minimum is not None and value < minimum:
        raise node.error(f"must be at least {minimum:g}, got {value:g}")
    if above is not None and value <= above:
        raise node.error(f"must be more than {above:g}, got {value:g}")
    return value


def _kind(node: yaml.Node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    return repr(node.value)


def _shown(node: Node) -> str:
    return _kind(node.node)
