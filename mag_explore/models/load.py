"""Loading the pipelines of every registered model family (``mag_explore.families``), and their generation defaults.

Which models are accepted, and how that is checked before any weight is loaded, is
:mod:`mag_explore.models.files`. Only ``.safetensors`` weights are read, and no code shipped
with a model is ever executed.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from .devices import check_device
from .files import DEFAULT_GPU_MODEL, SHAPES, check_supported, locate, require_safetensors
from ..families import family_for_index, family_of, native_size

#: Environment variable: the model to load when none is named.
MODEL_ENV = "MAG_EXPLORE_MODEL"
#: Optional file in a pipeline folder that overrides :func:`model_defaults`.
DEFAULTS_FILE = "mag_explore.json"

# Generation defaults (see model_defaults). guidance_scale, alpha, lambda and the
# timestep threshold are those of the official Masked-Attention Guidance code.
_GENERATION_DEFAULTS: dict[str, Any] = {
    "guidance_scale": 9.0,
    "num_inference_steps": 50,
    "negative_prompt": "low quality",
    "mag_alpha": 0.08,
    "mag_lmbda": 0.5,
    "mag_step_rule": "official",
    "mag_mask_mode": "nearest",
    "mag_loss": "official",
    "mag_layer_sizes": None,
    "while_t_above": 700,
}
_INFO_KEYS = frozenset({"description", "training", "measured"})
# The type each key of mag_explore.json must have (bool is excluded below: it is an int).
_DEFAULT_TYPES: dict[str, tuple[type, ...]] = {
    "height": (int,),
    "width": (int,),
    "guidance_scale": (int, float),
    "num_inference_steps": (int,),
    "negative_prompt": (str, type(None)),
    "mag_alpha": (int, float),
    "mag_lmbda": (int, float),
    "mag_step_rule": (str,),
    "mag_mask_mode": (str,),
    "mag_loss": (str,),
    "mag_layer_sizes": (list, type(None)),  # MAG's loss reads only layers of these sizes
    "while_t_above": (int, float),
    "max_sequence_length": (int,),  # Flux, SD3: T5 tokens
    "true_cfg_scale": (int, float),  # Flux: CFG with a second pass when a negative prompt is given
}

# --------------------------------------------------------------------------- places
def default_device() -> torch.device:
    """The best available device: CUDA, then Apple's MPS, then the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def default_dtype(device: str | torch.device) -> torch.dtype:
    """fp16 on a GPU (half the memory, much faster), fp32 on the CPU (fp16 is slow there)."""
    return torch.float32 if torch.device(device).type == "cpu" else torch.float16


_DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
}


def _as_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    raise ValueError(f"dtype={dtype!r} is not supported; use a torch.dtype or one of {sorted(_DTYPES)}")


def resolve_model_name(model: str | os.PathLike | None, device: str | torch.device | None = None) -> str:
    """The model that ``load_pipeline(model)`` will load, as a string.

    ``None`` means ``$MAG_EXPLORE_MODEL`` if set, else :data:`DEFAULT_GPU_MODEL` when
    the target device is a CUDA GPU and ``"shapes"`` otherwise (a full SD model is
    too slow on a CPU, and the course runs on laptops).
    """
    if model is not None:
        return os.fspath(model)
    env = os.environ.get(MODEL_ENV, "").strip()
    if env:
        return env
    target = torch.device(device) if device is not None else default_device()
    return DEFAULT_GPU_MODEL if target.type == "cuda" else SHAPES


#: Set it to choose how many CPU threads ``use_cpu_threads`` gives torch (e.g. 2 on an idle laptop).
THREADS_ENV = "MAG_EXPLORE_THREADS"
#: Below this many denoiser parameters a model counts as small (the embedded and tiny test models).
SMALL_MODEL_PARAMETERS = 50_000_000


def use_cpu_threads(pipe) -> int:
    """Pick torch's CPU thread count for ``pipe`` and return it (on a GPU: unchanged).

    A small model (the embedded ones, the tiny test builds) gets **one** thread: its matrices
    are too small for a second thread to pay off on an idle machine, and on a shared one (a
    classroom server, a 2-core VM running something else) a second thread that waits for a busy
    core makes every step many times slower. ``$MAG_EXPLORE_THREADS`` overrides the choice;
    larger models keep torch's default (one per core).
    """
    from ..families import denoiser

    if pipe.device.type != "cpu":
        return torch.get_num_threads()
    chosen = os.environ.get(THREADS_ENV, "").strip()
    if chosen:
        if not chosen.isdigit() or int(chosen) < 1:
            raise ValueError(f"${THREADS_ENV}={chosen!r}: expected a whole number of threads, 1 or more")
        torch.set_num_threads(int(chosen))
    elif sum(p.numel() for p in denoiser(pipe).parameters()) < SMALL_MODEL_PARAMETERS:
        torch.set_num_threads(1)
    return torch.get_num_threads()


