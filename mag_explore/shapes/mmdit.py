"""The embedded MMDiT model's parts (a tiny Flux.1-shaped pipeline), and how it is saved and read back.

Flux.1's layout, shrunk: a ``FluxTransformer2DModel`` of double-stream blocks (text and image
tokens keep their own weights and meet in one joint softmax) followed by single-stream blocks
(one sequence, text first), a ``CLIPTextModel`` whose pooled vector joins the timestep
embedding, a ``T5EncoderModel`` whose token states are the text half of the joint sequence,
and a ``FlowMatchEulerDiscreteScheduler``. The VAE is the shapes model's own (64×64 ↔
4×16×16); Flux packs its latents in 2×2 patches, so the transformer sees 8×8 = 64 image
tokens of 16 channels.

No guidance embedding: Flux.1-dev's is distilled from a CFG teacher, which a model trained
from scratch does not have. Classifier-free guidance is FluxPipeline's "true CFG" instead:
``negative_prompt=""`` with ``true_cfg_scale > 1`` (the captions were dropped to "" in
training for this).
"""
from __future__ import annotations

import json
import shutil
import string
from pathlib import Path

import torch

from ..data import data_path
from .architecture import drop_source_paths
from .world import WORDS

SHAPES_MODEL = data_path("models", "shapes")
# T5 prompt length; pass it to FluxPipeline (its default is 512). The longest world caption is 12
# tokens with EOS; 16 leaves padding (which Flux does not mask) and costs 22 % less per training
# step on the CPU than 32.
MAX_SEQUENCE_LENGTH = 16
CLIP_LENGTH = 77
HEADS, HEAD_DIM = 4, 32  # inner width 128
ROPE_AXES = (8, 12, 12)  # Flux's (index, row, column) rotary axes; they sum to HEAD_DIM
TEXT_WIDTH = 64  # d_model of T5 and hidden size of CLIP

# Pieces beyond the world's words, so that T5 token spans are non-trivial: plurals and
# suffixes split off ("circles" -> "▁circle" "s", "reddish" -> "▁red" "d" "ish"), a few
# layout words a teacher may type, and single characters so that any word tokenizes.
SUBWORD_PIECES = ["s", "es", "ish", "er", "est", "ly", "d", "angle", "▁tri", "▁rect", "▁the", "▁of",
                  "▁on", "▁in", "▁left", "▁right", "▁top", "▁bottom", "▁big", "▁small",
                  "▁dark", "▁light", "▁with", "▁next", "▁to"]
FALLBACK_CHARS = string.ascii_lowercase + string.ascii_uppercase + string.digits + ".,!?'-&:;()"


# ---------------------------------------------------------------------------- tokenizers
def t5_vocab() -> list[tuple[str, float]]:
    """(piece, log-probability) of the tiny Unigram vocabulary, T5's special ids first.

    A world word is one ``▁word`` piece and scores far above any split of it, so every
    training caption tokenizes word by word; subword pieces score above single
    characters, so an unknown word splits into the longest known pieces, as in T5.
    """
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -4.0)]
    seen = {p for p, _ in vocab}

    def add(piece: str, score: float) -> None:
        if piece not in seen:
            seen.add(piece)
            vocab.append((piece, score))

    for word in WORDS:  # "," attaches to the word before it, as T5 writes "circle," -> "▁circle" ","
        add(word if word == "," else "▁" + word, -2.0)
    for piece in SUBWORD_PIECES:
        add(piece, -5.0)
    for char in FALLBACK_CHARS:
        add(char, -10.0)
    return vocab


