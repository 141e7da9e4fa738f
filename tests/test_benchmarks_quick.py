"""The benchmark scripts' CI modes run and print the tables they promise.

``gpu_step.py --tiny`` trains in this process's own single-rank process group (no Ray);
``memory.py --quick`` starts its own Ray cluster, so it runs with the ``exclusive_ray`` tests.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def run_benchmark(script: str, *args: str, timeout: int) -> str:
    env = dict(os.environ, HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu")
    env.pop("RAY_ADDRESS", None)  # memory.py starts its own local cluster
    proc = subprocess.run(
        [sys.executable, f"benchmarks/{script}", *args, "--no-write"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
    )
    assert proc.returncode == 0, f"{script} exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


def table_rows(output: str) -> list[list[str]]:
    """Cells of the markdown table's data rows (header and separator dropped)."""
    lines = [line for line in output.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]


def table_cells(output: str) -> list[dict[str, str]]:
    """The markdown table's data rows as {header: cell}."""
    lines = [line for line in output.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    return [dict(zip(header, row)) for row in table_rows(output)]


def test_gpu_step_tiny_prints_step_time_and_flops():
    out = run_benchmark("gpu_step.py", "--tiny", timeout=300)
    assert "UNet 985,444 params, text encoder 1,597,162 params" in out
    assert "| model | device | precision | ZeRO |" in out
    rows = table_cells(out)
    assert len(rows) == 1, out
    row = rows[0]
    assert row["model"] == "tiny 32 px" and row["ZeRO"] == "2" and row["rows/step (subject+prior)"] == "1+1"
    assert float(row["GFLOP/step"]) > 0 and float(row["s/step (median)"]) > 0 and float(row["UNet samples/s"]) > 0
    if row["device"].startswith("CPU"):
        assert row["MFU"] == "n/a" and row["peak GPU mem GiB"] == "n/a" and row["precision"] == "float32"


def test_gpu_step_tiny_sdxl_zero3_with_checkpointing_prints_a_row_with_the_plan_prediction():
    """The SDXL path (both text encoders, pooled embeds + time_ids) at ZeRO-3 with checkpointing, on tiny-sdxl."""
    out = run_benchmark("gpu_step.py", "--tiny", "--model", "sdxl", "--zero-stage", "3", "--gradient-checkpointing",
                        timeout=300)
    assert re.search(r"tiny-sdxl: UNet [\d,]+ params, text encoder [\d,]+ params, text encoder 2 [\d,]+ params", out), out
    rows = table_cells(out)
    assert len(rows) == 1, out
    row = rows[0]
    assert row["model"] == "tiny-sdxl 32 px" and row["ZeRO"] == "3" and row["checkpointing"] == "on"
    assert len(row["params (UNet + text)"].split(" + ")) == 3  # UNet + both text encoders
    assert float(row["GFLOP/step"]) > 0 and float(row["s/step (median)"]) > 0 and float(row["UNet samples/s"]) > 0
    assert float(row["plan GiB"]) > 0  # dreambooth plan's per-rank prediction for this configuration
    if row["device"].startswith("CPU"):
        assert row["peak GPU mem GiB"] == "n/a" and row["measured / plan"] == "n/a"
    else:
        assert float(row["measured / plan"]) > 0


@pytest.mark.e2e
@pytest.mark.exclusive_ray
def test_memory_quick_reports_zero0_and_zero3_per_rank(exclusive_ray):
    out = run_benchmark("memory.py", "--quick", timeout=600)
    rows = table_rows(out)
    assert [(r[0], r[1], r[2]) for r in rows] == [("0", "-", "0"), ("0", "-", "1"), ("3", "-", "0"), ("3", "-", "1")], out
    states = {(r[0], r[2]): float(r[7]) for r in rows}  # "model states MB"
    assert all(v > 0 for v in states.values())
    assert states[("3", "0")] < states[("0", "0")] and states[("3", "1")] < states[("0", "1")]
    ratio = float(re.search(r"ZeRO-3 / ZeRO-0: [\d.]+ / [\d.]+ MB = ([\d.]+)", out).group(1))
    assert ratio <= 0.6, out


def test_paper_claims_quick_prints_every_condition_and_verdict(tmp_path):
    """CI mode of the shapes-model claims benchmark: 1 subject, 1 seed, 4 fine-tuning steps."""
    figure = tmp_path / "claims.png"
    out = run_benchmark("paper_claims.py", "--quick", "--figure", str(figure), timeout=900)
    rows = table_rows(out)
    assert [r[0] for r in rows] == ["base", "dreambooth", "no_prior", "common_word", "random_string"]
    assert all(len(r) == 9 for r in rows)  # condition + 8 measures, drift ratios included
    base = rows[0]
    assert base[7].startswith("1.000") and base[8].startswith("1.000")  # the base's own drift ratios
    verdicts = [line for line in out.splitlines() if line.startswith(("- reproduced", "- NOT reproduced"))]
    assert [v.split(": ", 1)[1][:3] for v in verdicts] == ["(a)", "(b)", "(c)", "(d)", "(e)"]
    from PIL import Image

    assert Image.open(figure).size[0] > 600


def test_recipe_search_quick_scores_each_variant_with_drift_and_the_vae_ceiling(monkeypatch):
    """CI mode of the recipe lever study: 1 subject, 2 variants, 4 fine-tuning steps, each fine-tune scored
    at the usual guidance and at a second one."""
    monkeypatch.syspath_prepend(str(REPO))  # benchmarks/ is a folder of scripts, not an installed package
    from benchmarks.recipe_search import CHOSEN as chosen

    out = run_benchmark("recipe_search.py", "--quick", "--guidance", "4", "7", timeout=600)
    rows = [r for r in table_rows(out) if len(r) == 10]  # the per-(variant, subject) table
    assert [r[0] for r in rows] == ["start", "start, sampled at guidance 7",
                                    chosen, f"{chosen}, sampled at guidance 7"]
    assert {r[1] for r in rows} == {"two_tone_triangle"}
    ceiling = float(rows[0][8])
    assert 0.7 < ceiling <= 1.0  # the shipped VAE carries the shipped subject
    assert all(r[9] in ("yes", "no") for r in rows)
    assert all(float(r[6]) >= 0 for r in rows)  # clean_class_fidelity, scored for every variant


def test_recipe_search_chosen_variant_is_the_shapes_models_shipped_recipe(monkeypatch):
    """The lever study's CHOSEN variant is what ``dreambooth/data/shapes/dreambooth.yaml`` ships: the same
    learning rates, steps and prior counts, and the same caption priors."""
    import yaml

    monkeypatch.syspath_prepend(str(REPO))  # benchmarks/ is a folder of scripts, not an installed package
    from benchmarks.recipe_levers import CHOSEN, CHOSEN_WITHOUT_CAPTIONS, VARIANTS
    from dreambooth.evaluation.shapes import extra_prior_captions
    from dreambooth.models import RECIPE_FILE, resolve_model

    recipe = yaml.safe_load((Path(resolve_model("shapes")) / RECIPE_FILE).read_text())
    chosen, train, prior = VARIANTS[CHOSEN], recipe["train"], recipe["prior"]
    assert (train["learning_rate"], train.get("text_encoder_learning_rate"), train["max_train_steps"]) == (
        chosen.learning_rate, chosen.text_encoder_learning_rate, chosen.steps)
    total = chosen.num_priors + chosen.caption_priors + chosen.unconditional_priors
    assert prior["num_class_images"] == total and prior["guidance_scale"] == chosen.prior_guidance
    assert round(prior["extra_prior_share"] * total) == chosen.caption_priors
    assert round(prior.get("unconditional_prior_share", 0) * total) == chosen.unconditional_priors
    assert prior["extra_prior_prompts"] == extra_prior_captions(chosen.caption_priors)
    # Levers the study has and the cluster loop's recipe must then name too.
    assert train.get("lr_scheduler", "constant") == chosen.lr_scheduler
    assert chosen.prior_examples_per_subject_example == 1  # the cluster loop pairs one prior with each photo
    assert train.get("bare_prompt_with_captions", False) == chosen.captioned_and_bare and not chosen.captioned
    assert train.get("background_swap", 0.0) == chosen.background_swap
    # captions as shapes.subject_caption writes them for a user (no size), when the recipe trains on captions
    assert not (chosen.captioned_and_bare and chosen.captions_name_size)
    # Photos without captions: the recipe file's without_captions section is the variant measured on bare photos.
    bare, uncaptioned = VARIANTS[CHOSEN_WITHOUT_CAPTIONS], {**train, **recipe["without_captions"]["train"]}
    assert set(recipe["without_captions"]) <= {"train", "prior"} and not (bare.captioned or bare.captioned_and_bare)
    assert (uncaptioned["learning_rate"], uncaptioned["text_encoder_learning_rate"], uncaptioned["max_train_steps"]) == (
        bare.learning_rate, bare.text_encoder_learning_rate, bare.steps)
    bare_prior = {**prior, **recipe["without_captions"].get("prior", {})}
    bare_total = bare_prior["num_class_images"]
    assert bare_total == bare.num_priors + bare.caption_priors + bare.unconditional_priors
    assert bare_prior["guidance_scale"] == bare.prior_guidance
    assert round(bare_prior["extra_prior_share"] * bare_total) == bare.caption_priors
    assert round(bare_prior.get("unconditional_prior_share", 0) * bare_total) == bare.unconditional_priors
    # Its caption priors cycle through the first of the recipe's prompts: the bare variant's captions.
    assert bare_prior["extra_prior_prompts"][:bare.caption_priors] == extra_prior_captions(bare.caption_priors)
    priors = ("num_priors", "caption_priors", "unconditional_priors")
    assert dataclasses.replace(bare, text_encoder_learning_rate=None, steps=0, **dict.fromkeys(priors, 0)) == (
        dataclasses.replace(chosen, text_encoder_learning_rate=None, steps=0, captioned_and_bare=False,
                            captions_name_size=True, **dict.fromkeys(priors, 0)))


def test_recipe_search_pools_a_variants_seeds_with_the_standard_error_of_each_mean(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO))
    from benchmarks.recipe_search import MEASURES, table

    def run(variant, seed, fidelity, other):
        return {"variant": variant, "subject": "s", "seed": seed, "vae_ceiling": 1.0,
                **dict.fromkeys(MEASURES, 1.0), "subject_fidelity": fidelity, "other_prompt_fidelity": other}

    text = table([run("a", 0, 0.8, 1.0), run("a", 1, 0.6, 0.8), run("b", 0, 0.9, 1.0)])
    pooled = text.split("every seed and subject")[1]
    # Mean ± std / sqrt(runs): 0.1 / sqrt(2); seed 0 passes, seed 1 (fidelity 0.6, other prompts 0.8) does not.
    # Runs that predate the background, new-background, unseen-context and size splits leave their gaps "-".
    assert "| a | 2 | 0.70 ± 0.07 |" in pooled and "| 0.90 ± 0.07 | +0.00 ± 0.00 | - | - | - | - | 1/2 |" in pooled
    assert "| b | 1 | 0.90 |" in pooled  # one run: no spread to report
    assert "every seed" not in table([run("a", 0, 0.6, 1.0), run("b", 0, 0.9, 1.0)])  # one seed: nothing to pool
    # recontext − match is taken within each run: runs 0.5 / 0.3 and 0.2 / 0.3 → +0.2 and −0.1: mean +0.05, std 0.15 / √2.
    gap = [run("c", s, 0.8, 1.0) | {"recontext_shown": r, "subject_match": m} for s, r, m in ((0, 0.5, 0.3), (1, 0.2, 0.3))]
    assert "| +0.05 ± 0.11 | - | - | - | - | 1/2 |" in table(gap).split("every seed and subject")[1]
    # The splits are paired the same way; a run with no unseen ask (None) is left out of that column only.
    split = [gap[0] | {"recontext_shown_unseen": 0.4, "recontext_shown_at_subject_sizes": 0.3,
                       "recontext_shown_unseen_backgrounds": 0.1},
             gap[1] | {"recontext_shown_unseen": None, "recontext_shown_at_subject_sizes": 0.5,
                       "recontext_shown_unseen_backgrounds": 0.2}]
    # unseen backgrounds: 0.1 − 0.3 and 0.2 − 0.3 → −0.15, std 0.05 / √2
    assert "| +0.05 ± 0.11 | - | -0.15 ± 0.04 | +0.10 | +0.10 ± 0.07 | 1/2 |" in table(split).split(
        "every seed and subject")[1]


