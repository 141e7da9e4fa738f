"""Ray Train: the ``TorchTrainer`` that runs ``train_loop_per_worker`` on N DeepSpeed ranks.

Checkpoints live under ``<output>/checkpoints`` (Ray Train's run folder), so a new driver started
with the same output resumes from the latest one, and ``FailureConfig`` restarts a worker group
that lost a worker from it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

from dreambooth.config import RunConfig
from dreambooth.priors import PriorSet, read_prior_dataset
from dreambooth.subjects import SubjectImage
from dreambooth.training import checkpoint
from dreambooth.training.checkpoint import CHECKPOINTS, final_weights_uri, run_storage_path
from dreambooth.training.loop import LoopInputs, train_loop_per_worker


@dataclass
class TrainResult:
    weights_uri: str  # folder with unet/ and text_encoder/ (diffusers layout)
    metrics: dict
    seconds: float


def worker_env(cuda: bool) -> dict[str, str]:
    env = {key: os.environ[key] for key in ("TORCH_EXTENSIONS_DIR", "DREAMBOOTH_CACHE", "HF_HUB_OFFLINE", "HF_HOME") if key in os.environ}
    if not cuda:
        env["DS_ACCELERATOR"] = "cpu"  # DeepSpeed would otherwise probe for CUDA and warn
    return env


def train(
    cfg: RunConfig,
    model_path: str,
    images: list[SubjectImage],
    prior_set: Optional[PriorSet],
    *,
    use_gpu: bool,
) -> TrainResult:
    """Fine-tune on a connected Ray cluster; return where the full weights are."""
    import time

    import ray.train
    from ray.train import CheckpointConfig, FailureConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from dreambooth.cluster import gpu_nodes_have_cuda, resource_shapes

    start = time.monotonic()
    cuda = use_gpu and gpu_nodes_have_cuda()
    datasets = {}
    if prior_set is not None and cfg.train.prior_loss_weight > 0:
        # Materialized before the workers take their CPUs: streaming reads would need CPUs that a
        # small cluster (2 workers on 2 CPUs) no longer has, and priors are small (latents only).
        datasets["priors"] = read_prior_dataset(prior_set).materialize()
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"inputs": LoopInputs(cfg, model_path, images, with_priors=bool(datasets))},
        scaling_config=ScalingConfig(
            num_workers=cfg.train.workers,
            use_gpu=use_gpu,
            resources_per_worker=resource_shapes(cfg.train, use_gpu).train_worker,
        ),
        torch_config=TorchConfig(backend="nccl" if cuda else "gloo"),
        run_config=ray.train.RunConfig(
            name=CHECKPOINTS,
            storage_path=run_storage_path(cfg.output),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            worker_runtime_env={"env_vars": worker_env(cuda)},
        ),
        datasets=datasets,
    )
    fit_started_unix = time.time()
    result = trainer.fit()
    if result.checkpoint is None or not result.checkpoint.path.rstrip("/").endswith(checkpoint.FINAL):
        raise RuntimeError(f"training ended without final weights (last checkpoint: {result.checkpoint})")
    metrics = dict(result.metrics or {})
    if "worker_started_unix" in metrics:
        # From fit() to the (last) worker group running the loop: actor start-up, process group, dataset split.
        metrics["setup_worker_group_s"] = metrics.pop("worker_started_unix") - fit_started_unix
    return TrainResult(final_weights_uri(cfg.output), metrics, time.monotonic() - start)
