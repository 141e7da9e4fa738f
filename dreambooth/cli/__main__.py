"""``python -m dreambooth.cli``: the ``dreambooth`` command."""

import sys

from dreambooth.cli import main

sys.exit(main())
