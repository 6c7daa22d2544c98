"""What the denoiser is conditioned on: the one record every family fills in."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Conditioning:
    """What the denoiser is conditioned on, for one batch of rows.

    ``embeddings`` (batch, tokens, dim) are what the attention's text keys come from; SDXL adds
    ``pooled`` (batch, dim2) and ``time_ids`` (batch, 6); both are None for SD 1.x/2.x. Flux and
    SD3 have ``pooled`` (CLIP's pooled vector) and no time ids. PixArt-Σ and Sana have ``mask``
    (batch, tokens): 1 for a key the image may attend to, 0 for padding (passed into cross-attention).
    """

    embeddings: torch.Tensor
    pooled: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None
    mask: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.embeddings.shape[0]

    @staticmethod
    def cat(parts: "list[Conditioning]") -> "Conditioning":
        """Rows of several conditionings stacked, e.g. ``cat([uncond, cond])`` for CFG."""
        def stack(name):
            tensors = [getattr(p, name) for p in parts]
            return None if tensors[0] is None else torch.cat(tensors)
        return Conditioning(stack("embeddings"), stack("pooled"), stack("time_ids"), stack("mask"))

    def unet_kwargs(self) -> dict:
        """Keyword arguments of ``UNet2DConditionModel.forward`` besides sample and timestep."""
        kwargs = {"encoder_hidden_states": self.embeddings}
        if self.pooled is not None:
            kwargs["added_cond_kwargs"] = {"text_embeds": self.pooled, "time_ids": self.time_ids}
        return kwargs
