"""The README stays true: its config reference matches the code."""

import re

from conftest import REPO
from dreambooth.config import reference_markdown


def test_readme_config_reference_is_current():
    readme = (REPO / "README.md").read_text()
    block = re.search(r"<!-- config-reference.*?-->\n(.*?)\n<!-- /config-reference -->", readme, re.S)
    assert block, "README lost its config-reference block"
    assert block.group(1).strip() == reference_markdown().strip(), (
        "README config reference is stale: run scripts/update-readme-reference.py"
    )
