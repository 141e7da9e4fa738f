"""Rewrite the README's config reference from dreambooth.config (tests/test_docs.py checks it)."""

import re
from pathlib import Path

from dreambooth.config import reference_markdown

readme = Path(__file__).resolve().parents[1] / "README.md"
text = readme.read_text()
text = re.sub(
    r"(<!-- config-reference.*?-->\n).*?(\n<!-- /config-reference -->)",
    lambda m: m.group(1) + reference_markdown() + m.group(2),
    text,
    flags=re.S,
)
readme.write_text(text)