def test_recipe_search_identifier_warmup_moves_only_the_identifiers_embedding(monkeypatch, tiny_model_path, dog_dir):
    """Round 18's lever: textual inversion of the identifier before the fine-tune changes its embedding row
    and nothing else (the UNet at rate 0, every other text-encoder gradient zeroed)."""
    monkeypatch.syspath_prepend(str(REPO))
    from benchmarks.recipe_search import warm_identifier
    from dreambooth.models import load_components
    from dreambooth.subjects import load_subject_images
    from dreambooth.training.inprocess import FinetuneSettings

    parts = load_components(tiny_model_path)
    embedding = parts.text_encoder.get_input_embeddings().weight
    text_before = {name: p.detach().clone() for name, p in parts.text_encoder.named_parameters()}
    embedding_name = next(name for name, p in parts.text_encoder.named_parameters() if p is embedding)
    unet_before = [p.detach().clone() for p in parts.unet.parameters()]
    row = parts.tokenizer("sks", add_special_tokens=False).input_ids
    warm_identifier(parts, load_subject_images(str(dog_dir), 32), "sks",
                    FinetuneSettings(instance_prompt="a sks dog", class_prompt="a dog", prior_loss_weight=0.0),
                    steps=3, learning_rate=1e-2)
    moved = (embedding.detach() - text_before[embedding_name]).abs().sum(dim=1)
    assert moved[row].min() > 0 and moved.sum() == moved[row].sum()
    assert all(torch.equal(p, text_before[name]) for name, p in parts.text_encoder.named_parameters()
               if p is not embedding)
    assert all(torch.equal(p, before) for p, before in zip(parts.unet.parameters(), unet_before))