def build_t5_tokenizer(folder: Path | None = None, max_length: int = MAX_SEQUENCE_LENGTH):
    """A T5-style sentencepiece (Unigram) tokenizer over the world's words, built offline.

    T5's conventions: ``▁`` marks a word start (Metaspace), ``</s>`` (id 1) ends every
    prompt, ``<pad>`` (id 0) pads it, ``<unk>`` is id 2; no BOS. Saved to ``folder`` if given.
    """
    import tokenizers
    from tokenizers import decoders, models, normalizers, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    tk = tokenizers.Tokenizer(models.Unigram(t5_vocab(), unk_id=2, byte_fallback=False))
    tk.normalizer = normalizers.Replace(tokenizers.Regex(" {2,}"), " ")
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tk.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tk.post_processor = processors.TemplateProcessing(
        single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"], special_tokens=[("</s>", 1)])
    tokenizer = T5TokenizerFast(tokenizer_object=tk, eos_token="</s>", unk_token="<unk>",
                                pad_token="<pad>", extra_ids=0, model_max_length=max_length)
    if folder is not None:
        tokenizer.save_pretrained(folder)
    return tokenizer


def clip_tokenizer():
    """The shapes model's CLIP tokenizer (77 tokens, BOS/EOS); only its pooled vector is used here."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(SHAPES_MODEL / "tokenizer")


# ---------------------------------------------------------------------------- models
def make_clip(tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TEXT_WIDTH, intermediate_size=4 * TEXT_WIDTH,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=CLIP_LENGTH,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))


def make_t5(tokenizer):
    from transformers import T5Config, T5EncoderModel

    # T5 v1.1's gated-GELU feed-forward, as Flux's T5-XXL; bidirectional, so the padding
    # tokens (which Flux does not mask) see the whole prompt.
    return T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=TEXT_WIDTH, d_kv=16, d_ff=4 * TEXT_WIDTH, num_layers=2,
        num_heads=4, relative_attention_num_buckets=16, relative_attention_max_distance=64,
        feed_forward_proj="gated-gelu", dropout_rate=0.0, pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0, tie_word_embeddings=False, use_cache=False))


def make_transformer(num_layers: int = 2, num_single_layers: int = 4):
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=num_layers, num_single_layers=num_single_layers,
        attention_head_dim=HEAD_DIM, num_attention_heads=HEADS, joint_attention_dim=TEXT_WIDTH,
        pooled_projection_dim=TEXT_WIDTH, guidance_embeds=False, axes_dims_rope=ROPE_AXES)
    zero_init_modulation(model)
    return model


def zero_init_modulation(model) -> None:
    """DiT's adaLN-Zero: every block starts as the identity and the output as zero.

    diffusers initialises the modulation layers like any Linear; from scratch on a small
    budget the zero start trains faster and steadier (Peebles & Xie 2023).
    """
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith(("norm1.linear", "norm1_context.linear", "norm.linear")) or name == "proj_out":
                module.weight.zero_()
                module.bias.zero_()


def load_vae():
    """The shapes model's VAE, with Flux's ``shift_factor`` (0: its latents are centred already)."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(SHAPES_MODEL / "vae", use_safetensors=True)
    vae.register_to_config(shift_factor=0.0)
    return vae.eval()


def make_scheduler():
    """Flux.1-dev's flow-matching scheduler: dynamic (resolution-dependent) shifting on.

    FluxPipeline passes mu = calculate_shift(64 image tokens) ≈ 0.47, i.e. sigmas shifted by
    exp(mu) ≈ 1.6 towards the noisy end; training samples sigma with the same shift.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
        max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)


def image_mu(image_tokens: int = 64) -> float:
    """FluxPipeline's mu for a sequence of ``image_tokens`` (its own ``calculate_shift``)."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    c = make_scheduler().config
    return calculate_shift(image_tokens, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------- export
def export(out: Path, vae, transformer, clip, t5, t5_tokenizer, meta: dict, measured: dict | None = None) -> None:
    """Write a FluxPipeline folder (safetensors) and its ``mag_explore.json``."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline(scheduler=make_scheduler(), vae=vae.cpu(), text_encoder=clip.cpu(),
                        tokenizer=clip_tokenizer(), text_encoder_2=t5.cpu(), tokenizer_2=t5_tokenizer,
                        transformer=transformer.cpu())
    pipe.save_pretrained(out, safe_serialization=True)
    copy_clip_tokenizer(out / "tokenizer")  # the shapes files as they are, without save_pretrained's extras
    drop_source_paths(out)  # no machine-specific source paths in the shipped configs
    defaults_path = out / "mag_explore.json"
    old = json.loads(defaults_path.read_text()) if defaults_path.exists() else {}
    defaults = {
        "height": 64, "width": 64, "num_inference_steps": 28,
        # CFG is FluxPipeline's true CFG: negative_prompt "" and true_cfg_scale = guidance_scale
        # (the transformer has no guidance embedding, so guidance_scale alone does nothing).
        "guidance_scale": 3.0, "true_cfg_scale": 3.0, "negative_prompt": "",
        "max_sequence_length": MAX_SEQUENCE_LENGTH,
        # MAG: the paper's step and alpha 0.3, masks resized by area (the share of each 8×8 token a
        # region covers), our balanced loss at lambda 1; chosen on the suite (README, "The
        # embedded MMDiT model").
        "mag_step_rule": "official", "mag_alpha": 0.3, "mag_mask_mode": "area", "mag_loss": "balanced",
        "mag_lmbda": 1.0,
        "description": "Tiny Flux.1-shaped pipeline (MMDiT: double- and single-stream joint attention, "
                       "CLIP pooled + T5 tokens, flow matching) trained on the shapes world: 64×64 scenes of "
                       "1–3 red/green/blue/yellow/purple circles, squares and triangles. Call FluxPipeline "
                       f"with height=width=64, max_sequence_length={MAX_SEQUENCE_LENGTH}, negative_prompt='' "
                       "and true_cfg_scale=guidance_scale.",
        **{k: v for k, v in old.items() if k not in ("training", "measured")},
        "training": meta,
    }
    if measured or "measured" in old:
        defaults["measured"] = measured or old["measured"]
    defaults_path.write_text(json.dumps(defaults, indent=2, ensure_ascii=False) + "\n")


def copy_clip_tokenizer(folder: Path) -> None:
    """The shapes model's CLIP tokenizer files, unchanged."""
    shutil.copytree(SHAPES_MODEL / "tokenizer", folder, dirs_exist_ok=True)


def load_exported(folder: Path):
    """Transformer, CLIP, T5 and T5 tokenizer of a model this module exported (safetensors)."""
    from diffusers import FluxTransformer2DModel
    from transformers import CLIPTextModel, T5EncoderModel, T5TokenizerFast

    return (FluxTransformer2DModel.from_pretrained(folder / "transformer", use_safetensors=True),
            CLIPTextModel.from_pretrained(folder / "text_encoder", use_safetensors=True),
            T5EncoderModel.from_pretrained(folder / "text_encoder_2", use_safetensors=True),
            T5TokenizerFast.from_pretrained(folder / "tokenizer_2"))
