"""Checks shared by the PixArt-Σ and Sana tests: references written out by hand, not taken from the package."""
from __future__ import annotations

import torch

from mag_explore import families
from mag_explore.attention import AttentionHook
from mag_explore.methods.guidance import guidance_pass
from mag_explore.sampling import Sampler, StepState


class Recorder(AttentionHook):
    """Keeps what each layer's probabilities were before any edit, and what the layer used."""

    def __init__(self, phases=("denoise",)):
        self.before, self.seen, self.phases = [], [], phases

    def active(self, ctx):
        return ctx.phase in self.phases

    def edit_probs(self, probs, ctx):
        self.before.append(probs.detach().clone())

    def observe(self, probs, ctx):
        self.seen.append((probs.detach().clone(), ctx))


def reference_cross_attention(attn, hidden_states, text, text_mask):
    """softmax(QKᵀ/√d) over the text keys, padded keys (mask 0) left out, from the layer's inputs."""
    assert attn.norm_q is None and attn.norm_k is None  # the tiny builds have no q/k norm in cross-attention
    heads = attn.heads
    q, k = attn.to_q(hidden_states), attn.to_k(text)
    q = q.view(q.shape[0], q.shape[1], heads, -1).transpose(1, 2)
    k = k.view(k.shape[0], k.shape[1], heads, -1).transpose(1, 2)
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    scores = scores.masked_fill(text_mask[:, None, None, :] == 0, float("-inf"))
    return torch.softmax(scores, dim=-1)


def captured_and_reference(pipe, layer: str, prompt: str, latents, timestep):
    """One denoiser call on [uncond, cond] with a recorder: (probs the hook saw, context, reference)."""
    module = pipe.transformer.get_submodule(layer)
    inputs = {}
    handle = module.register_forward_pre_hook(
        lambda m, args, kwargs: inputs.update(hidden=args[0] if args else kwargs["hidden_states"],
                                              text=kwargs["encoder_hidden_states"]), with_kwargs=True)
    cond = families.Conditioning.cat([families.encode_negative_prompt(pipe, "", 1), families.encode_prompt(pipe, prompt, 1)])
    recorder = Recorder()
    try:
        with families.install_attention_hooks(pipe, [recorder]), torch.no_grad():
            families.denoise(pipe, latents, timestep, cond)
    finally:
        handle.remove()
    index = families.family_of(pipe).attention_layer_names(pipe).index(layer)
    probs, ctx = recorder.seen[index]
    with torch.no_grad():
        reference = reference_cross_attention(module, inputs["hidden"], inputs["text"], cond.mask)
    return probs, ctx, reference, cond


def mag_gradient_and_finite_differences(pipe, prompt: str, mag, cells: int = 3, eps: float = 1e-2, **options):
    """MAG's gradient at the first step, and central differences of its loss at the ``cells`` largest entries."""
    sampler = Sampler(pipe, prompt, seed=0, controls=[mag], **options)
    t = sampler.scheduler.timesteps[0]
    with families.install_attention_hooks(pipe, sampler.hooks) as attention:
        attention.set_step(0, t)
        attention.num_prompt_tokens = sampler.num_prompt_tokens
        state = StepState(pipe, sampler.scheduler, 0, t, sampler.latents, sampler.cond, sampler.uncond, attention,
                          sampler.timesteps)

        def loss_at(x):
            return float(guidance_pass(state, x, mag.hook)[0])

        _, grad = guidance_pass(state, sampler.latents, mag.hook)
        picked = grad.flatten().abs().topk(cells).indices
        differences = []
        for index in picked:
            step = torch.zeros_like(sampler.latents).flatten()
            step[index] = eps
            step = step.view_as(sampler.latents)
            differences.append((loss_at(sampler.latents + step) - loss_at(sampler.latents - step)) / (2 * eps))
    return grad.flatten()[picked], torch.tensor(differences)


def store_megabytes(layers: int, steps: int, pixels: int, tokens: int, bytes_per_value: int = 2) -> float:
    """An AttentionStore's size with its defaults (cond half, heads averaged, fp16, the prompt's keys)."""
    return layers * steps * pixels * tokens * bytes_per_value / 1e6