def test_lever_probes_near_fills_stay_near_the_subjects_colours_and_off_every_eval_background(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO))
    from benchmarks import lever_probes as probes
    from dreambooth.shapes import SUBJECTS, write_subject_images
    from dreambooth.shapes.world import PALETTE
    from dreambooth.training.backgrounds import Repaintable

    from PIL import Image

    palette = np.array(list(PALETTE.values()))
    subject = SUBJECTS["two_tone_triangle"]  # orange and blue
    for path in write_subject_images(subject, tmp_path, n=2, seed=0):
        photo = Repaintable.of(Image.open(path).convert("RGB"))
        colours = probes.subject_colours(photo.image, photo.alpha)
        nearest = {min(PALETTE, key=lambda name: np.abs(np.subtract(PALETTE[name], colour)).max()) for colour in colours}
        assert nearest == {subject.color, subject.secondary}
        fills = probes.near_fills(colours, photo.backdrop)
        assert 0 < len(fills) <= probes.NEAR_FILLS_PER_PHOTO
        for fill in fills:
            assert min(np.abs(np.subtract(fill, c)).max() for c in colours) <= probes.NEAR_OFFSET
            assert np.abs(palette - fill).max(-1).min() >= probes.NEAR_MIN_FROM_PALETTE


def test_lever_probes_subject_timesteps_lean_low_for_subject_rows_only(monkeypatch):
    from types import SimpleNamespace

    monkeypatch.syspath_prepend(str(REPO))
    from benchmarks import lever_probes as probes

    seen = []

    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def forward(self, noisy, timesteps, conditions):
            seen.append(timesteps)
            return noisy * self.weight

    scheduler = SimpleNamespace(config=SimpleNamespace(num_train_timesteps=1000, prediction_type="epsilon"),
                                add_noise=lambda latents, noise, t: latents + noise)
    loss = probes.subject_timesteps_loss(3.0)
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        loss(Recorder(), scheduler, torch.zeros(4, 1, 2, 2), {}, 2, 1.0, generator)
    steps = torch.stack(seen).float()
    assert steps[:, :2].mean() < 350 and steps[:, 2:].mean() > 400  # E[T u^3] = T/4; the priors' T/2
