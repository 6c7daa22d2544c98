"""Command line: ``python -m mag_explore generate|demo|evaluate|edit ...``.

A user's mistake (a bad value, a missing file, a run that blew up to NaN) is a short
message on stderr ("error: ...", at most three lines, no traceback) and exit status 2,
and nothing is written. Any other exception is a bug: it keeps its traceback (exit 1).
Set ``MAG_EXPLORE_DEBUG=1`` to see the traceback of user errors too.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

from .data import data_dir
from .validation import InputError, NonFiniteError, check_choice, check_count, check_lambda, check_number, check_seed

DATA = data_dir()
PACKAGE = Path(__file__).resolve().parent
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


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


#: The families ``load_pipeline`` accepts, as their titles say (written out, so that ``--help`` needs no
#: torch import; tests/test_cli.py checks it against the registry).
FAMILIES_IN_HELP = ("Stable Diffusion 1.x/2.x, SDXL base, Flux.1, SD3 / SD3.5, PixArt-Σ, Sana, Chroma, Qwen-Image, "
                    "Z-Image, Flux.2 Klein")


def add_generation_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help=f"hub id or local folder of a pipeline of a supported family: {FAMILIES_IN_HELP}; "
                        "or 'shapes' (default: 'shapes' "
                        "without a GPU, Stable Diffusion 1.5 with one; env MAG_EXPLORE_MODEL overrides)")
    p.add_argument("--negative-prompt", default=None, help="default: the model's")
    p.add_argument("--layout", help="color-label PNG of the regions")
    p.add_argument("--regions", help='JSON {"#ff0000": "red circle", ...} (inline or a .json file) with --layout')
    p.add_argument("--word-ids", help='official MAG format with --layout, e.g. "[[1,2,3,4],[6,7]]" (index 0 = BOS)')
    p.add_argument("--method", choices=["none", "swap", "mag", "pww", "lg"], default="mag",
                   help="none, swap or mag (the paper's), pww (paint-with-words) or lg (layout guidance); default: mag")
    p.add_argument("--alpha", type=float, default=None,
                   help="MAG step size α (default: the model's)")
    p.add_argument("--lmbda", type=float, default=None, help="MAG weight λ of attention outside the masks (default: the model's)")
    p.add_argument("--step-rule", choices=["official", "normalized"], default=None,
                   help="MAG's update: official (x_t - alpha grad L, the paper's) or normalized (alpha noise-stds long); "
                        "default: the model's")
    p.add_argument("--allow-negative-lambda", action="store_true",
                   help="experimental: accept --lmbda < 0 (it rewards attention outside the regions)")
    p.add_argument("--guide-while-t-above", type=int, default=None,
                   help="MAG guides while timestep t > T (default: the model's; Flux/SD3: t = 1000 sigma)")
    p.add_argument("--swap-while-t-above", type=int, default=None,
                   help="swap while timestep t > T (default: the model's)")
    add_common_options(p)
    p.add_argument("--cfg", type=float, default=None, help="classifier-free guidance scale (default: the model's; Flux: its guidance embedding)")
    p.add_argument("--true-cfg", type=float, default=None,
                   help="Flux only: CFG with a second, negative-prompt pass, 1 = off (default: the model's)")
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
    demo.add_argument("--seed", type=int, default=1,
                      help="default 1: both objects placed (README: the shipped MAG places both in 2 of seeds 0-5)")
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
    ev.add_argument("--first-seed", type=int, default=0, metavar="K",
                    help="seeds K..K+N-1 instead: held-out seeds to confirm a setting chosen on 0..N-1")
    add_common_options(ev)
    ev.add_argument("--segmenter", default=None,
                    help="for models other than 'shapes': grounded-sam or owl-sam (built in: detector boxes -> SAM "
                         "masks, plus instance success and CLIP scores), or package.module:function (image, phrases) -> masks")
    real = ev.add_argument_group("built-in segmenters (--segmenter grounded-sam / owl-sam); hub names or local folders")
    real.add_argument("--detector", help="Grounding DINO / OWLv2 model (default IDEA-Research/grounding-dino-tiny, "
                                         "google/owlv2-base-patch16-ensemble)")
    real.add_argument("--sam", help="SAM model (default facebook/sam-vit-base)")
    real.add_argument("--clip", help="CLIP model of the CLIP scores (default openai/clip-vit-large-patch14)")
    real.add_argument("--box-threshold", type=float, help="least detector score of a box (default 0.35; owl-sam 0.1)")
    real.add_argument("--text-threshold", type=float, help="grounded-sam: least probability of the phrase's noun (0.25)")
    real.add_argument("--segmenter-dtype", default=None, help="float32 (default), float16 or bfloat16")
    ev.add_argument("--sweep", action="append", default=[], metavar="METHOD.OPTION=V1,V2,...",
                    help="settings to evaluate besides the default, e.g. mag.alpha=0.05,0.1, swap.while_t_above=600,800 or swap.step_range=0:5,0:10 "
                         "(repeat for several; options of one method combine as a grid)")
    ev.add_argument("--out", default="outputs/eval",
                    help="folder for results.csv, summary.md, grid.png, frontier.png; a run there resumes")
    ev.add_argument("--fresh", action="store_true", help="start over instead of resuming the run in --out")
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
    ed.add_argument("--alpha", type=float, default=None, help="MAG step size α (default: the model's)")
    ed.add_argument("--lmbda", type=float, default=None, help="MAG weight λ of attention outside the masks (default: the model's)")
    ed.add_argument("--step-rule", choices=["official", "normalized"], default=None,
                    help="MAG's update, official or normalized (default: the model's)")
    ed.add_argument("--allow-negative-lambda", action="store_true", help="experimental: accept --lmbda < 0")
    ed.add_argument("--guide-while-t-above", type=int, default=None, help="guide while timestep t > T (default: the model's)")
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


def check_output(option: str, path: str | None, suffixes: tuple[str, ...]) -> None:
    """An output file we can write: a known suffix, not a folder, its parent not a file."""
    if path is None:
        return
    target = Path(path)
    if target.suffix.lower() not in suffixes:
        raise InputError(f"{option} {path}: give a file name ending in {', '.join(suffixes)}")
    if target.is_dir():
        raise InputError(f"{option} {path} is a folder; give a file name")
    for parent in target.parents:
        if parent.exists() and not parent.is_dir():
            raise InputError(f"{option} {path}: {parent} is a file, not a folder")


def check_method_numbers(args) -> None:
    """The numbers shared by generate and edit, checked before any model is loaded."""
    if args.num_inference_steps is not None:
        check_count("--num-inference-steps", args.num_inference_steps)
    for flag, value in (("--cfg", args.cfg), ("--true-cfg", getattr(args, "true_cfg", None))):
        if value is not None:
            check_number(flag, value, minimum=0)
    if args.alpha is not None:
        check_number("--alpha", args.alpha, minimum=0)
    if args.lmbda is not None:
        check_lambda(args.lmbda, args.allow_negative_lambda, name="--lmbda")
    for option in ("guide_while_t_above", "swap_while_t_above"):
        value = getattr(args, option, None)
        if value is not None:
            check_count("--" + option.replace("_", "-"), value, minimum=0, maximum=999)


def check_generate_args(args) -> None:
    check_method_numbers(args)
    check_seed(args.seed)
    for option in ("height", "width"):
        if getattr(args, option) is not None:
            check_count("--" + option, getattr(args, option))
    check_output("--out", args.out, IMAGE_SUFFIXES)
    check_output("--save-attention", args.save_attention, (".safetensors",))


def run_generate(args) -> str:
    from . import families
    from .attention import AttentionStore
    from .methods import make_controls
    from .models.load import load_pipeline
    from .sampling import generate

    check_generate_args(args)
    layout = load_layout(args, args.prompt)
    threshold = {"mag": args.guide_while_t_above, "swap": args.swap_while_t_above}.get(args.method)
    for flag, value, method in (("--alpha", args.alpha, "mag"), ("--lmbda", args.lmbda, "mag"),
                                ("--step-rule", args.step_rule, "mag"),
                                ("--guide-while-t-above", args.guide_while_t_above, "mag"),
                                ("--swap-while-t-above", args.swap_while_t_above, "swap"),
                                ("--allow-negative-lambda", args.allow_negative_lambda or None, "mag")):
        if value is not None and args.method != method:
            raise InputError(f"{flag} is a setting of --method {method}, not of --method {args.method}")
    pipe = load_pipeline(args.model, device=args.device, verbose=args.verbose)
    if args.true_cfg is not None and "true_cfg_scale" not in families.family_of(pipe).options:
        raise InputError(f"--true-cfg {args.true_cfg} is a setting of Flux pipelines, not of this "
                         f"{families.family(pipe)} pipeline; use --cfg")
    # settings left as None are resolved from the model's defaults when the run starts
    experimental = {"allow_negative_lambda": True} if args.allow_negative_lambda else {}
    controls = make_controls(args.method, layout, alpha=args.alpha, lmbda=args.lmbda, step_rule=args.step_rule,
                             while_t_above=threshold, **experimental)
    store = AttentionStore() if args.save_attention else None
    result = generate(pipe, args.prompt, negative_prompt=args.negative_prompt, num_inference_steps=args.num_inference_steps,
                      guidance_scale=args.cfg, true_cfg_scale=args.true_cfg, seed=args.seed, height=args.height,
                      width=args.width, controls=controls, store=store)
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

    if args.num_inference_steps is not None:
        check_count("--num-inference-steps", args.num_inference_steps)
    check_seed(args.seed)
    check_output("--out", args.out, IMAGE_SUFFIXES)
    out = demo_figure(model=args.model, layout_path=args.layout, num_inference_steps=args.num_inference_steps,
                      seed=args.seed, out=args.out, device=args.device, verbose=args.verbose)
    return f"wrote {out}"


def run_evaluate(args) -> str:
    from .evaluate import check_methods, load_segmenter, run_evaluation
    from .evaluate.segmenters import SEGMENTER_DETECTORS

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    check_methods(methods)
    check_count("--seeds", args.seeds)
    check_count("--first-seed", args.first_seed, minimum=0)
    if args.num_inference_steps is not None:
        check_count("--num-inference-steps", args.num_inference_steps)
    if not Path(args.suite).is_file():
        raise InputError(f"--suite {args.suite}: no such file; give a suite JSON such as {DATA / 'suites' / 'shapes.json'}")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise InputError(f"--out {args.out} is a file; give a folder for results.csv, summary.md and grid.png")
    options = segmenter_options(args)
    if args.segmenter and args.segmenter not in SEGMENTER_DETECTORS:
        if options:
            given = ", ".join(f"--{'segmenter-dtype' if k == 'dtype' else k.replace('_', '-')}" for k in sorted(options))
            raise InputError(f"{given}: only for the built-in segmenters {list(SEGMENTER_DETECTORS)}, "
                             f"not for --segmenter {args.segmenter!r}")
        try:
            load_segmenter(args.segmenter)
        except ImportError as error:
            raise InputError(f"--segmenter {args.segmenter!r}: cannot import it ({error})") from None
    return run_evaluation(args.model, args.suite, methods, args.seeds, args.out, first_seed=args.first_seed,
                          num_inference_steps=args.num_inference_steps, device=args.device,
                          segmenter=args.segmenter, sweeps=args.sweep, fresh=args.fresh, verbose=args.verbose,
                          segmenter_options=options or None)


def segmenter_options(args) -> dict:
    """The built-in segmenter's options given on the command line (build_real_scorer's keywords)."""
    for name in ("box_threshold", "text_threshold"):
        if getattr(args, name) is not None:
            check_number(f"--{name.replace('_', '-')}", getattr(args, name), minimum=0, maximum=1)
    given = {"detector": args.detector, "sam": args.sam, "clip": args.clip, "box_threshold": args.box_threshold,
             "text_threshold": args.text_threshold, "dtype": args.segmenter_dtype}
    return {k: v for k, v in given.items() if v is not None}


def run_edit(args) -> str:
    from .editing.edit import edit_image
    from .models.load import load_pipeline

    from .layouts import Layout

    from .editing.edit import STARTS
    from .methods import METHOD_NAMES

    check_method_numbers(args)
    check_number("--threshold", args.threshold, minimum=0, maximum=1)
    check_choice("--start", args.start, STARTS)
    check_choice("--method", args.method, METHOD_NAMES)
    check_count("--inject-steps", args.inject_steps, minimum=0)
    check_output("--out", args.out, IMAGE_SUFFIXES)
    check_output("--save-reconstruction", args.save_reconstruction, IMAGE_SUFFIXES)
    if not Path(args.image).is_file():
        raise InputError(f"--image {args.image}: no such file")
    layout = load_layout(args, args.prompt)
    source = Layout.from_json(args.source_layout) if args.source_layout else None
    pipe = load_pipeline(args.model, device=args.device, verbose=args.verbose)
    result = edit_image(pipe, args.image, args.prompt, layout, source_layout=source, start=args.start,
                        method=args.method, keep=args.keep,
                        inject_step_range=(0, args.inject_steps) if args.inject_steps else None,
                        threshold=args.threshold, num_inference_steps=args.num_inference_steps,
                        guidance_scale=args.cfg, alpha=args.alpha, lmbda=args.lmbda, step_rule=args.step_rule,
                        while_t_above=args.guide_while_t_above,
                        allow_negative_lambda=args.allow_negative_lambda)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result.image.save(out)
    lines = [f"wrote {out} (reconstruction PSNR {result.reconstruction_psnr:.1f} dB)"]
    if args.save_reconstruction:
        result.source.image.save(args.save_reconstruction)
        lines.append(f"wrote {args.save_reconstruction}")
    return "\n".join(lines)


def is_user_error(error: BaseException) -> bool:
    """Our checks' errors, files the system refused, and NaN runs; a ValueError only if we raised it."""
    if isinstance(error, (InputError, NonFiniteError, OSError, json.JSONDecodeError)):
        return True
    if isinstance(error, ValueError):  # raised on purpose by our own code, not deep inside torch
        tb = error.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        return tb is not None and Path(tb.tb_frame.f_code.co_filename).resolve().is_relative_to(PACKAGE)
    return False


def short_message(error: BaseException) -> str:
    """``error: <first line>`` plus, if the message has more, its other lines joined on one line."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()] or [type(error).__name__]
    text = f"error: {lines[0]}"
    return text + (f"\n  {'; '.join(lines[1:])}" if len(lines) > 1 else "")


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    commands = {"generate": run_generate, "demo": run_demo, "evaluate": run_evaluate, "edit": run_edit}
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning  # our warnings as one plain line, no source line
        try:
            message = commands[args.command](args)
        except Exception as error:
            if not is_user_error(error) or os.environ.get("MAG_EXPLORE_DEBUG"):
                raise  # a bug: keep the traceback for the report
            print(short_message(error), file=sys.stderr)
            return 2
    print(message)
    return 0
