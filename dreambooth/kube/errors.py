"""The two errors of ``dreambooth.kube``: a cluster that cannot be used, and input the user must fix."""

from __future__ import annotations


class KubeError(RuntimeError):
    """The cluster cannot be reached or used; the message says what to check."""


class KubeConfigError(KubeError, ValueError):
    """A kubeconfig or cluster spec the user must fix (bad input: exit code 2)."""
