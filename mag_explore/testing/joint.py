"""Tiny random-weight Chroma, Qwen-Image, Z-Image and Flux.2 (Klein) pipelines, built offline.

Same idea as :mod:`mag_explore.testing.mmdit`: the block structure of the real models (where
the joint attention sits, text first or image first, which text encoder feeds it and how),
a few thousand random weights, images of noise. Nothing is downloaded: the tokenizers are
built in-process with the ``tokenizers`` library.

=============  =================================  =========================================
family         text keys                          attention (2 heads of 8 everywhere)
=============  =================================  =========================================
Chroma         T5, padded to 512; mask keeps the  Flux.1-shaped: 1 double-, 2 single-stream
               prompt, ``</s>`` and one pad       blocks, [txt, img], rotary (2, 2, 4)
Qwen-Image     Qwen2.5-VL (2 layers, width 32),   2 double-stream blocks, [txt, img],
               template tokens 34.. (no pads)     complex rotary; video VAE (one frame)
Z-Image        Qwen3 (2 layers) hidden[-2] at     1 + 1 refiners, 2 main single-stream
               the real tokens (no pads)          layers [img, pads, cap, pads] (to 32)
Flux.2 Klein   Qwen3 (27 layers, width 16),       1 double-, 2 single-stream (fused q k v
               layers 9/18/27 joined; 512 keys    + MLP) blocks, [txt, img], 4-axis rotary
=============  =================================  =========================================

Images are 32 x 32 (4 x 4 image tokens; Flux.2: latents patchified to 16 x 4 x 4). The Qwen
tokenizers (:func:`tiny_qwen_tokenizer`) are byte-level BPE trained in-process on the template
text and ``TINY_WORDS``, so template words are single tokens as in the real vocabulary (the
34-token Qwen-Image prefix holds), and "purple" splits into " pur" "ple". Z-Image and Flux.2 get
:data:`QWEN3_CHAT_TEMPLATE`, Qwen3's chat template cut down to one user turn and the think block.

Random weights attend almost uniformly, so every query and key projection is scaled up
(:func:`sharpen`) to give maps that tests can see an effect in.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from .mmdit import _finish, _t5_encoder, _vae, tiny_t5_tokenizer

def _sharpen(transformer, gain: float = 4.0, names: tuple[str, ...] = ("attn",)) -> None:
    """Scale every query and key projection of the attention modules named ``names``: maps that are not flat."""
    with torch.no_grad():
        for name, module in transformer.named_modules():
            if name.split(".")[-1] in names:
                for proj in ("to_q", "to_k", "add_q_proj", "add_k_proj"):
                    if getattr(module, proj, None) is not None:
                        getattr(module, proj).weight.mul_(gain)


def _flow_scheduler(**config):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, **config)


def tiny_chroma_pipeline(folder: str | Path | None = None, seed: int = 0):
    """A tiny random-weight ``ChromaPipeline``: Flux.1's blocks, T5 only, no pooled vector, no guidance embedding."""
    from diffusers import ChromaPipeline, ChromaTransformer2DModel

    with torch.random.fork_rng(devices=[]):
        tokenizer = tiny_t5_tokenizer(512)
        torch.manual_seed(seed)
        transformer = ChromaTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(2, 2, 4), approximator_num_channels=16,
            approximator_hidden_dim=32, approximator_layers=1).eval()
        _sharpen(transformer)
        components = dict(
            transformer=transformer, vae=_vae(seed + 1, 0.3611, 0.1159),  # Flux.1's VAE factors (Chroma uses it)
            text_encoder=_t5_encoder(tokenizer, seed + 3), tokenizer=tokenizer,
            # Chroma1-HD's scheduler_config.json: Flux.1-dev's
            scheduler=_flow_scheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                      base_image_seq_len=256, max_image_seq_len=4096))
    return _finish(ChromaPipeline(**components), folder)


# --------------------------------------------------------------------------- Qwen2 / Qwen3 tokenizers
#: The Qwen chat special tokens (Qwen2.5 and Qwen3 share them; <think> is Qwen3's).
QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
QWEN_ADDED = ["<think>", "</think>"]
#: The fixed text around the prompt in the families' templates: every word of it must be one
#: token, as in the real Qwen vocabulary, or the pipelines' fixed offsets (Qwen-Image drops
#: 34 tokens) would land elsewhere.
QWEN_TEMPLATE_TEXT = ("system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
                      "spatial relationships of the objects and background:\nuser\nassistant\n\n\n")
