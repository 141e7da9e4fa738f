"""``dreambooth plan``: parameter counts from shipped configs, model-state bytes against DeepSpeed's
estimators, activations on fake tensors against a real CPU run, the CLI's table and errors.

Big models are only built on the meta device here (no memory); activations are measured on the
built-in ``tiny`` model, whose real CPU run takes seconds.
"""

from __future__ import annotations

import pytest
import torch

from dreambooth.cli import main
from dreambooth.config import ConfigError
from dreambooth.planning.activations import ActivationPeak, measure_activations
from dreambooth.planning.architectures import count_parameters, load_architecture
from dreambooth.planning.memory import MIXED, Option, all_options, deepspeed_defaults, rank_memory
from dreambooth.planning import report
from dreambooth.planning.report import PlanInputs, make_plan, parse_size

SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"
SDXL = "stabilityai/stable-diffusion-xl-base-1.0"
PUBLISHED_TOLERANCE = 0.01
GiB = 2**30
TINY_RESOLUTION = 32
TINY_ROWS = 2


@pytest.fixture(scope="module")
def buckets():
    return deepspeed_defaults()


@pytest.fixture(scope="module")
def sdxl_counts(buckets):
    return count_parameters(load_architecture(SDXL), persistence_threshold=buckets.persistence_threshold)


@pytest.mark.parametrize("model, published", [
    (SD15, {"unet": 860e6, "text_encoder": 123e6}),
    (SDXL, {"unet": 2567e6, "text_encoder": 123e6, "text_encoder_2": 695e6}),
])
def test_parameter_counts_match_published_sizes(model, published, buckets):
    arch = load_architecture(model)
    counts = count_parameters(arch, persistence_threshold=buckets.persistence_threshold)
    for name, size in published.items():
        assert counts.per_component[name] == pytest.approx(size, rel=PUBLISHED_TOLERANCE), name
    assert counts.trainable == sum(counts.per_component[name] for name in published)
    assert counts.frozen == counts.per_component["vae"] > 80e6
    assert arch.native_resolution == (1024 if model == SDXL else 512) and arch.vae_scale_factor == 8


@pytest.mark.parametrize("world", [1, 2, 4, 8])
def test_model_states_match_deepspeed_estimators(world, sdxl_counts, buckets):
    """ZeRO-2 equals DeepSpeed's estimate exactly (GPU, and CPU up to its 1.5 buffer factor); ZeRO-3
    exceeds it by exactly what its formula leaves out: the 16-bit gradient partition (non-offload)
    and the persistent small tensors every rank keeps whole."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    c, buffer_factor = sdxl_counts, 1.5
    psi = c.trainable

    def plan(stage, optim=False, params=False):
        return rank_memory(Option(stage, optim, params, False), c, MIXED, world, activations=0, buckets=buckets, reserve=0)

    rounding = 4  # bytes: each partitioned term is floor-divided on its own
    for offload in (False, True):
        cpu, gpu = estimate_zero2_model_states_mem_needs(psi, num_gpus_per_node=world, cpu_offload=offload,
                                                         additional_buffer_factor=buffer_factor)
        ours = plan(2, optim=offload)
        assert abs(ours.model_states - gpu) <= rounding
        if offload and 4 * world <= 16:  # beyond 4 GPUs DeepSpeed counts each process's fp32 load copy instead
            assert ours.cpu * world * buffer_factor == pytest.approx(cpu, rel=1e-6)

    persistent_extra = MIXED.weights * c.persistent
    for optim, params in ((False, False), (True, False), (True, True)):
        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
            psi, c.largest_layer, num_gpus_per_node=world, cpu_offload=optim, cpu_offload_params=params,
            zero_init=True, additional_buffer_factor=buffer_factor)
        ours = plan(3, optim, params)
        grad_partition = 0 if optim else MIXED.grads * psi // world
        assert abs(ours.model_states - (gpu + grad_partition + persistent_extra)) <= rounding, (optim, params)
        if optim:
            assert ours.cpu * world * buffer_factor == pytest.approx(cpu, rel=1e-6)
    # ZeRO-3 is ZeRO-0 divided by the ranks, plus the gathered layer and the persistent tensors
    gathered = (MIXED.weights + MIXED.grads) * c.largest_layer
    assert abs(plan(3).model_states - (plan(0).model_states // world + gathered + persistent_extra)) <= rounding
    if world > 1:
        states = [plan(s).model_states for s in range(4)]
        assert states == sorted(states, reverse=True)


@pytest.fixture(scope="module")
def tiny_activations():
    """Fake-tensor prediction and real-CPU measurement of tiny's step, without and with checkpointing."""
    arch = load_architecture("tiny")
    runs = {}
    for checkpointing in (False, True):
        shape = dict(resolution=TINY_RESOLUTION, rows=TINY_ROWS, dtype=torch.float32, checkpointing=checkpointing)
        runs[checkpointing] = (measure_activations(arch, fake=True, **shape), measure_activations(arch, fake=False, **shape))
    return arch, runs


@pytest.mark.parametrize("checkpointing", [False, True])
def test_tiny_activation_prediction_matches_measured_cpu_peak(checkpointing, tiny_activations):
    """Fake-tensor prediction vs the same step on real CPU tensors (within 1 %)."""
    _, runs = tiny_activations
    predicted, measured = runs[checkpointing]
    assert predicted.peak_bytes == pytest.approx(measured.peak_bytes, rel=0.01)
    assert predicted.after_forward_bytes == pytest.approx(measured.after_forward_bytes, rel=0.01)


