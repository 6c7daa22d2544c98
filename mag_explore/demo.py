"""The main job in one figure: no control vs masked-attention swapping vs MAG on one layout."""
from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from .layouts import Layout
from .methods import run_methods_on
from .models.load import load_pipeline, model_defaults, use_cpu_threads
from .plots import CMAP, FONT, TITLE, upsample_map
from .schedule import resolve_step_range
from .shapes.scoring import iou_text, region_iou


def demo_figure(model=None, layout_path=None, num_inference_steps=None, seed=1, out="outputs/demo.png",
                device=None, verbose: bool = False) -> Path:
    pipe = load_pipeline(model, device=device, verbose=verbose)
    use_cpu_threads(pipe)  # one thread for the embedded model: fast idle, and still fast on a busy machine
    d = model_defaults(pipe)
    layout = Layout.from_json(layout_path).for_generation(d["height"], d["width"])
    results = run_methods_on(pipe, layout, num_inference_steps=num_inference_steps, seed=seed, progress=True)
    phrases = layout.labels
    names = {"none": "no control", "swap": "masked-attention swap", "mag": "MAG"}
    fig, axes = plt.subplots(len(results), 2 + len(phrases), figsize=(3.4 * (2 + len(phrases)), 3.4 * len(results)))
    for row, (method, result) in zip(axes, results.items()):
        row[0].imshow(layout.color_image())
        row[0].set_title("layout:\n" + ", ".join(phrases), fontsize=FONT)
        row[1].imshow(result.images[0])
        # Where objects landed vs their regions, in the shapes world (its colors are known).
        scored = not any(np.isnan(list(region_iou(result.images[0], layout).values())))
        row[1].set_title(names[method] + (f"\n{iou_text(result.images[0], layout)}" if scored else ""), fontsize=FONT)
        image = result.images[0]
        for ax, phrase in zip(row[2:], phrases):
            maps = result.store.aggregate(tokens=result.token_indices(phrase)).sum(0)
            ax.imshow(image)
            ax.imshow(upsample_map(maps, (image.height, image.width)), cmap=CMAP, alpha=0.6)
            ax.set_title(f'"{phrase}" attention', fontsize=FONT)
        for ax in row:
            ax.axis("off")
    used = results["mag"].settings  # what the run really used, not what the defaults say
    mag = used["mag"]
    sizes = mag.get("layer_sizes")
    layers = "all layers" if sizes is None else ", ".join(f"{r}×{r}" for r in sizes) + " layers"
    fig.suptitle(f'"{layout.prompt}" — {used["num_inference_steps"]} DDIM steps, CFG {used["guidance_scale"]}, '
                 f'seed {seed}\nMAG ({mag["step_rule"]} step, {mag["loss_fn"]} loss, {layers}, {mag["mask_mode"]} masks) '
                 f'α={mag["alpha"]}, λ={mag["lmbda"]}, '
                 f'while {resolve_step_range(mag.get("while_t_above"), mag.get("step_range"))}; '
                 "maps: all steps and layers, head mean", fontsize=TITLE)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out