# --------------------------------------------------------------------------- loading


def _dtype_keyword() -> str:
    # diffusers renamed from_pretrained's `torch_dtype` to `dtype` (0.36-ish) and warns
    # about the old name; older releases silently ignore the new one. Ask which it is.
    try:
        from diffusers.utils.deprecation_utils import _resolve_dtype  # noqa: F401
    except ImportError:
        return "torch_dtype"
    return "dtype"


@contextmanager
def library_output(verbose: bool) -> Iterator[None]:
    """diffusers' and transformers' loading bars and warnings on (verbose) or off, then restored.

    Importing ``StableDiffusionPipeline`` makes transformers warn that image processors
    (used only by the safety checker, which is never loaded) "require torchvision"; with
    the loading bars that reads like an error to a newcomer. Both libraries' own logging
    controls are set for the load only, and put back afterwards.
    """
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    libraries = (diffusers_logging, transformers_logging)
    before = [(lib, lib.is_progress_bar_enabled(), lib.get_verbosity()) for lib in libraries]
    for lib in libraries:
        (lib.enable_progress_bar if verbose else lib.disable_progress_bar)()
        if not verbose:
            lib.set_verbosity(max(lib.get_verbosity(), lib.ERROR))
    try:
        yield
    finally:
        for lib, bars_on, verbosity in before:
            (lib.enable_progress_bar if bars_on else lib.disable_progress_bar)()
            lib.set_verbosity(verbosity)


def load_pipeline(
    model: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    verbose: bool = False,
):
    """Load a pipeline of a supported family, ready to sample on ``device``.

    Args:
        model: a Hugging Face hub id (``"owner/name"``), a local folder saved with
            ``save_pretrained``, or the name of an embedded model: ``"shapes"`` (a tiny
            Stable Diffusion) or ``"shapes_flux"`` (a tiny Flux.1-shaped MMDiT), both trained on
            the shapes world (``mag_explore/data/models/<name>``). ``None``: see
            :func:`resolve_model_name` (``$MAG_EXPLORE_MODEL``, else SD1.5 on CUDA and
            ``"shapes"`` elsewhere).
        device: where to run; default :func:`default_device` (cuda, mps, cpu).
        dtype: default fp16 on a GPU, fp32 on the CPU. A ``torch.dtype`` or a name
            such as ``"fp16"``.
        verbose: show diffusers' and transformers' loading bars and warnings (quiet by
            default; the sampler's own progress bar is ``generate(..., progress=)``).

    Returns:
        The family's diffusers pipeline (``models.files.SUPPORTED`` lists them): Stable
        Diffusion with the safety checker off, SDXL without the invisible watermark (so that
        images are the sampler's own pixels), or a registered family's class (Flux.1, SD3,
        PixArt-Σ, Sana, ...; an SD3 folder without T5 loads with ``text_encoder_3=None``).

    Raises:
        UnsupportedModelError: the model is none of these (Kandinsky, inpainting, ...).
            Checked before any weight is loaded.
        FileNotFoundError: no such folder and not a hub id; or ``"shapes"`` / ``"shapes_flux"``
            before the embedded model is built (the message names its folder).
        OSError: the hub could not be reached or has no such model.
    """
    device = check_device(device) if device is not None else default_device()  # one line, before any loading
    dtype = _as_dtype(dtype) if dtype is not None else default_dtype(device)
    name = resolve_model_name(model, device)
    source, index, unet_config = locate(name)
    check_supported(index, unet_config, name=repr(name))
    if Path(source).is_dir():
        require_safetensors(Path(source), index)
    with library_output(verbose):  # the import warns, from_pretrained shows loading bars
        from diffusers.utils import is_accelerate_available

        cls, options = _pipeline_class(index)
        pipe = cls.from_pretrained(
            source,
            use_safetensors=True,  # never unpickle: a .bin/.ckpt file can run code
            **options,
            # Low-memory loading needs the optional `accelerate` package; without it
            # diffusers falls back to normal loading anyway, after a long warning.
            low_cpu_mem_usage=is_accelerate_available(),
            **{_dtype_keyword(): dtype},
        )
        # inside: diffusers warns that an fp16 pipeline "cannot run" on the CPU; with torch >= 2.1 it does
        return pipe.to(device)


