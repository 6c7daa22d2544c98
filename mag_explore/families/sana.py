"""Sana: a linear diffusion transformer with cross-attention to a Gemma-2 language model.

* **Attention**: each block has *linear* self-attention (``attn1``, ReLU kernels: there are
  no softmax probabilities to show, and it keeps its own processor) and ordinary softmax
  cross-attention to the text (``transformer_blocks.i.attn2``, place "block"), on one grid of
  image tokens (patch size 1 over the DC-AE's 32× latent).
* **Text keys**: the prompt (lower-cased and stripped) is appended to a long "complex human
  instruction" (SanaPipeline's default), the LM (Gemma-2) reads ``<bos>`` + instruction +
  prompt, padded on the right to ``instruction tokens + max_sequence_length − 2``; then only
  position 0 (``<bos>``) and the last ``max_sequence_length − 1`` positions are kept. The
  instruction ends in a space that the prompt's first word absorbs, so the prompt starts at
  key 1. The mask of the kept positions goes into the cross-attention (−10000 on padding).
  The negative prompt ("" by default) is encoded *without* the instruction and not cut.
  Positions are found from the tokenizer's character offsets (:class:`~mag_explore.text.keys.TextKeys`),
  so a different instruction or tokenizer moves them correctly.
* **Sizes**: 1024² by default whatever the model (SanaPipeline's own default), snapped to
  the aspect-ratio bins of the model's resolution and resized back, as PixArt-Σ.
* **Sampling**: the pipeline's scheduler (DPM-Solver++ with flow sigmas for the released
  models: t = 1000·σ, so MAG's "t > 700" is σ > 0.7), the timestep times
  ``timestep_scale``, CFG on [uncond, cond] when guidance_scale > 1.

Everything follows diffusers 0.42's SanaPipeline, so without controls the pixels are the same
(tested on a tiny random build, :func:`mag_explore.testing.dit.tiny_sana_pipeline`).
"""
from __future__ import annotations

import inspect

import torch

from ..text.keys import TextKeys
from .conditioning import Conditioning
from .pixart import BinnedTransformerFamily

SANA = "sana"
_BINS = "diffusers.pipelines.sana.pipeline_sana."


def default_instruction() -> list[str]:
    """SanaPipeline's default ``complex_human_instruction`` (the lines it joins with newlines)."""
    from diffusers import SanaPipeline
    return list(inspect.signature(SanaPipeline.__call__).parameters["complex_human_instruction"].default)


class SanaFamily(BinnedTransformerFamily):
    name, title, pipeline_class = SANA, "Sana (SanaPipeline)", "SanaPipeline"
    example = "Efficient-Large-Model/Sana_1600M_1024px_diffusers"
    components = {"transformer": {("diffusers", "SanaTransformer2DModel")}, "vae": {("diffusers", "AutoencoderDC")},
                  "text_encoder": {("transformers", "Gemma2Model")},
                  "tokenizer": {("transformers", "GemmaTokenizer"), ("transformers", "GemmaTokenizerFast")}}
    bins = {128: _BINS + "ASPECT_RATIO_4096_BIN", 64: _BINS + "ASPECT_RATIO_2048_BIN",
            32: _BINS + "ASPECT_RATIO_1024_BIN", 16: _BINS + "ASPECT_RATIO_512_BIN"}
    #: SanaPipeline's own defaults. MAG's α: the official 0.08 divided by how many more loss terms Sana
    #: 1600M at 1024² has than SD 1.5 at 512² (20 layers × 20 cross-attention heads × 32² = 0.41 M vs
    #: 0.22 M: 1.9x), the rule SDXL's 0.01 came from. NOT calibrated on real weights.
    defaults = {"guidance_scale": 4.5, "num_inference_steps": 20, "negative_prompt": "",
                "max_sequence_length": 300, "mag_alpha": 0.04}

    def native_size(self, pipe) -> tuple[int, int]:
        return 1024, 1024  # SanaPipeline's height and width defaults, not the transformer's sample_size

    def _preprocess(self, pipe, text: str) -> str:
        return pipe._text_preprocessing(text, clean_caption=False)[0]  # SanaPipeline: clean_caption=False

    def _layout(self, pipe, max_sequence_length):
        """(instruction text, tokens the LM reads, kept positions) for ``max_sequence_length`` keys."""
        length = max_sequence_length or self.defaults["max_sequence_length"]
        instruction = "\n".join(default_instruction())
        read = len(pipe.tokenizer.encode(instruction)) + length - 2
        return instruction, read, [0] + list(range(-length + 1, 0))

    def _gemma(self, pipe, text: str, max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = pipe.tokenizer([text], padding="max_length", max_length=max_length, truncation=True,
                                add_special_tokens=True, return_tensors="pt", padding_side="right")
        encoder = pipe.text_encoder
        mask = tokens.attention_mask.to(encoder.device)
        with torch.no_grad():
            states = encoder(tokens.input_ids.to(encoder.device), attention_mask=mask)[0].to(encoder.dtype)
        return states, mask

    def encode_prompt(self, pipe, text, batch=1, size=None, *, max_sequence_length=None, guidance_scale=None):
        """The LM's states at ``<bos>`` and the last positions of instruction + prompt, and their mask."""
        instruction, read, keep = self._layout(pipe, max_sequence_length)
        states, mask = self._gemma(pipe, instruction + self._preprocess(pipe, text or ""), read)
        states, mask = states[:, keep], mask[:, keep]
        return Conditioning(states.repeat(batch, 1, 1), mask=mask.repeat(batch, 1))

    def encode_negative_prompt(self, pipe, text, batch=1, size=None, *, max_sequence_length=None,
                               guidance_scale=None):
        """The negative prompt alone (no instruction), padded to ``max_sequence_length``, as SanaPipeline."""
        length = max_sequence_length or self.defaults["max_sequence_length"]
        states, mask = self._gemma(pipe, self._preprocess(pipe, text or ""), length)
        return Conditioning(states.repeat(batch, 1, 1), mask=mask.repeat(batch, 1))

    def span_tokenizer(self, pipe, max_sequence_length=None):
        instruction, read, keep = self._layout(pipe, max_sequence_length)
        return TextKeys(pipe.tokenizer, read, prefix=instruction, keep=keep,
                        preprocess=lambda text: self._preprocess(pipe, text))

    def denoise(self, pipe, model_input, timestep, cond):
        """The transformer's prediction (float32); its timestep is the scheduler's times ``timestep_scale``."""
        transformer = pipe.transformer
        t = torch.as_tensor(timestep, device=model_input.device).reshape(-1)[:1].expand(model_input.shape[0])
        output = transformer(model_input.to(transformer.dtype), encoder_hidden_states=cond.embeddings.to(
            transformer.dtype), encoder_attention_mask=cond.mask, timestep=t * transformer.config.timestep_scale,
            return_dict=False)[0].float()
        return self.unpredicted_variance(pipe, output)
