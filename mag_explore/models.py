"""Loading Stable Diffusion 1.x / 2.x pipelines, and their generation defaults.

Everything in mag-explore works on the cross-attention layers of a UNet: the layers
where each image position looks at the prompt's tokens. Only models that have them
are accepted, and that is checked from the small ``model_index.json`` *before*
gigabytes of weights are loaded:

* supported: Stable Diffusion 1.x and 2.x in diffusers format
  (``StableDiffusionPipeline``-style: ``unet`` = UNet2DConditionModel with
  cross-attention blocks, ``text_encoder`` = CLIPTextModel, ``tokenizer`` =
  CLIPTokenizer, ``vae`` = AutoencoderKL), from the Hugging Face hub or a local folder,
  and ``"shapes"``, the small model embedded in this repository;
* refused with :class:`UnsupportedModelError`: SDXL (two text encoders), SD3, Flux,
  PixArt (a transformer instead of a UNet), Kandinsky (image-embedding conditioning),
  DeepFloyd IF (T5), inpainting and upscaling UNets (extra input channels), ...

Only ``.safetensors`` weights are read: pickle files (``.bin``, ``.ckpt``) can run
arbitrary code when loaded, and no code shipped with a model is ever executed.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

#: The model used on a CUDA machine when no model is named.
DEFAULT_GPU_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
#: Reserved name of the model embedded in the repository (``data/models/shapes``).
SHAPES = "shapes"
#: Environment variables: the model to load when none is named, and the data folder.
MODEL_ENV = "MAG_EXPLORE_MODEL"
DATA_ENV = "MAG_EXPLORE_DATA"
#: Optional file in a pipeline folder that overrides :func:`model_defaults`.
DEFAULTS_FILE = "mag_explore.json"

SUPPORTED = (
    "Stable Diffusion 1.x/2.x pipelines in diffusers format (StableDiffusionPipeline-style: "
    "unet = UNet2DConditionModel with cross-attention, text_encoder = CLIPTextModel, "
    "tokenizer = CLIPTokenizer, vae = AutoencoderKL; 4 latent input channels), e.g. "
    f"{DEFAULT_GPU_MODEL!r}, 'stabilityai/stable-diffusion-2-1', or {SHAPES!r}"
)

# Generation defaults (see model_defaults). guidance_scale, alpha, lambda and the
# timestep threshold are those of the official Masked-Attention Guidance code.
_GENERATION_DEFAULTS: dict[str, Any] = {
    "guidance_scale": 9.0,
    "num_inference_steps": 50,
    "negative_prompt": "low quality",
    "mag_alpha": 0.08,
    "mag_lambda": 0.5,
    "guide_until": 700,
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
    "mag_lambda": (int, float),
    "guide_until": (int, float),
}

# Components an SD 1.x/2.x pipeline must have: name -> accepted (library, class) pairs.
# Requiring the library to be diffusers/transformers also means a model can never make
# us import a module of its own (custom code shipped in the model folder).
_REQUIRED_COMPONENTS: dict[str, set[tuple[str, str]]] = {
    "unet": {("diffusers", "UNet2DConditionModel")},
    "text_encoder": {("transformers", "CLIPTextModel")},
    "tokenizer": {("transformers", "CLIPTokenizer"), ("transformers", "CLIPTokenizerFast")},
    "vae": {("diffusers", "AutoencoderKL")},
}
_TRUSTED_LIBRARIES = {"diffusers", "transformers"}
# Components load_pipeline never loads (it passes None for them), whatever their library.
_IGNORED = {"safety_checker", "feature_extractor"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


class UnsupportedModelError(ValueError):
    """The model is not a Stable Diffusion 1.x/2.x pipeline with UNet cross-attention."""


# --------------------------------------------------------------------------- places


def data_dir() -> Path:
    """The repository's ``data`` folder (``$MAG_EXPLORE_DATA`` overrides it)."""
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env).expanduser().resolve()
    return Path(__file__).resolve().parent.parent / "data"


def data_path(*parts: str) -> Path:
    """A file or folder of the data shipped with the package, e.g. ``data_path("suites", "shapes.json")``."""
    return data_dir().joinpath(*parts)


def shapes_model_dir() -> Path:
    """Where the embedded ``"shapes"`` model lives: ``<data>/models/shapes``."""
    return data_dir() / "models" / SHAPES


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


# --------------------------------------------------------------------------- checks


def _looks_like_path(name: str) -> bool:
    return (
        name.startswith((".", "~", "/"))
        or "\\" in name
        or name.count("/") > 1
        or Path(name).is_absolute()
    )