def _pipeline_class(index: dict) -> tuple[type, dict]:
    """The diffusers pipeline class of a checked ``model_index.json``, and its loading options."""
    import diffusers

    family = family_for_index(index)
    if family is not None:  # a registered family's pipeline class (Flux, SD3, PixArt-Σ, Sana, ...)
        return getattr(diffusers, family.pipeline_class), family.load_options(index)
    if "text_encoder_2" in index:
        return diffusers.StableDiffusionXLPipeline, dict(add_watermarker=False)
    # research on attention: the safety checker only blacks images out; its feature extractor goes too
    return diffusers.StableDiffusionPipeline, dict(safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False)


# --------------------------------------------------------------------------- defaults


def _pipeline_folder(pipe) -> Path | None:
    name = getattr(pipe, "name_or_path", None) or getattr(pipe.config, "_name_or_path", None)
    if name and Path(name).is_dir():
        return Path(name)
    return None


def model_defaults(pipe) -> dict[str, Any]:
    """Generation defaults for ``pipe``, as a new dict.

    Keys:
        ``height``, ``width``: the native image size, UNet ``sample_size`` x the VAE
        factor (512 for SD1.5, 768 for SD2.1).
        ``guidance_scale`` (9.0): classifier-free guidance scale, as in the official MAG code.
        ``num_inference_steps`` (50): DDIM steps.
        ``negative_prompt`` (``"low quality"``): the unconditional half's prompt.
        ``mag_alpha`` (0.08), ``mag_lmbda`` (0.5): Masked-Attention Guidance step size
        and mask weight, from the official MAG code. SDXL: ``mag_alpha`` 0.01, scaled
        down for its ~7.6x larger loss sum and not calibrated on real weights
        (``families.FAMILY_DEFAULTS``).
        ``mag_step_rule`` (``"official"``): MAG's step rule, "official" (x_t − α∇L, the paper's) or
        "normalized" (ours: α noise-stds per step, see ``MaskedAttentionGuidance``).
        ``mag_mask_mode`` (``"nearest"``): how MAG resizes a region's mask to each layer's grid,
        "nearest" (the official code's) or "area" (each cell weighted by the share of it the
        region covers; see ``Layout.masks_at``).
        ``mag_loss`` (``"official"``): MAG's loss, "official" (the paper's) or "balanced" (ours:
        the outside term weighted by the region's area over the outside's; see
        ``MaskedAttentionGuidance``).
        ``mag_layer_sizes`` (None: every layer): the layer sizes (the larger side, e.g. ``[16]``)
            whose cross-attention MAG's loss reads.
        ``while_t_above`` (700): MAG guides while the timestep is above this threshold
        (the early, layout-forming steps). Flux and SD3: t = 1000·σ, so σ > 0.7.
        Flux and SD3 also have ``max_sequence_length`` (T5 tokens: 512 and 256) and take the
        pipelines' own ``guidance_scale`` (3.5 and 7.0), ``num_inference_steps`` (28) and no
        negative prompt; Flux has ``true_cfg_scale`` (1.0: true CFG off).

    A file ``mag_explore.json`` in the pipeline's folder (a local model, or the
    embedded "shapes" model) overrides any of these keys, e.g.
    ``{"num_inference_steps": 20, "guidance_scale": 5.0}``. Hub models have no folder,
    so they get the defaults above.
    """
    h, w = native_size(pipe)
    defaults: dict[str, Any] = {"height": h, "width": w, **_GENERATION_DEFAULTS,
                                **family_of(pipe).defaults}

    folder = _pipeline_folder(pipe)
    file = folder / DEFAULTS_FILE if folder is not None else None
    if file is not None and file.is_file():
        overrides = json.loads(file.read_text())
        if not isinstance(overrides, dict):
            raise ValueError(f"{file} must hold a JSON object with keys from {sorted(_DEFAULT_TYPES)}")
        # "description", "training" and "measured" document the model for people; they set no default.
        overrides = {k: v for k, v in overrides.items() if k not in _INFO_KEYS}
        for key, value in overrides.items():
            if key not in _DEFAULT_TYPES:
                raise ValueError(f"{file}: unknown key {key!r}; accepted keys are {sorted(_DEFAULT_TYPES)} "
                                 f"(and {sorted(_INFO_KEYS)} for documentation)")
            types = _DEFAULT_TYPES[key]
            if isinstance(value, bool) or not isinstance(value, types):
                names = " or ".join("null" if t is type(None) else t.__name__ for t in types)
                raise ValueError(f"{file}: {key}={value!r} must be {names}")
        defaults.update(overrides)
    return defaults
