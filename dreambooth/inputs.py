"""Reading what users hand us, within stated limits.

Owns the limits on user input that would otherwise cost memory or time out of proportion to its
size, and the one YAML reader every user file goes through (configs, manifests, cluster specs,
kubeconfigs). A few hostile bytes must not cost gigabytes or hang: YAML aliases are expanded
lazily by PyYAML but explode in anything that walks the result ("billion laughs"), so documents
whose expanded size passes ``MAX_YAML_NODES`` are refused before anything walks them.

Every refusal is an ``InputError`` (a ``ValueError``) whose message names the file and the limit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

MAX_CONFIG_BYTES = 1 << 20
"""Largest config file, cluster spec or kubeconfig read (1 MiB)."""

MAX_MANIFEST_BYTES = 64 << 20
"""Largest bulk manifest read (64 MiB: hundreds of thousands of subjects)."""

MAX_YAML_NODES = 2_000_000
"""Largest YAML document, counted in nodes after alias expansion."""

MAX_TEXT_FIELD = 4096
"""Longest string any single config value may hold."""

MAX_PROMPT_CHARS = 1000
"""Longest prompt after ``{identifier}``/``{class_noun}`` are filled in (CLIP reads 77 tokens)."""

MAX_ERROR_VALUE = 80
"""Characters of a user's value quoted back in an error message."""


class InputError(ValueError):
    """User input that is too large, malformed or not text; the message names the file and limit."""


def shorten(value: Any, limit: int = MAX_ERROR_VALUE) -> str:
    """``repr(value)`` cut to ``limit`` characters, for quoting a user's value in a message."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 15]}... ({len(text)} chars)"


def read_text(path: str | Path, what: str, max_bytes: int = MAX_CONFIG_BYTES) -> str:
    """A UTF-8 text file of at most ``max_bytes``; ``what`` names it in errors (e.g. ``--config``)."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{what} {path} does not exist or is not a file; pass an existing YAML file")
    size = p.stat().st_size
    if size > max_bytes:
        raise InputError(f"{what} {path} is {size:,} bytes, more than the {max_bytes:,}-byte limit; is it the right file?")
    data = p.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{what} {path} is not a UTF-8 text file (binary data at byte "
                         f"{_first_bad_byte(data)}); pass a YAML file") from None


def _first_bad_byte(data: bytes) -> int:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return exc.start
    return -1


def _expanded_size(node: yaml.Node, limit: int, memo: dict[int, int]) -> int:
    """Nodes in ``node`` with every alias expanded, memoized per node (so it is linear in the text)."""
    key = id(node)
    if key in memo:
        if memo[key] < 0:
            raise InputError("recursive YAML alias")
        return memo[key]
    memo[key] = -1
    total = 1
    if isinstance(node, yaml.SequenceNode):
        children = node.value
    elif isinstance(node, yaml.MappingNode):
        children = [n for pair in node.value for n in pair]
    else:
        children = []
    for child in children:
        total += _expanded_size(child, limit, memo)
        if total > limit:
            break
    memo[key] = total
    return total


def parse_yaml(text: str, source: str, max_nodes: int = MAX_YAML_NODES) -> Any:
    """``yaml.safe_load`` that refuses alias bombs and names ``source`` in every error."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        raise InputError(f"{source} is not valid YAML: {_yaml_reason(exc)}") from None
    if node is None:
        return None
    try:
        size = _expanded_size(node, max_nodes, {})
    except InputError as exc:
        raise InputError(f"{source}: {exc}; remove the self-referencing anchor") from None
    if size > max_nodes:
        raise InputError(
            f"{source} expands to more than {max_nodes:,} YAML nodes (anchors/aliases repeated inside each other); "
            "write the values out or use fewer nested aliases"
        )
    try:
        return yaml.SafeLoader(text).get_single_data()
    except yaml.YAMLError as exc:
        raise InputError(f"{source} is not valid YAML: {_yaml_reason(exc)}") from None


def _yaml_reason(exc: yaml.YAMLError) -> str:
    """PyYAML's message without the echoed document, which can be huge."""
    text = " ".join(str(exc).split())
    return text if len(text) <= 300 else text[:297] + "..."


def load_yaml_file(path: str | Path, what: str, max_bytes: int = MAX_CONFIG_BYTES, max_nodes: int = MAX_YAML_NODES) -> Any:
    """Read and parse a user's YAML file within the limits above."""
    return parse_yaml(read_text(path, what, max_bytes), f"{what} {path}", max_nodes)