def _locate(name: str) -> tuple[str, dict, dict | None]:
    """Find the model: ``(folder or hub id, model_index.json, unet/config.json or None)``."""
    if name == SHAPES:
        folder = shapes_model_dir()
        if not (folder / "model_index.json").is_file():
            raise FileNotFoundError(
                f"The embedded {SHAPES!r} model is not built yet: there is no model_index.json in "
                f"{folder}. Build it with `python -m mag_explore.shapes.train` (it writes that folder), "
                f"point ${DATA_ENV} at a data folder that has models/{SHAPES}, or load a Stable "
                f"Diffusion model instead, e.g. load_pipeline({DEFAULT_GPU_MODEL!r}) on a GPU."
            )
        return _locate_folder(folder)
    path = Path(name).expanduser()
    if path.exists():
        return _locate_folder(path)
    if _looks_like_path(name) or not _HUB_ID.match(name):
        raise FileNotFoundError(
            f"Model {name!r} is neither an existing folder (looked for {path.resolve()}) nor a "
            f"Hugging Face hub id of the form 'owner/name'. Use {SUPPORTED}."
        )
    return _locate_hub(name)


def _locate_folder(folder: Path) -> tuple[str, dict, dict | None]:
    folder = folder.resolve()
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{folder} is a file; give the folder that contains model_index.json (a pipeline "
            f"saved with save_pretrained). A single .safetensors checkpoint can be converted with "
            f"StableDiffusionPipeline.from_single_file(file).save_pretrained(folder)."
        )
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise FileNotFoundError(
            f"{folder} has no model_index.json, so it is not a diffusers pipeline folder. "
            f"Save one with pipe.save_pretrained(folder); load_pipeline accepts {SUPPORTED}."
        )
    index = json.loads(index_file.read_text())
    unet_file = folder / "unet" / "config.json"
    unet_config = json.loads(unet_file.read_text()) if unet_file.is_file() else None
    return str(folder), index, unet_config


_PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")


def _require_safetensors(folder: Path, index: dict) -> None:
    """Say clearly when a component only has pickle weights (diffusers' error is terse)."""
    for name in ("unet", "vae", "text_encoder"):
        sub = folder / name
        if not sub.is_dir() or _component(index, name) is None:
            continue  # check_supported reports missing components
        files = [f.name for f in sub.iterdir()]
        if not any(f.endswith(".safetensors") for f in files):
            pickles = [f for f in files if f.endswith(_PICKLE_SUFFIXES)]
            raise FileNotFoundError(
                f"{sub} has no .safetensors weights (found {pickles or files}). mag-explore only "
                f"loads safetensors, because unpickling a .bin/.ckpt file can run arbitrary code. "
                f"If you trust the file, convert it once: load it with diffusers and call "
                f"save_pretrained(folder, safe_serialization=True)."
            )


def _locate_hub(repo_id: str) -> tuple[str, dict, dict | None]:
    # Only the two small json files are fetched here; weights come after the check.
    from diffusers import DiffusionPipeline, UNet2DConditionModel

    try:
        index = DiffusionPipeline.load_config(repo_id)
    except Exception as exc:  # network down, typo, gated model...: say which model and why
        raise OSError(
            f"Could not read model_index.json of hub model {repo_id!r} (it is not a local folder "
            f"either): {exc}"
        ) from exc
    try:
        unet_config = UNet2DConditionModel.load_config(repo_id, subfolder="unet")
    except Exception:
        unet_config = None  # no unet folder: check_supported says why that is refused
    return repo_id, dict(index), unet_config


def _component(index: dict, name: str) -> tuple[str, str] | None:
    value = index.get(name)
    if isinstance(value, (list, tuple)) and len(value) == 2 and value[1] is not None:
        return str(value[0]), str(value[1])
    return None


