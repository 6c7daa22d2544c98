"""The family interface: the few questions every model family answers, and the registry of families.

A *family* (SD 1.x/2.x, SDXL, Flux.1, SD3, PixArt-Σ, Sana, or your own) is one object, a
subclass of :class:`Family`, that says

* how to recognise its pipelines (``matches(pipe)``) and its ``model_index.json``
  (``pipeline_class``, ``components``: checked before any weight is loaded);
* how to encode a prompt (``encode_prompt`` -> :class:`Conditioning`), and where each word's
  tokens sit among the keys the image attends to (``span_tokenizer``: templates, dropped
  prefixes, padding and the [txt; img] order are all hidden behind it);
* how to call the denoiser once (``denoise``), how to combine the CFG halves (``predict``),
  its scheduler (``make_scheduler``), its latent shape and sizes;
* its attention modules (``install_attention_hooks``, ``attention_grids``, ``attention_places``),
  each seen by hooks as (batch, heads, image tokens, text tokens).

Nothing outside ``families/`` asks which family a pipeline is: the sampler, the methods and the
store ask :func:`family_of(pipe) <family_of>` and call its methods. A new family is one file
with one subclass, added with :func:`register_family` (docs/howto_add_a_family.md).
"""
from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

import torch

from .conditioning import Conditioning

#: Names of the options a family may accept beside the common ones (see ``Family.options``).
FAMILY_OPTIONS = ("max_sequence_length", "true_cfg_scale")


