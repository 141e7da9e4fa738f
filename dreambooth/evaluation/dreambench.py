"""DreamBench (Ruiz et al., CVPR 2023, section 4.1): its 30 subjects and 25-prompt evaluation lists.

Owns: reading the dataset's ``prompts_and_classes.txt`` (shipped unmodified in
``dreambooth/data/dreambench``, CC-BY-4.0, see ``SOURCE.md`` there) and formatting its prompt
templates for one identifier and class noun. The file is the dataset's own text: a CSV block of
``subject_name,class`` and two Python lists of ``'a {0} {1} ...'.format(unique_token, class_token)``
lines. The templates are extracted with a regex and filled by substituting ``{0}``/``{1}`` only;
nothing from the file is evaluated.
"""

from __future__ import annotations

import csv
import re
from functools import cache
from importlib import resources

DATA_FILE = "prompts_and_classes.txt"
PROMPTS_PER_LIST = 25
LIVE_CLASSES = frozenset({"dog", "cat"})
"""Class nouns of DreamBench's live subjects; the paper gives them the live-subject prompt list."""

_TEMPLATE = re.compile(
    r"""^(['"])(?P<template>.*)\1\s*\.format\(\s*unique_token\s*,\s*class_token\s*\)\s*,?$"""
)
_PLACEHOLDER = re.compile(r"\{([01])\}")
_CLASSES_HEADER = "subject_name,class"
_OBJECT_HEADING = "Object Prompts"
_LIVE_HEADING = "Live Subject Prompts"


def _read_text() -> str:
    return (resources.files("dreambooth") / "data" / "dreambench" / DATA_FILE).read_text(encoding="utf-8")


def _templates(lines: list[str], heading: str) -> tuple[str, ...]:
    """The quoted templates of the ``prompt_list = [...]`` that follows ``heading``."""
    start = lines.index(heading)
    templates: list[str] = []
    for line in lines[start + 1:]:
        if line.startswith("]"):
            break
        match = _TEMPLATE.match(line)
        if match:
            template = match["template"]
            # Only {0} and {1}: any other brace would survive formatting as literal text.
            if set(_PLACEHOLDER.findall(template)) != {"0", "1"} or re.search(r"\{(?![01]\})", template):
                raise ValueError(f"{DATA_FILE}: template {template!r} may use only {{0}} and {{1}}")
            templates.append(template)
    if len(templates) != PROMPTS_PER_LIST:
        raise ValueError(
            f"{DATA_FILE}: {heading!r} has {len(templates)} prompt templates, expected {PROMPTS_PER_LIST}"
        )
    return tuple(templates)


@cache
def _parsed() -> tuple[tuple[tuple[str, str], ...], tuple[str, ...], tuple[str, ...]]:
    """(subject, class) pairs in file order, the object templates, the live-subject templates."""
    lines = [line.strip() for line in _read_text().splitlines()]
    start = lines.index(_CLASSES_HEADER) + 1
    end = lines.index("Prompts", start)
    rows = [row for row in csv.reader(line for line in lines[start:end] if line)]
    if any(len(row) != 2 for row in rows):
        raise ValueError(f"{DATA_FILE}: every class line must be 'subject_name,class'")
    classes = tuple((name.strip(), noun.strip()) for name, noun in rows)
    return classes, _templates(lines, _OBJECT_HEADING), _templates(lines, _LIVE_HEADING)


def dreambench_classes() -> dict[str, str]:
    """Subject name (the dataset's folder name, e.g. ``dog2``) -> class noun (e.g. ``dog``), 30 entries."""
    return dict(_parsed()[0])


def is_live_subject(class_noun: str) -> bool:
    """Whether the paper scores this class with the live-subject prompts (dogs and cats)."""
    return class_noun.strip().lower() in LIVE_CLASSES


def dreambench_templates(live: bool) -> list[str]:
    """The 25 raw templates (``{0}`` = identifier, ``{1}`` = class noun) of the live or object list."""
    return list(_parsed()[2] if live else _parsed()[1])


def dreambench_prompts(identifier: str, class_noun: str, live: bool | None = None) -> list[str]:
    """The 25 evaluation prompts for one subject, e.g. ``a sks dog in the jungle``.

    ``live`` picks the live-subject list (accessories, outfits) or the object list; ``None`` decides
    by ``is_live_subject(class_noun)``, as the paper does.
    """
    if live is None:
        live = is_live_subject(class_noun)
    words = {"0": identifier, "1": class_noun}
    # One pass over the template, so an identifier that itself contains "{1}" is left alone.
    return [_PLACEHOLDER.sub(lambda m: words[m.group(1)], t) for t in dreambench_templates(live)]


OTHER_CLASSES = ("dog", "cat", "backpack", "vase", "teapot", "sneaker", "clock", "bear plushie")
"""DreamBench classes whose plain prompts measure collateral drift (the subject's own class is left out)."""


def other_class_prompts(class_noun: str, count: int = 4) -> list[str]:
    """Plain prompts of ``count`` other DreamBench classes, e.g. "a photo of a vase" (same list every run)."""
    others = [c for c in OTHER_CLASSES if c != class_noun][:count]
    return [f"a photo of a {c}" for c in others]
