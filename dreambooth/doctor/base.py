"""What every doctor check returns: a ``Check`` line (``ok`` / ``warn`` / ``fail``, what was found, the fix),
and the small text and version helpers the checks share."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

OK, WARN, FAIL = "ok", "warn", "fail"
STATUSES = (OK, WARN, FAIL)


@dataclass
class Check:
    """One line of the report."""

    name: str
    status: str  # "ok" | "warn" | "fail"
    detail: str
    fix: str = ""

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, not {self.status!r}")


def one_line(text: object, limit: int = 400) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def describe_exception(exc: BaseException) -> str:
    return one_line(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)


def _requirement(dist: str) -> Optional[str]:
    """The version specifier that the installed ``dreambooth`` package asks for ``dist``, if any."""
    try:
        from importlib.metadata import requires

        for req in requires("dreambooth") or []:
            if ";" in req:  # extras ("pytest>=9; extra == 'test'") are not runtime requirements
                continue
            m = re.match(r"^\s*([A-Za-z0-9_.-]+)\s*(\[[^\]]*\])?\s*(.*)$", req)
            if m and m.group(1).lower().replace("_", "-") == dist:
                return m.group(3).strip() or None
    except Exception:
        return None
    return None


def version_mismatch(dist: str, version: str) -> Optional[str]:
    """``"dreambooth requires X"`` when ``version`` is outside the package's requirement for ``dist``."""
    spec = _requirement(dist)
    if not spec:
        return None
    try:
        from packaging.specifiers import SpecifierSet
        from packaging.version import Version

        if Version(version) in SpecifierSet(spec):
            return None
    except Exception:
        return None
    return f"dreambooth requires {dist}{spec}"