class Family:
    """One model family. Override what differs; the defaults fit a denoiser that is ``pipe.transformer``
    with cross-attention layers named ``...attn2`` (PixArt-style) and a CFG batch [uncond, cond]."""

    #: short key, used in settings and messages: "sd", "sdxl", "flux", "sd3", "pixart_sigma", "sana"
    name: str = ""
    #: for people: "PixArt-Σ (PixArtSigmaPipeline)"
    title: str = ""
    #: the diffusers pipeline class its model_index.json names and load_pipeline builds
    pipeline_class: str | None = None
    #: components its model_index.json must have: name -> accepted (library, class) pairs
    components: dict[str, set[tuple[str, str]]] = {}
    #: components that may be left out (None in model_index.json): name -> accepted pairs when present
    optional_components: dict[str, set[tuple[str, str]]] = {}
    #: a model people load, for help texts
    example: str = ""
    #: generation defaults over models._GENERATION_DEFAULTS (steps, CFG, negative prompt, MAG α, ...)
    defaults: dict[str, Any] = {}
    #: Sampler options this family accepts beyond the common ones (names from FAMILY_OPTIONS)
    options: tuple[str, ...] = ()
    #: True: hooks see the image→text block of joint attention; False: cross-attention layers
    joint_attention: bool = False
    #: True for UNet families (the methods defined on UNet places down/mid/up: paint-with-words, layout guidance)
    unet: bool = False

    # ------------------------------------------------------------------ recognising
    def matches(self, pipe) -> bool:
        """Whether ``pipe`` (a loaded pipeline) belongs to this family."""
        return self.pipeline_class is not None and type(pipe).__name__ == self.pipeline_class

    def matches_index(self, index: dict) -> bool:
        """Whether a ``model_index.json`` names this family's pipeline class."""
        return self.pipeline_class is not None and index.get("_class_name") == self.pipeline_class

    def check_index(self, present: dict[str, tuple[str, str]], unet_config: dict | None = None) -> str | None:
        """Why a model index of this family is refused (None: accepted); ``present``: component -> (library, class)."""
        for name, accepted in {**self.components, **self.optional_components}.items():
            found = present.get(name)
            if found is None and name in self.optional_components:
                continue
            if found not in accepted:
                what = "none" if found is None else f"{found[1]} from {found[0]!r}"
                return f"its {name!r} is {what}, not {' or '.join(sorted(c for _, c in accepted))}"
        return None

    def load_options(self, index: dict) -> dict:
        """Extra keyword arguments of ``from_pretrained`` (e.g. ``text_encoder_3=None``)."""
        return {}

    # ------------------------------------------------------------------ text
    def encode_prompt(self, pipe, text: str | None, batch: int = 1, size: tuple[int, int] | None = None, *,
                      max_sequence_length: int | None = None, guidance_scale: float | None = None
                      ) -> Conditioning | None:
        """``text`` -> what the denoiser is conditioned on, ``batch`` identical rows (None: no negative prompt)."""
        raise NotImplementedError(f"family {self.name!r} does not say how to encode a prompt")

    def encode_negative_prompt(self, pipe, text: str | None, batch: int = 1, size: tuple[int, int] | None = None, *,
                               max_sequence_length: int | None = None, guidance_scale: float | None = None
                               ) -> Conditioning | None:
        """The negative prompt's conditioning: ``encode_prompt`` unless the family encodes it apart (Sana:
        without the instruction its prompts get)."""
        return self.encode_prompt(pipe, text, batch, size, max_sequence_length=max_sequence_length,
                                  guidance_scale=guidance_scale)

    def span_tokenizer(self, pipe, max_sequence_length: int | None = None):
        """What ``mag_explore.text.tokens`` takes to turn words into indices of the attention's text keys."""
        raise NotImplementedError(f"family {self.name!r} does not say where a word's tokens are")

    def num_prompt_tokens(self, pipe, prompt: str, max_sequence_length: int | None = None) -> int:
        """How many leading text keys the prompt fills (``AttentionContext.num_prompt_tokens``)."""
        raise NotImplementedError(f"family {self.name!r} does not count the prompt's tokens")

    def check_prompt(self, pipe, prompt: str) -> None:
        """Refuse a prompt whose word positions would be ambiguous (SDXL/SD3: two CLIPs)."""

    # ------------------------------------------------------------------ denoiser, schedule, latents
    def denoiser(self, pipe) -> torch.nn.Module:
        return pipe.transformer

    def denoise(self, pipe, model_input: torch.Tensor, timestep, cond: Conditioning) -> torch.Tensor:
        """One call of the denoiser: its prediction for ``model_input``, one row per row of ``cond``."""
        raise NotImplementedError(f"family {self.name!r} does not say how to call its denoiser")

    def predict(self, pipe, scheduler, latents, t, cond: Conditioning, uncond: Conditioning | None,
                guidance_scale: float, true_cfg_scale: float = 1.0, attention=None) -> torch.Tensor:
        """The guided prediction (float32) for x_t: one batch [uncond, cond] and CFG, or cond alone
        when ``guidance_scale`` <= 1 (diffusers' ``do_classifier_free_guidance``)."""
        x = model_input(scheduler, latents, t).to(self.denoiser(pipe).dtype)
        with torch.no_grad():
            if guidance_scale <= 1 or uncond is None:
                return self.denoise(pipe, x, t, cond).float()
            prediction = self.denoise(pipe, torch.cat([x, x]), t, Conditioning.cat([uncond, cond]))
        negative, positive = prediction.float().chunk(2)
        return negative + guidance_scale * (positive - negative)

    def make_scheduler(self, pipe, num_inference_steps: int, latent_hw: tuple[int, int], device=None,
                       scheduler=None):
        """A fresh copy of the pipeline's own scheduler (or ``scheduler``), set to ``num_inference_steps``."""
        if scheduler is None:
            scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
        scheduler.set_timesteps(num_inference_steps, device=device)
        return scheduler

    def latent_shape(self, pipe, num_images: int, height: int, width: int) -> tuple[int, int, int, int]:
        factor = pipe.vae_scale_factor
        return (num_images, self.denoiser(pipe).config.in_channels, height // factor, width // factor)

    def size_multiple(self, pipe) -> int:
        """Image sides must be multiples of this."""
        return pipe.vae_scale_factor * getattr(self.denoiser(pipe).config, "patch_size", 1)

    def native_size(self, pipe) -> tuple[int, int]:
        """The model's default (height, width) in pixels."""
        sample = self.denoiser(pipe).config.sample_size
        h, w = (sample, sample) if isinstance(sample, int) else tuple(sample)
        return h * pipe.vae_scale_factor, w * pipe.vae_scale_factor

    def generation_size(self, pipe, height: int, width: int) -> tuple[int, int]:
        """The size the model really samples at for a requested size (PixArt/Sana: a resolution bin)."""
        return height, width

    def decode(self, pipe, latents: torch.Tensor) -> torch.Tensor:
        """x_0 latents -> the VAE's image in [-1, 1] (Qwen-Image: a video VAE, one frame)."""
        from .unet import unscale_latents, vae_in_working_dtype
        with torch.no_grad(), vae_in_working_dtype(pipe) as dtype:  # SDXL's fp16 VAE decodes in fp32
            return pipe.vae.decode(unscale_latents(pipe.vae, latents.to(dtype)), return_dict=False)[0]

    def finish_decoded(self, pipe, decoded: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """The VAE's output in [-1, 1] brought to the requested ``size`` (PixArt/Sana: resized back)."""
        return decoded

    def run_settings(self, sampler) -> dict:
        """Settings a run of this family records beside the common ones."""
        settings = {}
        if "max_sequence_length" in self.options:
            settings.update(max_sequence_length=sampler.max_sequence_length, family=self.name)
        if "true_cfg_scale" in self.options:
            settings["true_cfg_scale"] = sampler.true_cfg_scale
        return settings

    # ------------------------------------------------------------------ attention
    def attention_layer_names(self, pipe) -> list[str]:
        """The hooked attention layers, in the order they run."""
        from ..attention import cross_attention_layer_names
        return cross_attention_layer_names(self.denoiser(pipe))

    def install_attention_hooks(self, pipe, hooks) -> AbstractContextManager:
        """A ``with`` block that runs ``hooks`` in every hooked layer and restores the processors after."""
        from ..attention import cross_attention_hooks
        return cross_attention_hooks(self.denoiser(pipe), hooks)

    def attention_grids(self, pipe, latent_hw: tuple[int, int]) -> dict[str, tuple[int, int]]:
        """Each hooked layer's h×w grid of image tokens, without running the model (one patch grid here)."""
        patch = getattr(self.denoiser(pipe).config, "patch_size", 1)
        grid = (latent_hw[0] // patch, latent_hw[1] // patch)
        return {name: grid for name in self.attention_layer_names(pipe)}

    def attention_places(self, pipe) -> dict[str, str]:
        """Each hooked layer's place ("down"/"mid"/"up" in a UNet; "block" in a plain transformer)."""
        return {name: "block" for name in self.attention_layer_names(pipe)}

    def __repr__(self) -> str:
        return f"<family {self.name!r}: {self.title or type(self).__name__}>"


def model_input(scheduler, latents: torch.Tensor, timestep) -> torch.Tensor:
    """x_t as the denoiser takes it: DDIM-style schedulers scale it, flow matching does not."""
    scale = getattr(scheduler, "scale_model_input", None)
    return scale(latents, timestep) if scale is not None else latents


# ---------------------------------------------------------------------- the registry
_REGISTRY: list[Family] = []  # in registration order; the newest that matches wins


def register_family(family: Family, *, replace: bool = False) -> Family:
    """Add ``family`` (an instance of a :class:`Family` subclass) to the families mag-explore knows.

    Families registered later are asked first, so a user's family can take over pipelines
    that a built-in one would also match. ``replace=True`` swaps out a family of the same name.
    """
    if not isinstance(family, Family):
        raise TypeError(f"register_family({family!r}): give an instance of a mag_explore.families.Family subclass")
    if not isinstance(family.name, str) or not family.name.isidentifier():
        raise ValueError(f"family name {family.name!r}: give a short identifier such as 'pixart_sigma'")
    known = [f for f in _REGISTRY if f.name == family.name]
    if known and not replace:
        raise ValueError(f"a family named {family.name!r} is already registered ({known[0]!r}); pass replace=True "
                         f"to swap it out. Registered: {family_names()}")
    for old in known:
        _REGISTRY.remove(old)
    _REGISTRY.append(family)
    return family


def unregister_family(name: str) -> Family:
    """Remove the family called ``name`` (returns it)."""
    family = family_named(name)
    _REGISTRY.remove(family)
    return family


def registered_families() -> tuple[Family, ...]:
    """Every registered family, in registration order."""
    return tuple(_REGISTRY)


def family_names() -> list[str]:
    return [f.name for f in _REGISTRY]


def family_named(name: str) -> Family:
    for family in _REGISTRY:
        if family.name == name:
            return family
    raise ValueError(f"no family named {name!r}; the registered families are {family_names()}")


def family_of(pipe) -> Family:
    """The family of a loaded pipeline (the most recently registered one that matches)."""
    for family in reversed(_REGISTRY):
        if family.matches(pipe):
            return family
    raise ValueError(f"{type(pipe).__name__} belongs to none of the registered families {family_names()}; "
                     f"supported: {supported_families()}")


def family_for_index(index: dict) -> Family | None:
    """The family whose pipeline class a ``model_index.json`` names, if any."""
    return next((f for f in reversed(_REGISTRY) if f.matches_index(index)), None)


def supported_families() -> str:
    """One line per family for help texts and errors: its title and an example model."""
    return "; ".join(f"{f.title or f.name}" + (f", e.g. {f.example!r}" if f.example else "") for f in _REGISTRY)
