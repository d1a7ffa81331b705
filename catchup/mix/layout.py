"""Every stage output seen as [B, C, ...positions]: the view a method's feature-mixing function works on.

Methods mix on dim 1 (channels) and treat dims 2.. as positions, whatever the model's layout (a timm
``Format`` name, found per stage by ``catchup.stages.probe_channels``):

- ``NCHW`` maps (CNNs) and ``NCL`` maps pass through unchanged;
- ``NHWC`` maps (Swin, MambaOut, Sequencer) are seen as [B, C, H, W];
- ``NLC`` token maps [B, N, C] (ViT, DeiT, EVA, MLP-Mixer, LeViT) are seen as [B, C, N].

The views share the output's storage; the mixed result goes back to the stage's own layout and memory format,
so the next module receives what it expects (Swin's window partition needs a contiguous NHWC map).

Prefix tokens (ViT's class token, DeiT's distillation token, register tokens) stay on the token axis: every
method treats them as positions like the patch tokens. Catch-up Mix therefore swaps a channel on all tokens
with one mask, so each filter's output, class token included, comes wholly from one sample and the label
weight floor(lam * C) / C holds for the token the head reads; and a filter's influence is its norm over all
tokens, because the prefix tokens are part of that filter's output which the next block and the head read
(leaving them out would rank filters by part of their output). The rule needs no per-stage token count, which
timm does not give: ``num_prefix_tokens`` counts the class token of CaiT, whose patch blocks run before it is
added. MoEx exchanges every token's channel moments, the prefix tokens' included, with the partner's same
token; Manifold Mixup interpolates them; AlignMixup transports them with the patch tokens.
"""
from __future__ import annotations

import torch


def channels_first(h: torch.Tensor, layout: str) -> torch.Tensor:
    """A [B, C, ...positions] view of a stage output in ``layout`` (no copy)."""
    if layout == "NHWC":
        return h.permute(0, 3, 1, 2)
    if layout == "NLC":
        return h.transpose(1, 2)
    return h


def restore_layout(mixed: torch.Tensor, layout: str, like: torch.Tensor) -> torch.Tensor:
    """The mixed [B, C, ...positions] map back in ``layout``, in the memory format of ``like`` (the stage output)."""
    if layout == "NHWC":
        out = mixed.permute(0, 2, 3, 1)
    elif layout == "NLC":
        out = mixed.transpose(1, 2)
    else:
        out = mixed
    formats = (torch.contiguous_format, torch.channels_last) if like.dim() == 4 else (torch.contiguous_format,)
    for memory_format in formats:
        if like.is_contiguous(memory_format=memory_format):
            return out.contiguous(memory_format=memory_format)
    return out
