"""``dreambooth status``: what KubeRay and the bulk drivers report about a namespace's dreambooth jobs.

Owns reading RayJobs (from this CLI or the Helm chart, found by the ``dreambooth.io/bulk-run`` label
whatever the release name or ``nameOverride``), expanding a bulk-layout RayJob into one row per
subject from the summary ConfigMap its driver publishes, and the table printed for them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

from dreambooth.kube import layouts
from dreambooth.kube.client import api_error_text, unreachable
from dreambooth.kube.errors import KubeError
from dreambooth.kube.manifests import GROUP, LABEL_BULK_RUN, LABEL_SUBJECT, PLURAL, VERSION

STATUS_COLUMNS = ("SUBJECT", "RAYJOB", "JOB STATUS", "DEPLOYMENT", "START", "END", "MESSAGE")


@dataclass(frozen=True)
class JobStatus:
    """The state of one RayJob as KubeRay reports it (empty strings when not yet set)."""

    name: str
    subject: str
    bulk_run: str
    job_status: str
    deployment_status: str
    message: str
    start_time: str
    end_time: str
    ray_cluster: str


def list_status(api_client: Any, namespace: str, bulk_run: Optional[str] = None) -> list[JobStatus]:
    """Status of the dreambooth RayJobs in ``namespace`` (one bulk run when given), from this CLI or the
    Helm chart whatever its release name or ``nameOverride``: they all carry ``dreambooth.io/bulk-run``.

    A bulk-layout RayJob is expanded into one row per subject from the summary its driver publishes.
    """
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    selector = LABEL_BULK_RUN if bulk_run is None else f"{LABEL_BULK_RUN}={bulk_run}"
    try:
        found = client.CustomObjectsApi(api_client).list_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, label_selector=selector
        )
        rows = []
        for item in found.get("items", []):
            meta, status = item.get("metadata", {}), item.get("status") or {}
            labels, annotations = meta.get("labels") or {}, meta.get("annotations") or {}
            job = JobStatus(
                name=meta.get("name", ""), subject=labels.get(LABEL_SUBJECT, ""), bulk_run=labels.get(LABEL_BULK_RUN, ""),
                job_status=status.get("jobStatus", ""), deployment_status=status.get("jobDeploymentStatus", ""),
                message=status.get("message", ""), start_time=status.get("startTime", ""),
                end_time=status.get("endTime", ""), ray_cluster=status.get("rayClusterName", ""),
            )
            summary_name = annotations.get(layouts.ANNOTATION_SUMMARY)
            if labels.get(layouts.LABEL_MODE) != "bulk" or not summary_name:
                rows.append(job)
                continue
            summary = layouts.read_summary(api_client, namespace, summary_name)
            if not summary:
                rows.append(JobStatus(**{**job.__dict__, "subject": "(all)", "message": job.message or
                                         f"no summary yet (ConfigMap {summary_name})"}))
                continue
            for subject in summary.get("subjects", []):
                rows.append(JobStatus(
                    name=job.name, subject=str(subject.get("name", "")), bulk_run=job.bulk_run,
                    job_status=str(subject.get("status", "")).upper(), deployment_status=job.deployment_status,
                    message=str(subject.get("error") or ""), start_time=_iso(subject.get("started_unix")),
                    end_time=_iso(subject.get("finished_unix")), ray_cluster=job.ray_cluster,
                ))
    except ApiException as exc:
        raise KubeError(f"cannot list RayJobs in namespace {namespace!r}: {api_error_text(exc)}") from exc
    except HTTPError as exc:
        raise unreachable(api_client, exc) from exc
    return sorted(rows, key=lambda r: (r.bulk_run, r.subject, r.name))


def _iso(unix: Any) -> str:
    from datetime import datetime, timezone

    return datetime.fromtimestamp(float(unix), timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ") if unix else ""


def format_status_table(rows: Sequence[JobStatus], max_message: int = 60) -> str:
    """An aligned text table of ``rows`` plus a count per job status."""
    if not rows:
        return "No RayJobs found."

    def cut(text: str) -> str:
        text = " ".join(text.split())
        return text if len(text) <= max_message else text[: max_message - 3] + "..."

    table = [STATUS_COLUMNS] + [
        (r.subject, r.name, r.job_status, r.deployment_status, r.start_time, r.end_time, cut(r.message))
        for r in rows
    ]
    table = [tuple(cell or "-" for cell in row) for row in table]
    widths = [max(len(row[i]) for row in table) for i in range(len(STATUS_COLUMNS))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table]
    counts: dict[str, int] = {}
    for r in rows:
        key = r.job_status or r.deployment_status or "NEW"
        counts[key] = counts.get(key, 0) + 1
    jobs = len({r.name for r in rows})
    head = f"{len(rows)} subjects in {jobs} RayJob{'s' if jobs != 1 else ''}: " if jobs != len(rows) else f"{len(rows)} RayJobs: "
    lines.append(head + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())))
    return "\n".join(lines)