#: Qwen3's chat template, cut down to what the pipelines use: one user turn, the generation
#: prompt, and the empty think block ``enable_thinking=False`` adds (Flux.2 Klein; Z-Image asks
#: for thinking and gets none).
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}{%- endif %}")


def tiny_qwen_tokenizer(chat_template: str | None = None):
    """A byte-level BPE ``Qwen2Tokenizer`` with a tiny vocabulary, trained in-process.

    Merges are learned from the template text and ``TINY_WORDS`` (each with a leading space,
    and capitalised), so those are single tokens; "purple" is not in the corpus but " pur" and
    "ple" are, so it splits in two. Any other text falls back to bytes, as in real byte-level BPE.
    """
    from tokenizers import Tokenizer, models, trainers
    from transformers import Qwen2Tokenizer

    from .unet import TINY_WORDS

    shell = Qwen2Tokenizer(vocab={"<|endoftext|>": 0}, merges=[])  # its pre-tokenizer: Qwen2's regex + byte level
    model = Tokenizer(models.BPE())
    model.normalizer, model.pre_tokenizer = shell._tokenizer.normalizer, shell._tokenizer.pre_tokenizer
    corpus = [QWEN_TEMPLATE_TEXT] + [f" {w} {w.capitalize()} {w}," for w in TINY_WORDS] + [" pur", "ple", "ple."]
    from tokenizers.pre_tokenizers import ByteLevel
    trainer = trainers.BpeTrainer(vocab_size=4000, min_frequency=1, special_tokens=QWEN_SPECIAL,
                                  initial_alphabet=ByteLevel.alphabet(), show_progress=False)
    model.train_from_iterator(corpus * 3, trainer)
    state = json.loads(model.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    tokenizer = Qwen2Tokenizer(vocab=state["vocab"], merges=merges, model_max_length=131072)
    tokenizer.add_special_tokens({"additional_special_tokens": QWEN_SPECIAL[1:]})
    tokenizer.add_tokens(QWEN_ADDED)
    tokenizer.chat_template = chat_template
    return tokenizer


# --------------------------------------------------------------------------- Qwen-Image
def _qwen25_vl_encoder(tokenizer, seed: int):
    """A tiny Qwen2.5-VL (the text model is what the pipeline uses; the vision tower is there, never run)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    unused = len(tokenizer) + 100  # vision token ids outside the vocabulary: no prompt can contain them
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [1, 1, 2]},
                         bos_token_id=None, eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
                         pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32,
                           fullatt_block_indexes=[0]),
        image_token_id=unused, video_token_id=unused + 1, vision_start_token_id=unused + 2,
        vision_end_token_id=unused + 3)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def tiny_qwenimage_pipeline(folder: str | Path | None = None, seed: int = 0):
    """A tiny random-weight ``QwenImagePipeline``: Qwen2.5-VL text states, joint [txt, img] attention."""
    from diffusers import AutoencoderKLQwenImage, QwenImagePipeline, QwenImageTransformer2DModel

    with torch.random.fork_rng(devices=[]):
        tokenizer = tiny_qwen_tokenizer()
        torch.manual_seed(seed)
        transformer = QwenImageTransformer2DModel(
            patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
            joint_attention_dim=32, axes_dims_rope=(2, 2, 4)).eval()
        _sharpen(transformer)
        torch.manual_seed(seed + 1)
        vae = AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=1,
                                     temperal_downsample=[False, True], latents_mean=[0.1, -0.2, 0.3, 0.0],
                                     latents_std=[1.5, 2.0, 1.2, 2.5]).eval()
        components = dict(
            transformer=transformer, vae=vae, text_encoder=_qwen25_vl_encoder(tokenizer, seed + 2),
            tokenizer=tokenizer,
            # Qwen-Image's scheduler_config.json
            scheduler=_flow_scheduler(shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
                                      base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02,
                                      time_shift_type="exponential"))
    return _finish(QwenImagePipeline(**components), folder)


# --------------------------------------------------------------------------- Z-Image
def _qwen3_model(tokenizer, seed: int, layers: int = 2, causal_lm: bool = False, width: int = 32):
    """A tiny Qwen3 language model (Z-Image: ``Qwen3Model``; Flux.2 Klein: ``Qwen3ForCausalLM``)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3Model

    torch.manual_seed(seed)
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width,
                         num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=2048,
                         bos_token_id=None, eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
                         pad_token_id=tokenizer.pad_token_id)
    return (Qwen3ForCausalLM if causal_lm else Qwen3Model)(config).eval()