def test_tiny_saved_tensors_equal_predicted_forward_activations(tiny_activations):
    """Independent of the tracker: the bytes autograd saves for backward in a hand-run real forward
    (saved-tensor hooks) are what the prediction says is alive after forward (within 1 %)."""
    arch, runs = tiny_activations
    predicted, _ = runs[False]
    assert _saved_tensor_bytes(arch, TINY_RESOLUTION, TINY_ROWS) == pytest.approx(predicted.after_forward_bytes, rel=0.01)


def test_frozen_text_encoders_save_no_activations_for_backward():
    """tiny-sdxl with both encoders frozen: their activations are not kept, so the step's are smaller."""
    arch = load_architecture("tiny-sdxl")
    shape = dict(resolution=TINY_RESOLUTION, rows=TINY_ROWS, dtype=torch.float32, checkpointing=False)
    trained, frozen = (measure_activations(arch, train_text_encoder=t, **shape) for t in (True, False))
    assert 0 < frozen.after_forward_bytes < trained.after_forward_bytes


def test_gradient_checkpointing_cuts_activations_of_tiny(tiny_activations):
    _, runs = tiny_activations
    (off, _), (on, _) = runs[False], runs[True]
    assert on.after_forward_bytes < 0.5 * off.after_forward_bytes and on.peak_bytes < off.peak_bytes


def _saved_tensor_bytes(arch, resolution: int, rows: int) -> int:
    """Bytes of distinct non-parameter storages autograd saves in one real forward of the training graph."""
    from dreambooth.planning.activations import example_conditions, training_module

    torch.manual_seed(0)
    module = training_module(arch, checkpointing=False)
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    side = resolution // arch.vae_scale_factor
    conditions = example_conditions(module, rows, resolution, arch.text_encoders[0].config["vocab_size"])
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = module(torch.randn(rows, 4, side, side), torch.randint(0, 1000, (rows,)), conditions)
        torch.nn.functional.mse_loss(out.float(), torch.randn_like(out))
    return sum(seen.values())


def test_parse_size_accepts_binary_and_decimal_units_and_explains_bad_ones():
    assert parse_size("24GiB", "--gpu-memory") == 24 * GiB
    assert parse_size("24G", "--gpu-memory") == 24 * GiB
    assert parse_size("80GB", "--gpu-memory") == 80 * 10**9
    assert parse_size("1.5 TiB", "--gpu-memory") == int(1.5 * 2**40)
    for bad in ("lots", "24 bananas", "-3GiB", "0GB", ""):
        with pytest.raises(ConfigError, match="e.g. 24GiB, 80GB or 24G"):
            parse_size(bad, "--gpu-memory")


def test_cheapest_option_is_the_first_that_fits(monkeypatch):
    """Options run cheapest first (no offload, lower stage, no checkpointing); more GPUs never make the pick dearer."""
    costs = [o.cost for o in all_options()]
    assert costs == sorted(costs) and len(costs) == len(set(costs)) == 16
    activations = {False: 13 * GiB, True: GiB}
    monkeypatch.setattr(report, "cached_activations",
                        lambda arch, **kw: ActivationPeak(activations[kw["checkpointing"]], 0, kw["rows"], kw["resolution"], kw["checkpointing"]))
    picks = []
    for gpus in (1, 2, 4, 8):
        plan = make_plan(PlanInputs(SDXL, gpus, 24 * GiB, 1024, 1, "bf16", True, True, gpus, None, GiB))
        best = plan.cheapest
        assert best is not None and best.fits and best.memory.gpu_total <= 24 * GiB
        assert all(not row.fits for row in plan.table[: plan.table.index(best)])
        picks.append(best.option.cost)
    assert picks == sorted(picks, reverse=True)
    assert picks[0][1] == 1  # one 24 GiB GPU: SDXL's optimizer states must leave the GPU
    one_gpu = make_plan(PlanInputs(SDXL, 1, 80 * GiB, 1024, 1, "bf16", True, True, 1, None, GiB))
    stages = {(row.option.zero_stage, row.option.offload_optimizer) for row in one_gpu.table}
    assert (1, False) not in stages and (3, False) not in stages and (3, True) in stages  # one rank trains at 0 unless it offloads


def test_cli_prints_table_and_flags(capsys):
    assert main(["plan", "--model", "tiny", "--gpus", "2", "--gpu-memory", "4GiB", "--resolution", str(TINY_RESOLUTION)]) == 0
    out = capsys.readouterr().out
    assert "| ZeRO | offload | checkpointing | params | grads | optimizer |" in out
    assert sum(line.startswith("| ZeRO-") for line in out.splitlines()) == 16
    assert "Cheapest that fits (ZeRO-0, no offload, gradient checkpointing off" in out
    assert f"dreambooth run --model tiny --workers 2 --zero-stage 0 --mixed-precision bf16 --resolution {TINY_RESOLUTION}" in out


def test_cli_bad_gpu_memory_exits_2_with_what_to_write(capsys):
    assert main(["plan", "--model", "tiny", "--gpu-memory", "lots"]) == 2
    err = capsys.readouterr().err
    assert "--gpu-memory 'lots' is not a size" in err and "24GiB" in err


def test_cli_unknown_model_exits_2(capsys):
    assert main(["plan", "--model", "no-such-model", "--gpu-memory", "24GiB"]) == 2
    assert "stabilityai/stable-diffusion-xl-base-1.0" in capsys.readouterr().err