def check_supported(model_index: dict, unet_config: dict | None = None, name: str = "the model") -> None:
    """Raise :class:`UnsupportedModelError` unless this is an SD 1.x/2.x-style pipeline.

    ``model_index`` is the pipeline's ``model_index.json``; ``unet_config`` its
    ``unet/config.json`` if known (to refuse inpainting/upscaling UNets).
    """
    cls = model_index.get("_class_name", "an unknown pipeline class")
    components = {k: _component(model_index, k) for k in model_index if not k.startswith("_")}
    present = {k: v for k, v in components.items() if v is not None}

    reason = None
    if "unet" not in present:
        denoiser = present.get("transformer") or present.get("prior") or present.get("decoder")
        what = f"its denoiser is {denoiser[1]}" if denoiser else f"its components are {sorted(present)}"
        reason = f"it has no UNet ({what}), so there is no UNet cross-attention to work on"
    elif "text_encoder_2" in present or "tokenizer_2" in present:
        reason = "it has two text encoders (SDXL-style), not one CLIP text encoder"
    else:
        for comp, accepted in _REQUIRED_COMPONENTS.items():
            found = present.get(comp)
            if found is None:
                reason = f"it has no {comp!r} component (SD 1.x/2.x needs {sorted(c for _, c in accepted)})"
                break
            if found not in accepted:
                reason = (
                    f"its {comp!r} is {found[1]} from {found[0]!r}, "
                    f"not {' or '.join(sorted(c for _, c in accepted))}"
                )
                break
    if reason is None:
        foreign = {k: v for k, v in present.items() if v[0] not in _TRUSTED_LIBRARIES and k not in _IGNORED}
        if foreign:
            reason = (
                f"its components {foreign} come from libraries other than {sorted(_TRUSTED_LIBRARIES)}; "
                f"custom code shipped with a model is never run"
            )
    if reason is None and unet_config is not None:
        in_channels = unet_config.get("in_channels", 4)
        blocks = list(unet_config.get("down_block_types", [])) + list(unet_config.get("up_block_types", []))
        if in_channels != 4:
            reason = (
                f"its UNet takes {in_channels} input channels (an inpainting, depth or upscaling "
                f"model); only text-to-image UNets with 4 latent channels are supported"
            )
        elif blocks and not any("CrossAttn" in b for b in blocks):
            reason = f"its UNet has no cross-attention blocks ({blocks})"
        elif unet_config.get("addition_embed_type") is not None:
            reason = f"its UNet has extra conditioning ({unet_config['addition_embed_type']!r}, SDXL-style)"
    if reason is not None:
        raise UnsupportedModelError(f"{name} is a {cls}, which mag-explore does not support: {reason}. "
                                    f"Supported: {SUPPORTED}.")


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
    """Load a Stable Diffusion 1.x/2.x pipeline, ready to sample on ``device``.

    Args:
        model: a Hugging Face hub id (``"owner/name"``), a local folder saved with
            ``save_pretrained``, or ``"shapes"`` (the embedded model). ``None``: see
            :func:`resolve_model_name` (``$MAG_EXPLORE_MODEL``, else SD1.5 on CUDA and
            ``"shapes"`` elsewhere).
        device: where to run; default :func:`default_device` (cuda, mps, cpu).
        dtype: default fp16 on a GPU, fp32 on the CPU. A ``torch.dtype`` or a name
            such as ``"fp16"``.
        verbose: show diffusers' and transformers' loading bars and warnings (quiet by
            default; the sampler's own progress bar is ``generate(..., progress=)``).

    Returns:
        A ``diffusers.StableDiffusionPipeline`` with the safety checker off.

    Raises:
        UnsupportedModelError: the model has no UNet cross-attention (SDXL, SD3, Flux,
            PixArt, Kandinsky, inpainting, ...). Checked before any weight is loaded.
        FileNotFoundError: no such folder and not a hub id; or ``"shapes"`` before the
            embedded model is built.
        OSError: the hub could not be reached or has no such model.
    """
    device = torch.device(device) if device is not None else default_device()
    dtype = _as_dtype(dtype) if dtype is not None else default_dtype(device)
    name = resolve_model_name(model, device)
    source, index, unet_config = _locate(name)
    check_supported(index, unet_config, name=repr(name))
    if Path(source).is_dir():
        _require_safetensors(Path(source), index)

    with library_output(verbose):  # the import warns, from_pretrained shows loading bars
        from diffusers import StableDiffusionPipeline
        from diffusers.utils import is_accelerate_available

        pipe = StableDiffusionPipeline.from_pretrained(
            source,
            use_safetensors=True,  # never unpickle: a .bin/.ckpt file can run code
            safety_checker=None,  # research on attention: the checker only blacks images out
            feature_extractor=None,  # used only by the safety checker
            requires_safety_checker=False,
            # Low-memory loading needs the optional `accelerate` package; without it
            # diffusers falls back to normal loading anyway, after a long warning.
            low_cpu_mem_usage=is_accelerate_available(),
            **{_dtype_keyword(): dtype},
        )
    return pipe.to(device)


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
        ``mag_alpha`` (0.08), ``mag_lambda`` (0.5): Masked-Attention Guidance step size
        and mask weight, from the official MAG code.
        ``guide_until`` (700): MAG guides while the timestep is above this threshold
        (the early, layout-forming steps).

    A file ``mag_explore.json`` in the pipeline's folder (a local model, or the
    embedded "shapes" model) overrides any of these keys, e.g.
    ``{"num_inference_steps": 20, "guidance_scale": 5.0}``. Hub models have no folder,
    so they get the defaults above.
    """
    sample = pipe.unet.config.sample_size
    h, w = (sample, sample) if isinstance(sample, int) else tuple(sample)
    factor = pipe.vae_scale_factor
    defaults: dict[str, Any] = {"height": h * factor, "width": w * factor, **_GENERATION_DEFAULTS}

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