def tiny_zimage_pipeline(folder: str | Path | None = None, seed: int = 0):
    """A tiny random-weight ``ZImagePipeline``: Qwen3 caption states, one single-stream sequence [img, cap]."""
    from diffusers import ZImagePipeline, ZImageTransformer2DModel

    with torch.random.fork_rng(devices=[]):
        tokenizer = tiny_qwen_tokenizer(QWEN3_CHAT_TEMPLATE)
        torch.manual_seed(seed)
        transformer = ZImageTransformer2DModel(
            all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=16, n_layers=2, n_refiner_layers=1,
            n_heads=2, n_kv_heads=2, cap_feat_dim=32, axes_dims=[2, 2, 4], axes_lens=[512, 64, 64]).eval()
        _sharpen(transformer, names=("attention",))
        components = dict(
            transformer=transformer, vae=_vae(seed + 1, 0.3611, 0.1159),  # Z-Image uses Flux.1's VAE
            text_encoder=_qwen3_model(tokenizer, seed + 2), tokenizer=tokenizer,
            scheduler=_flow_scheduler(shift=3.0, use_dynamic_shifting=False))  # Z-Image's scheduler_config.json
    return _finish(ZImagePipeline(**components), folder)


# --------------------------------------------------------------------------- Flux.2 (Klein)
def tiny_flux2_klein_pipeline(folder: str | Path | None = None, seed: int = 0):
    """A tiny random-weight ``Flux2KleinPipeline``: Qwen3 states of layers 9, 18, 27 joined per token.

    The language model has 27 layers (of width 16) so that the pipeline's default layers exist;
    ``is_distilled=False`` (Klein base): CFG with "" at guidance 4.0.
    """
    from diffusers import AutoencoderKLFlux2, Flux2KleinPipeline, Flux2Transformer2DModel

    with torch.random.fork_rng(devices=[]):
        tokenizer = tiny_qwen_tokenizer(QWEN3_CHAT_TEMPLATE)
        torch.manual_seed(seed)
        transformer = Flux2Transformer2DModel(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=3 * 16, timestep_guidance_channels=16, mlp_ratio=2.0,
            axes_dims_rope=(2, 2, 2, 2), guidance_embeds=False).eval()
        _sharpen_flux2(transformer)
        torch.manual_seed(seed + 1)
        vae = AutoencoderKLFlux2(down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                                 block_out_channels=(8, 8, 16), layers_per_block=1, latent_channels=4,
                                 norm_num_groups=4, sample_size=32, mid_block_add_attention=False).eval()
        with torch.no_grad():  # running statistics that are not 0 / 1, so that using them is visible
            vae.bn.running_mean.uniform_(-0.5, 0.5)
            vae.bn.running_var.uniform_(0.5, 2.0)
        text_encoder = _qwen3_model(tokenizer, seed + 2, layers=27, causal_lm=True, width=16)
        components = dict(transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                          scheduler=_flow_scheduler(shift=3.0, use_dynamic_shifting=True))  # Klein's config
    return _finish(Flux2KleinPipeline(**components, is_distilled=False), folder)


def _sharpen_flux2(transformer, gain: float = 4.0) -> None:
    """Flux.2's single-stream blocks project q, k, v and the MLP in one matrix: scale its q and k rows."""
    _sharpen(transformer)
    with torch.no_grad():
        for block in transformer.single_transformer_blocks:
            inner = block.attn.inner_dim
            block.attn.to_qkv_mlp_proj.weight[: 2 * inner].mul_(gain)
