"""MAG step rules compared on a few layouts of the suite: mean mask IoU and prompt fidelity.

    OMP_NUM_THREADS=1 nice python bench/mag_steps.py                          # the default grid
    python bench/mag_steps.py --layouts 1,6,7,9 --seeds 0,1 \\
        --settings "official:alpha=0.3" "normalized:alpha=0.03" "official:alpha=0.3,layer_sizes=8"

A setting is ``step:key=value,...``; ``step`` is one of ``STEPS`` below, the keys are
``MaskedAttentionGuidance`` options (alpha, lmbda, layer_sizes as 8 or 16, skip = guided
steps to leave out at the start, max_step = cap of the update in noise units for "clipped").
Fidelity is ``evaluate``'s (every requested colour present, no other colour, right shapes).
This is the exploration that picked the shipped step rule and alpha (README, "MAG on the
embedded model"); the final numbers come from ``python -m mag_explore evaluate`` on the full suite.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mag_explore.evaluate import color_segmenter, load_suite, shapes_fidelity  # noqa: E402
from mag_explore.methods.guidance import guidance_pass  # noqa: E402
from mag_explore.methods import MaskedAttentionGuidance  # noqa: E402
from mag_explore.methods.common import check_finite  # noqa: E402
from mag_explore.models import load_pipeline, model_defaults  # noqa: E402
from mag_explore.sampling import generate  # noqa: E402
from mag_explore.layouts import mask_iou  # noqa: E402

SUITE = ROOT / "mag_explore" / "data" / "suites" / "shapes.json"
STEPS = ("official", "normalized", "signal", "clipped", "renormed")


class StepRuleMAG(MaskedAttentionGuidance):
    """MAG with another rule for the latent update (the loss and its gradient are the official ones).

    official:   x <- x - alpha * grad
    normalized: x <- x - alpha * sigma_t * grad / rms(grad)   (each step alpha noise-stds long)
    clipped:    official, but the step's RMS capped at max_step * sigma_t
    renormed:   official, then each channel rescaled to the std it had before the step
    signal:     x <- x - alpha * sqrt(abar_t) * grad / rms(grad)  (each step moves the x_0 that
                x_t implies, (x_t - sigma_t * eps) / sqrt(abar_t), by alpha at fixed eps)
    sigma_t = sqrt(1 - abar_t) is x_t's noise level (VP/DDIM), sqrt(abar_t) its signal scale.
    """

    def __init__(self, layout, step_rule="official", skip=0, max_step=0.05, **kwargs):
        super().__init__(layout, **kwargs)
        self.update_rule, self.skip, self.max_step = step_rule, int(skip), float(max_step)
        self.guided = 0

    def start(self, sampler):
        super().start(sampler)
        self.guided = 0

    def before_step(self, state):
        if not self.steps.contains(state.step_index, int(state.timestep)):
            return state.latents
        self.guided += 1
        if self.guided <= self.skip:
            return state.latents
        x = state.latents.detach()
        loss, grad = guidance_pass(state, x, self.hook)
        check_finite("MAG", state, loss, grad, f"alpha={self.alpha}")
        abar = float(state.scheduler.alphas_cumprod[int(state.timestep)])
        return updated_latent(self.update_rule, x, grad, self.alpha, abar, self.max_step).detach()


def updated_latent(rule: str, x, grad, alpha: float, abar: float, max_step: float = 0.05):
    """x_t after one guidance step of ``rule`` (see ``StepRuleMAG``)."""
    sigma = (1 - abar) ** 0.5
    rms = grad.pow(2).mean().sqrt().clamp_min(1e-12)
    if rule in ("normalized", "signal"):
        scale = sigma if rule == "normalized" else abar ** 0.5
        return x - alpha * scale * grad / rms
    update = alpha * grad
    if rule == "clipped":
        update = update * torch.clamp(max_step * sigma / (alpha * rms), max=1.0)
    new = x - update
    if rule == "renormed":
        new = new * (x.std(dim=(-2, -1), keepdim=True) / new.std(dim=(-2, -1), keepdim=True))
    return new


def parse_setting(text: str) -> tuple[str, dict]:
    step, _, rest = text.partition(":")
    if step not in STEPS:
        raise SystemExit(f"step {step!r}: use one of {STEPS}")
    options = {}
    for part in filter(None, rest.split(",")):
        key, _, value = part.partition("=")
        options[key] = {int(value)} if key == "layer_sizes" else (int(value) if key == "skip" else float(value))
    return step, options


def score(pipe, items, seeds, step, options, lmbda, while_t_above, dump=None):
    ious, fids, present, extra = [], [], [], []
    lmbda = options.get("lmbda", lmbda)
    options = {k: v for k, v in options.items() if k != "lmbda"}
    for item in items:
        phrases = [item.layout.label(i) for i in range(len(item.layout))]
        for seed in seeds:
            controls = [] if step == "none" else [
                StepRuleMAG(item.layout, step_rule=step, lmbda=lmbda, while_t_above=while_t_above, **options)]
            image = np.asarray(generate(pipe, item.layout.prompt, seed=seed, controls=controls,
                                        progress=False).images[0])
            masks = color_segmenter(image, phrases)
            ious.append(np.mean([mask_iou(m, r.mask) for m, r in zip(masks, item.layout.regions)]))
            f = shapes_fidelity(image, item.layout.prompt)
            fids.append(f["fidelity"])
            if dump is not None:
                dump.append((item.name, seed, image, ious[-1], f))
            present.append(f["present"] == 1.0)
            extra.append(f["extra_colors"] > 0)
    return np.mean(ious), np.mean(fids), np.mean(present), np.mean(extra)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layouts", default="1,6,7,9,11,15,19,21", help="indices into the suite")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--dump", default=None, help="folder: one PNG per setting (all its images) and the failures listed")
    parser.add_argument("--settings", nargs="+", default=[
        "none", "official:alpha=0.3", "official:alpha=0.1", "official:alpha=0.3,skip=1",
        "official:alpha=0.3,layer_sizes=8", "official:alpha=0.3,layer_sizes=16",
        "renormed:alpha=0.3", "clipped:alpha=0.3,max_step=0.05", "normalized:alpha=0.03",
        "normalized:alpha=0.06"])
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    pipe = load_pipeline("shapes", device="cpu", dtype=torch.float32)
    d = model_defaults(pipe)
    suite = load_suite(SUITE, d["height"], d["width"])
    items = suite if args.layouts == "all" else [suite[int(i)] for i in args.layouts.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    print(f"{len(items)} layouts x {len(seeds)} seeds = {len(items) * len(seeds)} images per setting")
    print("| setting | mean IoU | fidelity | all colours present | extra colour | s |")
    print("|---|---:|---:|---:|---:|---:|")
    for text in args.settings:
        step, options = ("none", {}) if text == "none" else parse_setting(text)
        start = time.perf_counter()
        dump = [] if args.dump else None
        iou, fid, present, extra = score(pipe, items, seeds, step, options, d["mag_lmbda"], d["while_t_above"], dump)
        print(f"| {text} | {iou:.3f} | {fid:.2f} | {present:.2f} | {extra:.2f} | {time.perf_counter() - start:.0f} |",
              flush=True)
        if dump:
            save_dump(Path(args.dump), text, dump, len(seeds))


def save_dump(folder: Path, text: str, dump: list, per_row: int) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rows = [np.concatenate([d[2] for d in dump[i:i + per_row]], 1) for i in range(0, len(dump), per_row)]
    name = text.replace(":", "_").replace(",", "_").replace("=", "")
    Image.fromarray(np.concatenate(rows, 0)).save(folder / f"{name}.png")
    with open(folder / f"{name}.txt", "w") as f:
        for layout, seed, _, iou, fid in dump:
            f.write(f"{layout}\tseed {seed}\tIoU {iou:.2f}\t{fid}\n")


if __name__ == "__main__":
    main()
