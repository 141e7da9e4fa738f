"""Subject jobs as KubeRay RayJobs: build them, submit them idempotently, read back their status.

Modules, each owning one concern:

- ``manifests``: names (RayJob names, labels, bulk-run names; Kubernetes names checked as user input),
  the entrypoint of a subject's job, the ``RayJob`` objects (``ray.io/v1``) and ConfigMaps as plain
  dicts, and their YAML. Talks to no cluster.
- ``layouts``: the two job layouts (one bulk driver per manifest, or one RayJob per subject), the
  submitter pod, and the bulk summary ConfigMap a driver publishes.
- ``client``: the Kubernetes API client (kubeconfig or in-cluster credentials checked as user input;
  every call under a timeout), server-side apply of the objects, and the server's errors as text.
- ``status``: ``dreambooth status``: the RayJobs of a namespace, one row per subject, as a table.
- ``errors``: ``KubeError`` (the cluster cannot be used) and ``KubeConfigError`` (input to fix).

The names below are the package's public API (``from dreambooth.kube import build_rayjob``);
``layouts`` and ``status`` are used as modules (``from dreambooth.kube import layouts``).
"""

from dreambooth.kube.errors import KubeConfigError, KubeError  # noqa: F401 - the package's public names
from dreambooth.kube.manifests import (  # noqa: F401 - the package's public names
    API_VERSION, APP_NAME, APPLY_PATCH, CLUSTER_SELECTOR_KEY, DEFAULT_ENTRYPOINT_MODULE, FIELD_MANAGER, GROUP, KIND,
    LABEL_BULK_RUN, LABEL_MANAGED_BY, LABEL_NAME, LABEL_SUBJECT, MAX_LABEL, MAX_RAYJOB_NAME, PLURAL, VERSION,
    RayJobTarget, SubjectJob, build_bulk_objects, build_entrypoint, build_rayjob, default_bulk_run,
    load_cluster_spec, rayjob_name, rayjobs_to_yaml, validate_k8s_name,
)
from dreambooth.kube.client import (  # noqa: F401 - the package's public names
    REQUEST_TIMEOUT_S, SubmitResult, cluster_head_image, format_submit_results, load_api_client, submit,
)
from dreambooth.kube import layouts, status  # noqa: F401, E402 - submodules, as attributes of the package
