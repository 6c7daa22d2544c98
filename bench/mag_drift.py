"""What MAG's gradient step does to the latent of the embedded shapes model (why colours drift).

    OMP_NUM_THREADS=1 nice python bench/mag_drift.py                     # 6 layouts x 2 seeds, alpha 0.3
    python bench/mag_drift.py --layouts 6,7,9 --seeds 0 --settings official:0.3 normalized:0.03

For every (layout, seed) it runs the sampler without control and with MAG, step by step, and
prints (averaged over the images):

* per guided step: the gradient's RMS per latent element, the update alpha*grad relative to the
  noise level sqrt(1 - abar_t) (x_t's own per-element scale), the share of the update that is a
  per-channel constant (the spatial mean of each channel: a shift of the whole image's tint),
  and how the gradient splits between the 8x8 and 16x16 layers;
* per channel: the latent's mean and std after the last guided step, and of the final latent,
  without control and with MAG;
* the final image's prompt fidelity (as ``evaluate`` scores it) and mean mask IoU.

Everything here observes; nothing is tuned.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mag_steps import updated_latent  # noqa: E402  (bench/ is on sys.path: the script's folder)
from mag_explore.evaluate import color_segmenter, load_suite, shapes_fidelity  # noqa: E402
from mag_explore.methods.guidance import guidance_pass  # noqa: E402
from mag_explore.methods import MaskedAttentionGuidance  # noqa: E402
from mag_explore.methods.mag import MagLossHook  # noqa: E402
from mag_explore.models import load_pipeline, model_defaults  # noqa: E402
from mag_explore.sampling import Sampler  # noqa: E402
from mag_explore.editing.inversion import encode_image  # noqa: E402
from mag_explore.layouts import mask_iou  # noqa: E402
from mag_explore.shapes.world import COLORS, render  # noqa: E402

SUITE = ROOT / "mag_explore" / "data" / "suites" / "shapes.json"
BACKGROUND = np.array([240.0, 240.0, 240.0])


class PerLayerLoss(MagLossHook):
    """MAG's loss hook that also keeps each layer's loss (to split the gradient by resolution)."""

    def reset(self) -> None:
        super().reset()
        self.per_layer = []

    def observe(self, probs, ctx) -> None:
        before = self.loss
        super().observe(probs, ctx)
        self.per_layer.append((ctx.height, self.loss if before is None else self.loss - before))


class MeasuredMAG(MaskedAttentionGuidance):
    """MAG with a step rule of ``mag_steps`` (official by default), recording what each update does."""

    def __init__(self, layout, step_rule="official", **kwargs):
        super().__init__(layout, **kwargs)
        self.update_rule = step_rule
        self.hook = PerLayerLoss(self)
        self.records = []

    def before_step(self, state):
        if not self.steps.contains(state.step_index, int(state.timestep)):
            return state.latents
        x = state.latents.detach()
        loss, grad = guidance_pass(state, x, self.hook)
        # split of the gradient by resolution: one more pass, keeping the graph for two backward calls
        split = self._split(state, x)
        abar = float(state.scheduler.alphas_cumprod[int(state.timestep)])
        update = x - updated_latent(self.update_rule, x, grad, self.alpha, abar)
        dc = update.mean(dim=(-2, -1), keepdim=True)
        self.records.append({
            "step": state.step_index, "t": int(state.timestep),
            "grad_rms": float(grad.pow(2).mean().sqrt()),
            "update_over_noise": float(update.pow(2).mean().sqrt()) / (1 - abar) ** 0.5,
            "update_over_signal": float(update.pow(2).mean().sqrt()) / abar ** 0.5,
            "dc_share": float(dc.pow(2).mean() / update.pow(2).mean()),
            "dc_per_channel": dc.flatten().tolist(),
            **split,
        })
        return (x - update).detach()

    def _split(self, state, x):
        from mag_explore.methods.guidance import frozen_weights

        unet = state.pipe.unet
        x = x.detach().requires_grad_(True)
        self.hook.reset()
        with torch.enable_grad(), frozen_weights(unet), state.attention_controller.phase_as("guidance", ("cond",)):
            unet(state.scheduler.scale_model_input(x, state.timestep), state.timestep,
                 encoder_hidden_states=state.cond.embeddings, return_dict=False)
            out = {}
            for res in sorted({h for h, _ in self.hook.per_layer}):
                loss = sum(l for h, l in self.hook.per_layer if h == res)
                (g,) = torch.autograd.grad(loss, x, retain_graph=True)
                out[f"grad_rms_{res}"] = float(g.pow(2).mean().sqrt())
        return out


def channel_stats(x: torch.Tensor) -> tuple[list[float], list[float]]:
    return x.mean(dim=(0, 2, 3)).tolist(), x.std(dim=(0, 2, 3)).tolist()


def colour_latents(pipe) -> dict[str, torch.Tensor]:
    """Per colour, the VAE's mean latent over the cells of a rendered circle of that colour."""
    refs = {}
    for colour in COLORS:
        image, masks = render([(colour, "circle", 20, 32, 24)], BACKGROUND)
        z = encode_image(pipe, image)[0]
        refs[colour] = z[:, cells(masks[0], z.shape[-1])].mean(1)
    return refs


def cells(mask: np.ndarray, side: int) -> torch.Tensor:
    """Latent cells at least 90 % covered by a pixel mask."""
    m = torch.tensor(mask, dtype=torch.float32)[None, None]
    return torch.nn.functional.interpolate(m, size=(side, side), mode="area")[0, 0] > 0.9


