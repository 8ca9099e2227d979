"""YAML for recipes: PyYAML's safe loader, made strict where it is silently lenient.

PyYAML keeps the last of a key given twice (`lr: 3e-4` then `lr: 500` trains at 500) and, following YAML
1.1, reads `1e-3` as a string; here the first is an error naming the dotted key and both lines, the second
a float as in YAML 1.2.
"""

from __future__ import annotations

import re
from typing import Any

import yaml


class DuplicateKeyError(ValueError):
    """A mapping key given twice: the message names its dotted path and both lines."""


class RecipeLoader(yaml.SafeLoader):
    """The safe loader with YAML 1.2's floats; `parse_yaml` checks keys on the node tree it composes."""


RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _reject_duplicate_keys(node: yaml.Node, path: tuple[str, ...] = ()) -> None:
    if isinstance(node, yaml.MappingNode):
        first_line: dict[str, int] = {}
        for key, value in node.value:
            name = str(key.value)
            dotted = ".".join((*path, name))
            if name in first_line:
                raise DuplicateKeyError(
                    f"{dotted}: given twice, on lines {first_line[name]} and {key.start_mark.line + 1}"
                )
            first_line[name] = key.start_mark.line + 1
            _reject_duplicate_keys(value, (*path, name))
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _reject_duplicate_keys(item, (*path, str(index)))


def parse_yaml(text: str) -> Any:
    """YAML through `RecipeLoader`: duplicate keys rejected with their dotted path and lines."""
    loader = RecipeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _reject_duplicate_keys(node)
        return loader.construct_document(node)
    finally:
        loader.dispose()
