"""Mask-IoU benchmark: every layout of a suite × method × setting × seed, in one engine.

    python -m mag_explore evaluate --model shapes --suite data/suites/shapes.json \\
        --methods none,swap,mag,pww,lg --seeds 4 --out outputs/eval
    python -m mag_explore evaluate ... --sweep mag.alpha=0.02,0.05,0.1 --sweep pww.weight=0.4,1
    torchrun --nproc_per_node 2 -m mag_explore evaluate ...        # CPU processes (gloo)
    accelerate launch --num_processes 4 -m mag_explore evaluate ...  # GPUs

For each image it segments the generated picture into one mask per region phrase and
compares it with the region: IoU per region, plus prompt fidelity where a scorer exists.
Writes to ``--out``:

* ``results.csv``: one row per image (method, setting, layout, seed, per-region IoU,
  fidelity and its parts, seconds), in a fixed order whatever the number of processes;
* ``summary.md`` / ``summary.json``: per method and setting, mean IoU and fidelity (and
  each of its parts) with 95 % bootstrap intervals over layouts, and the paired
  difference to "none";
* ``frontier.png``: mean IoU against fidelity, one line per method through its settings;
* ``grid.png``: the layouts (rows) and each method's image at its default setting, first seed;
* ``images/<method>/[<setting>/]layoutNN_seedS.png``: every image; ``run.json``: what the rows mean.

Runs resume (``command``): a run with the same ``--out`` generates only the missing images.

Segmentation: the embedded shapes model draws flat known colors, so ``color_segmenter``
reads each phrase's color word exactly (``mag_explore.shapes.segment``). For Stable
Diffusion, SDXL or Flux use a built-in open-vocabulary segmenter, ``--segmenter grounded-sam``
(Grounding DINO boxes refined to masks by SAM, as MIG_Bench) or ``owl-sam`` (OWLv2 boxes):
it adds instance success, box mIoU and CLIP scores to every row (``instances``,
``segmenters``, ``clip_score``; the real-world suite is ``data/suites/real.json``,
``real_suite`` also reads MIG_Bench box files; docs/howto_evaluate_real_models.md). Or
pass your own segmenter, a callable ``(image HxWx3 uint8, phrases) -> list of HxW
bool masks`` (for example around a transformers segmentation model you have):
``evaluate(..., segmenter=my_segmenter)`` or ``--segmenter my_module:my_function`` on the
command line (the module is imported by name; no text is run as code). No such model runs
in CI. A sketch with CLIPSeg, if you have its weights::

    from transformers import CLIPSegForImageSegmentation, CLIPSegProcessor
    processor = CLIPSegProcessor.from_pretrained("CIDAS/clipseg-rd64-refined")
    model = CLIPSegForImageSegmentation.from_pretrained("CIDAS/clipseg-rd64-refined")

    def my_segmenter(image, phrases):
        inputs = processor(text=list(phrases), images=[image] * len(phrases), return_tensors="pt")
        logits = model(**inputs).logits.reshape(len(phrases), 352, 352)
        masks = torch.nn.functional.interpolate(logits[:, None], size=image.shape[:2])[:, 0]
        return list((masks.sigmoid() > 0.4).numpy())
"""
from ..shapes.segment import color_segmenter, shapes_fidelity
from ..layouts.suite import MAX_REGIONS, SuiteLayout, load_suite
from .clip_score import ClipScorer, clip_score
from .command import merge_runs, resolve_segmenter, run_evaluation, write_reports
from .instances import REAL_COLUMNS, RealImageScorer, box_iou, build_real_scorer, mask_box
from .real_suite import COLOR_WORDS, mig_bench_suite
from .report import (FIDELITY_MEASURES, REAL_MEASURES, RowJournal, bootstrap_summary, format_summary, plot_frontier, plot_grid,
                     read_csv, write_csv)
from .run import (ROW_FIELDS, Item, Segmenter, check_methods, evaluate, image_path, load_segmenter, shard,
                  work_items)
from .segmenters import SEGMENTER_DETECTORS, Detection, DetectSegment
from .settings import DEFAULT, controls_for, parse_sweeps, setting_label

__all__ = ["COLOR_WORDS", "ClipScorer", "DEFAULT", "Detection", "DetectSegment", "FIDELITY_MEASURES", "Item",
           "MAX_REGIONS", "REAL_COLUMNS", "REAL_MEASURES", "ROW_FIELDS", "RealImageScorer", "RowJournal",
           "SEGMENTER_DETECTORS", "Segmenter", "SuiteLayout", "bootstrap_summary", "box_iou", "build_real_scorer",
           "check_methods", "clip_score", "color_segmenter", "controls_for", "evaluate", "format_summary",
           "image_path", "load_segmenter", "load_suite", "mask_box", "merge_runs",
           "mig_bench_suite", "parse_sweeps", "plot_frontier", "plot_grid", "read_csv", "resolve_segmenter",
           "run_evaluation", "setting_label", "shapes_fidelity", "shard", "work_items", "write_csv", "write_reports"]
