"""Command line: ``python -m mag_explore generate|demo|evaluate|edit ...``.

Every error on bad input is one line on stderr and a non-zero exit status.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .data import data_dir

DATA = data_dir()


def _json_arg(text: str):
    """A JSON value given inline or as a path to a .json file."""
    path = Path(text)
    if text.endswith(".json") and path.exists():
        text = path.read_text()
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"not valid JSON: {text!r} ({error.msg})") from None


def add_common_options(p: argparse.ArgumentParser, steps_help: str = "denoising steps (default: the model's)") -> None:
    """Options every command has: the step count and --verbose."""
    p.add_argument("--num-inference-steps", "--steps", dest="num_inference_steps", type=int, default=None,
                   metavar="N", help=steps_help)
    p.add_argument("--verbose", action="store_true",
                   help="show the libraries' loading bars and warnings while the model loads")


def add_generation_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="hub id or local folder of an SD 1.x/2.x pipeline, or 'shapes' (default: 'shapes' "
                        "without a GPU, Stable Diffusion 1.5 with one; env MAG_EXPLORE_MODEL overrides)")
    p.add_argument("--negative-prompt", default=None, help="default: the model's ('low quality', as the official MAG)")
    p.add_argument("--layout", help="color-label PNG of the regions")
    p.add_argument("--regions", help='JSON {"#ff0000": "red circle", ...} (inline or a .json file) with --layout')
    p.add_argument("--word-ids", help='official MAG format with --layout, e.g. "[[1,2,3,4],[6,7]]" (index 0 = BOS)')
    p.add_argument("--method", choices=["none", "swap", "mag", "pww", "lg"], default="mag",
                   help="none, swap or mag (the paper's), pww (paint-with-words) or lg (layout guidance); default: mag")
    p.add_argument("--alpha", type=float, default=None, help="MAG step size (default: the model's; 0.08 on SD)")
    p.add_argument("--lmbda", type=float, default=None, help="MAG weight of attention outside the masks (default 0.5)")
    p.add_argument("--guide-until", type=int, default=None,
                   help="MAG guides while timestep t > T (default: the model's; 700 as the official code)")
    p.add_argument("--swap-until", type=int, default=None,
                   help="swap while timestep t > T (default: the model's guide_until; 700)")
    add_common_options(p, "denoising steps (default: the model's; 50)")
    p.add_argument("--cfg", type=float, default=None, help="classifier-free guidance scale (default: the model's; 9 on SD)")
    p.add_argument("--seed", type=int, default=42, help="default 42 (the official script's)")
    p.add_argument("--height", type=int, default=None, help="default: the model's native size")
    p.add_argument("--width", type=int, default=None, help="default: the model's native size")
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: auto)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mag_explore", description=__doc__,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="generate one image with none / swap / MAG")
    gen.add_argument("--prompt", required=True, help="the text prompt")
    add_generation_options(gen)
    gen.add_argument("--out", required=True, help="where to write the PNG")
    gen.add_argument("--save-attention", help="also save the cross-attention maps (.safetensors)")
    demo = commands.add_parser("demo", help="none vs swap vs MAG on an example layout, as one figure")
    demo.add_argument("--model", default=None, help="default: the embedded 'shapes' model without a GPU")
    demo.add_argument("--layout", default=str(DATA / "layouts" / "bottom_half.json"),
                      help="layout JSON (default: two objects low, where the shapes model would not put them)")
    add_common_options(demo)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--out", default="outputs/demo.png", help="where to write the figure")
    demo.add_argument("--device", default=None)
    add_evaluate_parser(commands)
    add_edit_parser(commands)
    return parser


def add_evaluate_parser(commands) -> None:
    ev = commands.add_parser("evaluate", help="mask-IoU benchmark: every layout x method x seed of a suite")
    ev.add_argument("--model", default=None, help="default: the embedded 'shapes' model without a GPU")
    ev.add_argument("--suite", default=str(DATA / "suites" / "shapes.json"), help="suite JSON of layouts")
    ev.add_argument("--methods", default="none,swap,mag,pww,lg", help="comma-separated methods")
    ev.add_argument("--seeds", type=int, default=4, help="seeds 0..N-1 per layout and method")
    add_common_options(ev)
    ev.add_argument("--segmenter", default=None,
                    help="package.module:function (image, phrases) -> masks, for models other than 'shapes'")
    ev.add_argument("--out", default="outputs/eval", help="folder for results.csv, summary.md, grid.png")
    ev.add_argument("--device", default=None)


def add_edit_parser(commands) -> None:
    ed = commands.add_parser("edit", help="move the objects of an image into a new layout (DDIM inversion + MAG)")
    ed.add_argument("--model", default=None, help="as for generate (default: 'shapes' without a GPU)")
    ed.add_argument("--image", required=True, help="the input image (its size must be a multiple of the VAE factor)")
    ed.add_argument("--prompt", required=True, help="a description of the input image that names the layout's words")
    ed.add_argument("--layout", required=True, help="target layout: a layout JSON, or a color PNG with --regions/--word-ids")
    ed.add_argument("--regions", help='JSON {"#ff0000": "red circle", ...} (inline or a .json file) with --layout PNG')
    ed.add_argument("--word-ids", help='official MAG format with --layout PNG, e.g. "[[2,3]]" (index 0 = BOS)')
    ed.add_argument("--keep", action="append", default=[], metavar="WORDS",
                    help="words that stay where they are (repeat for several); their regions are read from "
                         "the source run's attention")
    ed.add_argument("--source-layout", help="where the objects are now: a layout JSON (default: read from attention)")
    ed.add_argument("--threshold", type=float, default=0.5, help="attention threshold for the kept regions")
    ed.add_argument("--start", default="move",
                    help="x_T of the edit: move (default: carry the moved words' cells to the target), inverted or renoise")
    ed.add_argument("--inject-steps", type=int, default=0,
                    help="inject the kept words' source attention during the first N steps (0: no injection)")
    ed.add_argument("--method", default="mag", help="mag, swap or none")
    ed.add_argument("--alpha", type=float, default=None, help="MAG step size (default: the model's)")
    ed.add_argument("--lmbda", type=float, default=None, help="MAG weight of attention outside the masks")
    ed.add_argument("--guide-until", type=int, default=None, help="guide while timestep t > T (default: the model's)")
    add_common_options(ed, "inversion and sampling steps (default: the model's)")
    ed.add_argument("--cfg", type=float, default=1.0, help="guidance scale of inversion and sampling (1: faithful)")
    ed.add_argument("--device", default=None, help="cuda, mps or cpu (default: auto)")
    ed.add_argument("--out", required=True, help="where to write the edited PNG")
    ed.add_argument("--save-reconstruction", help="also write the source run (the input redrawn from its inversion)")


def load_layout(args, prompt: str | None = None):
    from .layouts import Layout

    if args.layout is None:
        if args.method != "none":
            raise ValueError(f"--method {args.method} needs --layout PNG with --regions or --word-ids")
        return None
    if args.layout.endswith(".json"):
        return Layout.from_json(args.layout)
    if (args.regions is None) == (args.word_ids is None):
        raise ValueError("with --layout PNG give exactly one of --regions JSON or --word-ids JSON")
    if args.regions is not None:
        regions = _json_arg(args.regions)
        if not isinstance(regions, dict):
            raise ValueError(f'--regions must be a JSON object like {{"#ff0000": "red circle"}}, got {regions!r}')
        return Layout.from_color_png(args.layout, regions, prompt=prompt)
    return Layout.from_official(args.layout, args.word_ids, prompt=prompt)


def run_generate(args) -> str:
    from .attention import AttentionStore
    from .methods import make_controls
    from .models import load_pipeline
    from .sampling import generate

    layout = load_layout(args, args.prompt)
    pipe = load_pipeline(args.model, device=args.device, verbose=args.verbose)
    threshold = {"mag": args.guide_until, "swap": args.swap_until}.get(args.method)
    for flag, value, method in (("--alpha", args.alpha, "mag"), ("--lmbda", args.lmbda, "mag"),
                                ("--guide-until", args.guide_until, "mag"), ("--swap-until", args.swap_until, "swap")):
        if value is not None and args.method != method:
            raise ValueError(f"{flag} is a setting of --method {method}, not of --method {args.method}")
    # settings left as None are resolved from the model's defaults when the run starts
    controls = make_controls(args.method, layout, alpha=args.alpha, lmbda=args.lmbda, while_t_above=threshold)
    store = AttentionStore() if args.save_attention else None
    result = generate(pipe, args.prompt, negative_prompt=args.negative_prompt, num_inference_steps=args.num_inference_steps,
                      guidance_scale=args.cfg, seed=args.seed, height=args.height, width=args.width,
                      controls=controls, store=store)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result.images[0].save(out)
    lines = [f"wrote {out}"]
    if store is not None:
        store.save(args.save_attention)
        lines.append(f"wrote {args.save_attention} ({store.nbytes / 1e6:.1f} MB of attention maps)")
    return "\n".join(lines)


def run_demo(args) -> str:
    from .demo import demo_figure

    out = demo_figure(model=args.model, layout_path=args.layout, num_inference_steps=args.num_inference_steps,
                      seed=args.seed, out=args.out, device=args.device, verbose=args.verbose)
    return f"wrote {out}"


def run_evaluate(args) -> str:
    from .evaluate import run_evaluation

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    return run_evaluation(args.model, args.suite, methods, args.seeds, args.out, steps=args.num_inference_steps,
                          device=args.device, segmenter=args.segmenter)


def run_edit(args) -> str:
    from .editing import edit_image
    from .models import load_pipeline

    from .layouts import Layout

    layout = load_layout(args, args.prompt)
    source = Layout.from_json(args.source_layout) if args.source_layout else None
    if args.inject_steps < 0:
        raise ValueError(f"--inject-steps {args.inject_steps}: give 0 (no injection) or a number of steps")
    pipe = load_pipeline(args.model, device=args.device, verbose=args.verbose)
    result = edit_image(pipe, args.image, args.prompt, layout, source_layout=source, start=args.start,
                        method=args.method, keep=args.keep,
                        inject_step_range=(0, args.inject_steps) if args.inject_steps else None,
                        threshold=args.threshold, num_inference_steps=args.num_inference_steps,
                        guidance_scale=args.cfg, alpha=args.alpha, lmbda=args.lmbda, while_t_above=args.guide_until)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result.image.save(out)
    lines = [f"wrote {out} (reconstruction PSNR {result.reconstruction_psnr:.1f} dB)"]
    if args.save_reconstruction:
        result.source.image.save(args.save_reconstruction)
        lines.append(f"wrote {args.save_reconstruction}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .methods import NonFiniteGuidanceError

    try:
        commands = {"generate": run_generate, "demo": run_demo, "evaluate": run_evaluate, "edit": run_edit}
        message = commands[args.command](args)
    except (ValueError, KeyError, FileNotFoundError, NonFiniteGuidanceError, OSError) as error:
        text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"error: {text}", file=sys.stderr)
        return 2
    print(message)
    return 0
