"""The attention store: a hook that records cross-attention maps, reduced as it records.

Keeping every map of every head in float32 is what makes naive attention tools run out of
memory on Stable Diffusion at 512². The store reduces each map the moment it arrives: mean
over heads, only the prompt's tokens, only the chosen layer sizes and steps, only the
conditional half of classifier-free guidance, on the CPU in float16. ``store.nbytes`` says
what a run kept; the README gives the measured sizes (``bench/bench_engine.py``).
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch
import torch.nn.functional as F

from .hooks import AttentionContext, AttentionHook


class AttentionStore(AttentionHook):
    """Record cross-attention maps per (step, layer).

    Args:
        tokens: "prompt" (BOS, the prompt's tokens and EOS; the default), "all" (every
            padded position) or a list of token indices.
        heads: "mean" (average over heads, the default) or "all".
        layer_sizes: keep only layers whose side is in this set, e.g. ``{16, 32}``; None = all.
        places: keep only layers in these UNet halves, e.g. ``("mid", "up")``, or these MMDiT blocks
            ("double", "single": Flux; "joint": SD3); None = all.
        steps: keep only these step indices; None = all.
        roles: which CFG halves to keep; ("cond",) by default.
        device, dtype: where and how the maps are kept (CPU, float16 by default).

    Each stored map has shape ``(batch, heads_kept, h, w, tokens_kept)``.
    """

    def __init__(
        self,
        tokens: str | Sequence[int] = "prompt",
        heads: str = "mean",
        layer_sizes: Iterable[int] | None = None,
        steps: Iterable[int] | None = None,
        roles: Sequence[str] = ("cond",),
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float16,
        places: Iterable[str] | None = None,
    ):
        if heads not in ("mean", "all"):
            raise ValueError(f"heads={heads!r}; use 'mean' or 'all'")
        if isinstance(tokens, str) and tokens not in ("prompt", "all"):
            raise ValueError(f"tokens={tokens!r}; use 'prompt', 'all' or a list of token indices")
        self.tokens = tokens if isinstance(tokens, str) else [int(i) for i in tokens]
        self.heads = heads
        self.layer_sizes = None if layer_sizes is None else {int(r) for r in layer_sizes}
        if isinstance(places, str):
            places = [places]
        self.places = None if places is None else set(places)
        # UNet halves; Flux's blocks; SD3's; the blocks of a cross-attention transformer (PixArt-Σ, Sana)
        accepted = {"down", "mid", "up", "double", "single", "joint", "block"}
        if self.places is not None and not self.places <= accepted:
            raise ValueError(f"places={sorted(self.places)}; use some of 'down', 'mid', 'up' (UNet), "
                             f"'double', 'single' (Flux), 'joint' (SD3), 'block' (PixArt-Σ, Sana)")
        self.steps = None if steps is None else {int(s) for s in steps}
        self.roles = tuple(roles)
        self.device, self.dtype = torch.device(device), dtype
        self.maps: dict[tuple[int, str], torch.Tensor] = {}
        self.contexts: dict[tuple[int, str], AttentionContext] = {}
        self.token_indices: list[int] | None = None  # which token index each stored column is
        self.timesteps: dict[int, int | None] = {}

    # -- recording -------------------------------------------------------------------
    def active(self, ctx: AttentionContext) -> bool:
        if ctx.phase != "denoise":
            return False
        if self.steps is not None and ctx.step_index not in self.steps:
            return False
        if self.places is not None and ctx.place not in self.places:
            return False
        return self.layer_sizes is None or max(ctx.height, ctx.width) in self.layer_sizes

    def _columns(self, ctx: AttentionContext, num_tokens: int) -> list[int]:
        if self.tokens == "all" or (self.tokens == "prompt" and ctx.num_prompt_tokens is None):
            return list(range(num_tokens))
        if self.tokens == "prompt":
            return list(range(min(ctx.num_prompt_tokens, num_tokens)))
        bad = [i for i in self.tokens if not 0 <= i < num_tokens]
        if bad:
            raise ValueError(f"token indices {bad} are outside 0..{num_tokens - 1}")
        return list(self.tokens)

    def observe(self, probs: torch.Tensor, ctx: AttentionContext) -> None:
        rows = [i for i, role in enumerate(ctx.batch_roles) if role in self.roles]
        if not rows:
            return
        if self.token_indices is None:
            self.token_indices = self._columns(ctx, probs.shape[-1])
        kept = probs.detach()[rows][..., self.token_indices]  # (b, heads, pixels, tokens)
        if self.heads == "mean":
            kept = kept.mean(dim=1, keepdim=True)
        b, heads, _, tokens = kept.shape
        kept = kept.reshape(b, heads, ctx.height, ctx.width, tokens)
        step = -1 if ctx.step_index is None else ctx.step_index
        self.maps[(step, ctx.layer)] = kept.to(device=self.device, dtype=self.dtype)
        self.contexts[(step, ctx.layer)] = ctx
        self.timesteps[step] = ctx.timestep

    def clear(self) -> None:
        self.maps.clear()
        self.contexts.clear()
        self.timesteps.clear()
        self.token_indices = None

    # -- what is in it -----------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        """Bytes held by the stored maps."""
        return sum(m.numel() * m.element_size() for m in self.maps.values())

    @property
    def step_indices(self) -> list[int]:
        return sorted({s for s, _ in self.maps})

    @property
    def layers(self) -> list[str]:
        """Layer names in the order the UNet ran them."""
        seen: dict[str, None] = {}
        for _, layer in self.maps:
            seen.setdefault(layer, None)
        return list(seen)

    def grid(self, layer: str) -> tuple[int, int]:
        ctx = next(c for (_, name), c in self.contexts.items() if name == layer)
        return ctx.height, ctx.width

    @property
    def grids_seen(self) -> list[tuple[int, int]]:
        return sorted({self.grid(layer) for layer in self.layers}, reverse=True)

    def __repr__(self) -> str:
        return (
            f"AttentionStore({len(self.step_indices)} steps × {len(self.layers)} layers, "
            f"grids {self.grids_seen}, tokens {self.token_indices}, "
            f"heads={self.heads}, {self.nbytes / 1e6:.2f} MB)"
        )

    # -- queries -------------------------------------------------------------------------
    def _column(self, token: int) -> int:
        if self.token_indices is None or token not in self.token_indices:
            raise KeyError(f"token index {token} was not stored; stored token indices: {self.token_indices}")
        return self.token_indices.index(token)

    def get(self, step: int, layer: str) -> torch.Tensor:
        """The stored tensor ``(batch, heads, h, w, tokens)`` of one step and layer."""
        if (step, layer) not in self.maps:
            raise KeyError(f"no map for step {step}, layer {layer!r}; steps {self.step_indices}, layers {self.layers}")
        return self.maps[(step, layer)]

    def map(self, step: int, layer: str, token: int, head: int | None = None, batch: int = 0) -> torch.Tensor:
        """One h×w map (float32): a token at one step and layer, head-mean unless ``head`` is given."""
        maps = self.get(step, layer)[batch, ..., self._column(token)].float()
        return maps.mean(0) if head is None else maps[head]

    def aggregate(
        self,
        tokens: Sequence[int] | None = None,
        steps: Iterable[int] | None = None,
        layer_sizes: Iterable[int] | None = None,
        layers: Iterable[str] | None = None,
        size: tuple[int, int] | None = None,
        normalize: str = "none",
        batch: int = 0,
    ) -> torch.Tensor:
        """Average maps over steps, layers and heads, resampled to one ``size``.

        Returns float32 ``(len(tokens), H, W)``. ``size`` defaults to the finest stored
        resolution. ``normalize``: "none", "max" (each map scaled to a peak of 1) or
        "sum" (each map sums to 1, a distribution over pixels).
        """
        if normalize not in ("none", "max", "sum"):
            raise ValueError(f"normalize={normalize!r}; use 'none', 'max' or 'sum'")
        tokens = list(self.token_indices if tokens is None else tokens)
        columns = [self._column(t) for t in tokens]
        steps = set(self.step_indices if steps is None else steps)
        wanted_sizes = None if layer_sizes is None else {int(r) for r in layer_sizes}
        wanted_layers = None if layers is None else set(layers)
        chosen = [
            key for key in self.maps
            if key[0] in steps
            and (wanted_layers is None or key[1] in wanted_layers)
            and (wanted_sizes is None or max(self.grid(key[1])) in wanted_sizes)
        ]
        if not chosen:
            raise ValueError(
                f"no stored maps match steps={sorted(steps)}, layer_sizes={wanted_sizes}, layers={wanted_layers}; "
                f"stored: steps {self.step_indices}, grids {self.grids_seen}"
            )
        size = size or self.grids_seen[0]
        total = torch.zeros(len(columns), *size, device=self.device)  # where the maps are kept (a GPU store too)
        for key in chosen:
            maps = self.maps[key][batch, ..., columns].float().mean(0)  # (h, w, tokens)
            maps = maps.permute(2, 0, 1)[None]  # (1, tokens, h, w)
            total += F.interpolate(maps, size=size, mode="bilinear", align_corners=False)[0]
        result = total / len(chosen)
        if normalize == "max":
            result = result / result.amax(dim=(1, 2), keepdim=True).clamp_min(1e-12)
        elif normalize == "sum":
            result = result / result.sum(dim=(1, 2), keepdim=True).clamp_min(1e-12)
        return result

    # -- saving ------------------------------------------------------------------------
    def save(self, path) -> None:
        """Write the maps to a ``.safetensors`` file (no pickle), with what they are in its metadata."""
        import json

        from safetensors.torch import save_file

        tensors = {f"{step}|{layer}": maps.contiguous() for (step, layer), maps in self.maps.items()}
        meta = {
            "token_indices": json.dumps(self.token_indices),
            "timesteps": json.dumps({str(k): v for k, v in self.timesteps.items()}),
            "heads": self.heads,
        }
        save_file(tensors, str(path), metadata=meta)

    @classmethod
    def load(cls, path) -> "AttentionStore":
        """Read maps written by ``save`` (queries work; contexts hold the shapes only)."""
        import json

        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
            store = cls(heads=meta["heads"])
            for key in f.keys():
                step, layer = key.split("|", 1)
                maps = f.get_tensor(key)
                store.maps[(int(step), layer)] = maps
                store.contexts[(int(step), layer)] = AttentionContext(
                    layer=layer, place=layer.split("_")[0], height=maps.shape[2], width=maps.shape[3],
                    heads=maps.shape[1], step_index=int(step), timestep=None, batch_roles=("cond",),
                )
        store.token_indices = json.loads(meta["token_indices"])
        store.timesteps = {int(k): v for k, v in json.loads(meta["timesteps"]).items()}
        return store
