"""Finding a model and checking it before gigabytes of weights are loaded.

Everything in mag-explore works on the attention where each image position looks at the
prompt's tokens: the cross-attention layers of a UNet or a DiT, or the image→text block of
an MMDiT's joint attention. Only models whose family says where that attention is are
accepted, and that is checked from the small ``model_index.json``:

* supported: Stable Diffusion 1.x and 2.x and SDXL base (UNets with cross-attention, CLIP
  text encoders), PixArt-Σ and Sana (DiTs with cross-attention), Flux.1, Flux.2 Klein,
  SD3/3.5, Chroma, Qwen-Image and Z-Image (joint attention): one file of
  ``mag_explore.families`` each (:func:`supported_models` lists them); from the Hugging Face
  hub or a local folder, and ``"shapes"`` / ``"shapes_flux"``, the small models shipped in
  the package;
* refused with :class:`UnsupportedModelError`: the SDXL refiner (no first text encoder),
  Kandinsky (image-embedding conditioning), DeepFloyd IF, inpainting and upscaling models
  (extra input channels), image-to-image and edit pipelines, ...

Only ``.safetensors`` weights are read: pickle files (``.bin``, ``.ckpt``) can run
arbitrary code when loaded, and no code shipped with a model is ever executed.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from ..data import DATA_ENV, data_dir
from ..families import SDXL_COMPONENTS, family_for_index, registered_families

#: The model used on a CUDA machine when no model is named.
DEFAULT_GPU_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
#: Reserved name of the model shipped in the package (``mag_explore/data/models/shapes``).
SHAPES = "shapes"
#: Reserved name of the embedded MMDiT model (``mag_explore/data/models/shapes_flux``): a tiny FluxPipeline.
SHAPES_FLUX = "shapes_flux"
#: What a pipeline folder such as the shipped "shapes" model consists of (weights: see require_safetensors).
PIPELINE_PARTS = ("model_index.json", "scheduler", "tokenizer", "text_encoder", "unet", "vae")
#: The same for a FluxPipeline folder such as "shapes_flux".
FLUX_PIPELINE_PARTS = ("model_index.json", "scheduler", "tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2",
                       "transformer", "vae")
#: The embedded models, by name: the parts their folder must have, and how to rebuild it.
EMBEDDED = {
    SHAPES: (PIPELINE_PARTS, "python -m mag_explore.shapes.train --out {folder}"),
    SHAPES_FLUX: (FLUX_PIPELINE_PARTS, "python -m mag_explore.shapes.train_mmdit --out {folder}"),
}

SUPPORTED = (
    "Stable Diffusion 1.x/2.x pipelines in diffusers format (StableDiffusionPipeline-style: "
    "unet = UNet2DConditionModel with cross-attention, text_encoder = CLIPTextModel, "
    "tokenizer = CLIPTokenizer, vae = AutoencoderKL; 4 latent input channels), e.g. "
    f"{DEFAULT_GPU_MODEL!r}, 'stabilityai/stable-diffusion-2-1', or {SHAPES!r}; and SDXL base pipelines "
    "(StableDiffusionXLPipeline: also text_encoder_2 = CLIPTextModelWithProjection, tokenizer_2 = "
    "CLIPTokenizer), e.g. 'stabilityai/stable-diffusion-xl-base-1.0'; and Flux.1 (FluxPipeline) and SD3 "
    "(StableDiffusion3Pipeline) pipelines, e.g. 'black-forest-labs/FLUX.1-dev', "
    f"'stabilityai/stable-diffusion-3-medium-diffusers', or the embedded {SHAPES_FLUX!r}"
)

#: Pipeline classes refused by name: they take an input image or mask (inpainting, image-to-image,
#: instruction editing such as Flux Kontext), which the text-to-image sampler has no place for.
_IMAGE_INPUT_WORDS = ("Inpaint", "Img2Img", "Kontext", "Edit", "Fill", "ControlNet", "Redux")


def supported_models() -> str:
    """:data:`SUPPORTED` plus every family registered beyond the four built into it (PixArt-Σ, Sana, yours)."""
    extra = [f for f in registered_families() if f.name not in ("sd", "sdxl", "flux", "sd3")]
    return SUPPORTED + "".join(f"; and {f.title}" + (f", e.g. {f.example!r}" if f.example else "") for f in extra)


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
    """The model is not a Stable Diffusion 1.x/2.x or SDXL pipeline with UNet cross-attention."""


def shapes_model_dir() -> Path:
    """Where the shipped ``"shapes"`` model lives: ``<data>/models/shapes``."""
    return embedded_model_dir(SHAPES)


def embedded_model_dir(name: str) -> Path:
    """Where an embedded model (``"shapes"``, ``"shapes_flux"``) lives: ``<data>/models/<name>``."""
    if name not in EMBEDDED:
        raise ValueError(f"{name!r} is not an embedded model; the embedded models are {sorted(EMBEDDED)}")
    return data_dir() / "models" / name



def _looks_like_path(name: str) -> bool:
    return (
        name.startswith((".", "~", "/"))
        or "\\" in name
        or name.count("/") > 1
        or Path(name).is_absolute()
    )


def locate(name: str) -> tuple[str, dict, dict | None]:
    """Find the model: ``(folder or hub id, model_index.json, unet/config.json or None)``."""
    if name in EMBEDDED:
        folder = embedded_model_dir(name)
        parts, rebuild = EMBEDDED[name]
        missing = [part for part in parts if not (folder / part).exists()]
        if missing:
            raise FileNotFoundError(
                f"The {name!r} model that ships with mag-explore is incomplete: {folder} lacks "
                f"{', '.join(missing)}. Reinstall mag-explore (the wheel carries it), point ${DATA_ENV} at a "
                f"data folder that has models/{name}, rebuild it with `{rebuild.format(folder=folder)}`, or "
                f"load another model instead, e.g. load_pipeline({DEFAULT_GPU_MODEL!r}) on a GPU."
            )
        return _locate_folder(folder)
    path = Path(name).expanduser()
    if path.exists():
        return _locate_folder(path)
    if _looks_like_path(name) or not _HUB_ID.match(name):
        raise FileNotFoundError(
            f"Model {name!r} is neither an existing folder (looked for {path.resolve()}) nor a "
            f"Hugging Face hub id of the form 'owner/name'. Use {supported_models()}."
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
            f"Save one with pipe.save_pretrained(folder); load_pipeline accepts {supported_models()}."
        )
    index = json.loads(index_file.read_text())
    unet_file = folder / "unet" / "config.json"
    unet_config = json.loads(unet_file.read_text()) if unet_file.is_file() else None
    return str(folder), index, unet_config


_PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")


def require_safetensors(folder: Path, index: dict) -> None:
    """Say clearly when a component only has pickle weights (diffusers' error is terse)."""
    for name in ("unet", "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
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


def _transformer_refusal(cls: str, denoiser: str) -> str:
    """Why a transformer pipeline that no registered family names is refused."""
    classes = [f.pipeline_class for f in registered_families() if f.pipeline_class]
    if any(word in cls for word in _IMAGE_INPUT_WORDS):
        return (f"it is an inpainting / image-to-image / editing pipeline (its name has one of "
                f"{list(_IMAGE_INPUT_WORDS)}): only text-to-image pipelines are supported ({classes})")
    return f"its denoiser is {denoiser}; of the transformer pipelines only {classes} are supported"


def check_supported(model_index: dict, unet_config: dict | None = None, name: str = "the model") -> None:
    """Raise :class:`UnsupportedModelError` unless this is an SD 1.x/2.x-style or SDXL base pipeline.

    ``model_index`` is the pipeline's ``model_index.json``; ``unet_config`` its
    ``unet/config.json`` if known (to refuse inpainting/upscaling UNets).
    """
    cls = model_index.get("_class_name", "an unknown pipeline class")
    components = {k: _component(model_index, k) for k in model_index if not k.startswith("_")}
    present = {k: v for k, v in components.items() if v is not None}

    reason = None
    sdxl = "text_encoder_2" in components or "tokenizer_2" in components
    required = {**_REQUIRED_COMPONENTS, **SDXL_COMPONENTS} if sdxl else _REQUIRED_COMPONENTS
    family = family_for_index(model_index)
    if family is not None:  # Flux, SD3, PixArt-Σ, Sana, a user's family: it checks its own components
        reason = family.check_index(present, unet_config)
    elif "transformer" in present and "unet" not in present:
        reason = _transformer_refusal(cls, present["transformer"][1])
    elif "unet" not in present:
        denoiser = present.get("transformer") or present.get("prior") or present.get("decoder")
        what = f"its denoiser is {denoiser[1]}" if denoiser else f"its components are {sorted(present)}"
        reason = f"it has no UNet ({what}), so there is no UNet cross-attention to work on"
    else:
        for comp, accepted in required.items():
            found = present.get(comp)
            if found is None:
                what = "SDXL base" if sdxl else "SD 1.x/2.x"
                reason = f"it has no {comp!r} component ({what} needs {sorted(c for _, c in accepted)})"
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
        elif unet_config.get("addition_embed_type") != ("text_time" if sdxl else None):
            reason = (f"its UNet's extra conditioning is {unet_config.get('addition_embed_type')!r}; "
                      f"{'SDXL needs text_time' if sdxl else 'SD 1.x/2.x has none (text_time is SDXL)'}")
    if reason is not None:
        raise UnsupportedModelError(f"{name} is a {cls}, which mag-explore does not support: {reason}. "
                                    f"Supported: {supported_models()}.")