def object_latent_ratios(latents, image, layout, refs) -> list[float]:
    """Per region: |mean latent over the drawn cells inside it| / |the VAE's latent of its colour|.

    Drawn cells: not background in the image. 1 = an object of ordinary strength; the VAE
    turns much larger latents into other colours (a red latent x 1.5 decodes orange-yellow).
    """
    drawn = np.abs(image.astype(float) - BACKGROUND).max(-1) > 60
    ratios = []
    for region in layout.regions:
        colour = next((w for w in (region.phrase or "").split() if w in COLORS), None)
        inside = cells(region.mask & drawn, latents.shape[-1])
        if colour is None or not inside.any():
            continue
        ratios.append(float(latents[0][:, inside].mean(1).norm() / refs[colour].norm()))
    return ratios


def run(pipe, item, seed, control, last_guided, refs):
    sampler = Sampler(pipe, item.layout.prompt, seed=seed, controls=[control] if control else [])
    after_guided = None
    while not sampler.done:
        sampler.step()
        if sampler.step_index == last_guided + 1:
            after_guided = sampler.latents.detach().clone()
    result = sampler.result()
    image = np.asarray(result.images[0])
    phrases = [item.layout.label(i) for i in range(len(item.layout))]
    ious = [mask_iou(m, r.mask) for m, r in zip(color_segmenter(image, phrases), item.layout.regions)]
    fid = shapes_fidelity(image, item.layout.prompt)
    ratios = object_latent_ratios(result.latents, image, item.layout, refs)
    return {"after_guided": channel_stats(after_guided), "final": channel_stats(result.latents), "ratios": ratios,
            "iou": float(np.mean(ious)), "fidelity": fid["fidelity"], "present": fid["present"],
            "extra": fid["extra_colors"]}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layouts", default="6,7,9,11,15,19", help="indices into the suite")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--settings", nargs="+", default=["official:0.3"],
                        help="step rule:alpha, rules as in bench/mag_steps.py")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    pipe = load_pipeline("shapes", device="cpu", dtype=torch.float32)
    d = model_defaults(pipe)
    suite = load_suite(SUITE, d["height"], d["width"])
    items = [suite[int(i)] for i in args.layouts.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    probe = Sampler(pipe, "a red circle", seed=0)
    guided = [i for i, t in enumerate(probe.timesteps) if t > d["while_t_above"]]
    print(f"{len(items)} layouts x {len(seeds)} seeds; guided steps {guided[0]}..{guided[-1]} (t > {d['while_t_above']})")

    refs = colour_latents(pipe)
    print("VAE latent of each colour (mean over a circle's cells): " + "; ".join(
        f"{c} {np.round(v.numpy(), 2).tolist()} |{float(v.norm()):.2f}|" for c, v in refs.items()))
    rows = {"none": [run(pipe, it, s, None, guided[-1], refs) for it in items for s in seeds]}
    records = {}
    for setting in args.settings:
        rule, _, alpha = setting.partition(":")
        alpha, name = float(alpha), setting
        rows[name], records[name] = [], []
        for it in items:
            for s in seeds:
                control = MeasuredMAG(it.layout, step_rule=rule, alpha=alpha, lmbda=d["mag_lmbda"], while_t_above=d["while_t_above"])
                rows[name].append(run(pipe, it, s, control, guided[-1], refs))
                records[name].append(control.records)

    for name, recs in records.items():
        print(f"\n{name}: per guided step (mean over images)")
        print(" step    t  grad_rms  update/noise  update/signal  DC share  rms(8x8)  rms(16x16)  DC per channel")
        for k in range(len(recs[0])):
            at = [r[k] for r in recs]
            m = lambda key: np.mean([a[key] for a in at])  # noqa: E731
            dc = np.mean([a["dc_per_channel"] for a in at], 0)
            print(f" {at[0]['step']:4d} {at[0]['t']:4d} {m('grad_rms'):9.3f} {m('update_over_noise'):13.3f} {m('update_over_signal'):14.3f}"
                  f" {m('dc_share'):9.2f} {m('grad_rms_8'):9.3f} {m('grad_rms_16'):11.3f}  "
                  + " ".join(f"{v:+.3f}" for v in dc))
        total = np.sum([[a["update_over_noise"] for a in r] for r in recs], 1).mean()
        signal = np.sum([[a["update_over_signal"] for a in r] for r in recs], 1).mean()
        print(f" sum over the guided steps: update/noise {total:.2f}, update/signal {signal:.2f}")

    print("\nper-channel latent statistics (mean over images): mean / std")
    for name, rs in rows.items():
        for when in ("after_guided", "final"):
            means = np.mean([r[when][0] for r in rs], 0)
            stds = np.mean([r[when][1] for r in rs], 0)
            print(f" {name:16s} {when:13s} " + "  ".join(f"{a:+.2f}/{b:.2f}" for a, b in zip(means, stds)))
    print("\nobject latent / VAE latent of its colour (norm ratio, drawn cells inside each region): mean, max")
    for name, rs in rows.items():
        ratios = [x for r in rs for x in r["ratios"]]
        print(f" {name:16s} {np.mean(ratios):.2f}  {np.max(ratios):.2f}  ({len(ratios)} objects)")
    print("\nimages: mean IoU, fidelity, requested colours present, extra colours per image")
    for name, rs in rows.items():
        print(f" {name:16s} IoU {np.mean([r['iou'] for r in rs]):.3f}  fidelity {np.mean([r['fidelity'] for r in rs]):.2f}"
              f"  present {np.mean([r['present'] for r in rs]):.2f}  extra {np.mean([r['extra'] for r in rs]):.2f}")


if __name__ == "__main__":
    main()
