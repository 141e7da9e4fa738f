"""The ``dreambooth`` command: parse → build one validated config → call a stage. Nothing else.

Exit codes: 0 success (or already complete), 2 bad input (nothing was started), 1 a failure while running.

Modules: ``parser`` (every subcommand's flags, help text and example: ``build_parser``), ``commands``
(what each subcommand does: ``config_from_args`` and the ``cmd_*`` functions). This module owns
``main``: logging, running the chosen command and turning its errors into exit codes
(``python -m dreambooth.cli`` runs it too).
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable, Optional, Sequence

from dreambooth.cli.commands import config_from_args  # noqa: F401 - the package's public names
from dreambooth.cli.parser import build_parser
from dreambooth.config import ConfigError
from dreambooth.inputs import InputError
from dreambooth.storage import StorageError
from dreambooth.subjects import SubjectError


def setup_logging(quiet: bool) -> None:
    import os

    from dreambooth.models import quiet_libraries

    if not _has_cuda():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # silences DeepSpeed's accelerator probe
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    quiet_libraries()


def _kube_config_error() -> type:
    from dreambooth.kube import KubeConfigError

    return KubeConfigError


def _kube_error() -> type:
    from dreambooth.kube import KubeError

    return KubeError


def _training_failed() -> type[Exception]:
    from dreambooth.pipeline import TrainingFailed

    return TrainingFailed


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.quiet)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except (ConfigError, SubjectError, StorageError, PermissionError, InputError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except _kube_config_error() as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except _training_failed() as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except _kube_error() as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
