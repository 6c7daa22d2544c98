"""PixArt-Σ: a diffusion transformer with self- and cross-attention in every block, as in a UNet.

* **Attention**: each of the transformer's blocks has self-attention (``attn1``) and
  cross-attention to the text (``transformer_blocks.i.attn2``), so hooks see ordinary
  cross-attention maps (batch, heads, image tokens, text keys) on one grid of 2×2 patches
  (place "block"); the self-attention keeps its fused kernel.
* **Text keys**: T5 (no BOS) of the prompt, lower-cased and stripped by the pipeline
  (``_text_preprocessing``; caption cleaning only when bs4 and ftfy are installed, as
  diffusers), padded to ``max_sequence_length`` (300) with an attention mask that goes into
  the cross-attention as a bias of −10000, so padded keys get no probability.
  Key j is T5 token j (:class:`~mag_explore.text.keys.TextKeys`).
* **Sizes**: the requested size is snapped to the nearest aspect-ratio bin of the model's
  resolution (PixArtSigmaPipeline's ``use_resolution_binning``), sampled there, and the
  decoded image is resized and cropped back. At the native size the bin is the size itself.
* **Sampling**: the pipeline's own scheduler (DPM-Solver++ for the released models), CFG
  on [uncond, cond] when guidance_scale > 1, the negative prompt "" by default; the
  transformer predicts noise and a learned variance, of which only the noise is used.

Everything follows diffusers 0.42's PixArtSigmaPipeline, so without controls the pixels are
the same (tested on a tiny random build, :func:`mag_explore.testing.dit.tiny_pixart_pipeline`).
"""
from __future__ import annotations

import torch

from ..text.keys import TextKeys
from .base import Family
from .conditioning import Conditioning

PIXART = "pixart_sigma"
_T5_TOKENIZERS = {("transformers", "T5Tokenizer"), ("transformers", "T5TokenizerFast")}


class BinnedTransformerFamily(Family):
    """What PixArt-Σ and Sana share: resolution bins, a text mask into cross-attention, learned sigma."""

    options = ("max_sequence_length",)
    #: transformer sample_size -> the name of diffusers' aspect-ratio bin table for it
    bins: dict[int, str] = {}

    def check_index(self, present, unet_config=None):
        scheduler = present.get("scheduler")  # any diffusers scheduler: the released models differ
        if scheduler is None or scheduler[0] != "diffusers" or not scheduler[1].endswith("Scheduler"):
            return f"its 'scheduler' is {scheduler}, not a diffusers scheduler"
        return super().check_index({k: v for k, v in present.items() if k != "scheduler"}, unet_config)

    def aspect_ratio_bins(self, pipe) -> dict:
        sample = self.denoiser(pipe).config.sample_size
        if sample not in self.bins:
            raise ValueError(f"this {self.name} transformer has sample_size={sample}; its pipeline bins sizes only "
                             f"for sample_size in {sorted(self.bins)}")
        module, name = self.bins[sample].rsplit(".", 1)
        import importlib
        return getattr(importlib.import_module(module), name)

    def generation_size(self, pipe, height, width):
        return pipe.image_processor.classify_height_width_bin(height, width, ratios=self.aspect_ratio_bins(pipe))

    def finish_decoded(self, pipe, decoded, size):
        height, width = size
        return pipe.image_processor.resize_and_crop_tensor(decoded, width, height)

    def unpredicted_variance(self, pipe, output: torch.Tensor) -> torch.Tensor:
        """The noise (or velocity) half of an output that also predicts a variance ("learned sigma")."""
        config = pipe.transformer.config
        return output.chunk(2, dim=1)[0] if config.out_channels // 2 == config.in_channels else output

    def num_prompt_tokens(self, pipe, prompt, max_sequence_length=None) -> int:
        keys = self.span_tokenizer(pipe, max_sequence_length)
        return len(keys.prompt_tokens(prompt))


class PixArtSigmaFamily(BinnedTransformerFamily):
    name, title, pipeline_class = PIXART, "PixArt-Σ (PixArtSigmaPipeline)", "PixArtSigmaPipeline"
    example = "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS"
    components = {"transformer": {("diffusers", "PixArtTransformer2DModel")}, "vae": {("diffusers", "AutoencoderKL")},
                  "text_encoder": {("transformers", "T5EncoderModel")}, "tokenizer": _T5_TOKENIZERS}
    _module = "diffusers.pipelines.pixart_alpha.pipeline_pixart_"
    bins = {256: _module + "sigma.ASPECT_RATIO_2048_BIN", 128: _module + "alpha.ASPECT_RATIO_1024_BIN",
            64: _module + "alpha.ASPECT_RATIO_512_BIN", 32: _module + "alpha.ASPECT_RATIO_256_BIN"}
    #: PixArtSigmaPipeline's own defaults. MAG's α: the official 0.08 divided by how many more loss terms
    #: PixArt-Σ 1024 has than SD 1.5 at 512² (28 layers × 16 heads × 64² = 1.84 M vs 0.22 M: 8.4x), the
    #: rule SDXL's 0.01 came from; the threshold t > 700 means the same on its 1000-step DDPM scale.
    #: NOT calibrated on real weights.
    defaults = {"guidance_scale": 4.5, "num_inference_steps": 20, "negative_prompt": "",
                "max_sequence_length": 300, "mag_alpha": 0.01}

    def _preprocess(self, pipe, text: str) -> str:
        from diffusers.utils import is_bs4_available, is_ftfy_available
        clean = is_bs4_available() and is_ftfy_available()  # the pipeline's own fallback, without its warning
        return pipe._text_preprocessing(text, clean_caption=clean)[0]

    def encode_prompt(self, pipe, text, batch=1, size=None, *, max_sequence_length=None, guidance_scale=None):
        """T5 states of the preprocessed ``text`` ("" when None, PixArt's negative prompt) and its mask."""
        length = max_sequence_length or self.defaults["max_sequence_length"]
        tokens = pipe.tokenizer(self._preprocess(pipe, text or ""), padding="max_length", max_length=length,
                                truncation=True, add_special_tokens=True, return_tensors="pt")
        encoder = pipe.text_encoder
        mask = tokens.attention_mask.to(encoder.device)
        with torch.no_grad():
            embeddings = encoder(tokens.input_ids.to(encoder.device), attention_mask=mask)[0].to(encoder.dtype)
        return Conditioning(embeddings.repeat(batch, 1, 1), mask=mask.repeat(batch, 1))

    def span_tokenizer(self, pipe, max_sequence_length=None):
        return TextKeys(pipe.tokenizer, max_sequence_length or self.defaults["max_sequence_length"],
                        preprocess=lambda text: self._preprocess(pipe, text))

    def denoise(self, pipe, model_input, timestep, cond):
        """The transformer's noise prediction; its timestep is the scheduler's own (an integer tensor)."""
        t = torch.as_tensor(timestep, device=model_input.device).reshape(-1)[:1].expand(model_input.shape[0])
        output = pipe.transformer(model_input, encoder_hidden_states=cond.embeddings,
                                  encoder_attention_mask=cond.mask, timestep=t,
                                  added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]
        return self.unpredicted_variance(pipe, output)
