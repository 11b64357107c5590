"""Attention maps of vision transformers with a class token (timm and torchvision ``VisionTransformer``).

:func:`attention_maps` collects every layer's attention weights ``[B, heads, N, N]`` in one forward pass:

* timm attention modules compute attention with fused SDPA, which never forms the weights: their ``fused_attn`` is
  switched off for the pass and the softmax output is taken at ``attn_drop`` (the identity in eval mode);
* torchvision's ``EncoderBlock`` calls ``nn.MultiheadAttention`` with ``need_weights=False``: a forward pre-hook asks
  for the per-head weights instead.

Both are undone afterwards (hooks removed, ``fused_attn`` and train/eval mode restored).
:func:`rollout` (Abnar & Zuidema 2020) and :func:`cls_attention` turn them into one map per image on the patch grid.

Example::

    >>> import torch
    >>> from visionkit.models import create_model
    >>> m = create_model("timm:vit_tiny_patch16_224", num_classes=3, img_size=32, patch_size=8, depth=2)
    >>> maps = attention_maps(m, torch.randn(2, 3, 32, 32))
    >>> len(maps), tuple(maps[0].shape), rollout(maps).shape
    (2, (2, 3, 17, 17), (2, 4, 4))
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from ..config import ConfigError
from .cam import METHODS, _frozen, _model_device, prefix_tokens

__all__ = ["attention_maps", "class_token_grid", "cls_attention", "rollout"]

HEAD_FUSIONS = ("mean", "max", "min")


def _not_a_vit(model: nn.Module) -> ConfigError:
    return ConfigError(f"attention maps need a vision transformer with a class token (timm or torchvision ViT, "
                       f"DeiT); {type(model).__name__} is not one: use a grad-cam method instead "
                       f"({', '.join(METHODS)}), which works for it")


def class_token_grid(model: nn.Module, input_size: Sequence[int]) -> tuple[int, tuple[int, int]]:
    """Prefix tokens (class, distillation, register) and the patch grid of a class-token ViT at ``input_size``.

    A model without a class token is a :class:`ConfigError`.

    Example::

        >>> from visionkit.models import create_model
        >>> class_token_grid(create_model("timm:vit_tiny_patch16_224", num_classes=3, img_size=32, patch_size=8),
        ...                  (3, 32, 32))
        (1, (4, 4))
    """
    has_cls = getattr(model, "cls_token", None) is not None or isinstance(getattr(model, "class_token", None),
                                                                         torch.Tensor)
    prefix = prefix_tokens(model)
    if not has_cls or not prefix:
        raise _not_a_vit(model)
    _, H, W = (int(v) for v in input_size)
    patch = _patch_size(model)
    if patch is not None:
        return prefix, (H // patch[0], W // patch[1])
    raise _not_a_vit(model)


def _patch_size(model: nn.Module) -> tuple[int, int] | None:
    pe = getattr(model, "patch_embed", None)  # timm
    size = getattr(pe, "patch_size", None) if pe is not None else getattr(model, "patch_size", None)  # torchvision
    if size is None:
        return None
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


def attention_maps(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Attention weights ``[B, heads, N, N]`` (softmax rows, on the CPU) of every layer, input side first.

    ``x`` is a normalised batch ``[B, C, H, W]``. A model that is not a ViT with a class token is a
    :class:`ConfigError`. See the module docstring for an example.
    """
    if x.ndim == 3:
        x = x[None]
    class_token_grid(model, tuple(x.shape[1:]))
    captured: list[torch.Tensor] = []
    handles, fused = [], []

    def grab_input(mod: nn.Module, args: tuple, out: object) -> None:
        captured.append(args[0].detach().float().cpu())

    def ask_weights(mod: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return args, {**kwargs, "need_weights": True, "average_attn_weights": False}

    def grab_weights(mod: nn.Module, args: tuple, kwargs: dict, out: tuple) -> None:
        captured.append(out[1].detach().float().cpu())

    for m in model.modules():
        if isinstance(m, nn.MultiheadAttention):
            handles.append(m.register_forward_pre_hook(ask_weights, with_kwargs=True))
            handles.append(m.register_forward_hook(grab_weights, with_kwargs=True))
        elif hasattr(m, "fused_attn") and isinstance(getattr(m, "attn_drop", None), nn.Module):
            fused.append((m, m.fused_attn))
            m.fused_attn = False
            handles.append(m.attn_drop.register_forward_hook(grab_input))
    if not handles:
        raise _not_a_vit(model)
    device, dtype = _model_device(model)
    try:
        with _frozen(model), torch.no_grad():
            model(x.to(device=device, dtype=dtype))
    finally:
        for h in handles:
            h.remove()
        for m, flag in fused:
            m.fused_attn = flag
    if not captured or len({tuple(a.shape) for a in captured}) != 1 or captured[0].ndim != 4:
        raise _not_a_vit(model)
    return captured


def _fuse(a: torch.Tensor, head_fusion: str) -> torch.Tensor:
    if head_fusion == "mean":
        return a.mean(1)
    return a.amax(1) if head_fusion == "max" else a.amin(1)


def _to_grid(rows: torch.Tensor, prefix_tokens: int, grid: tuple[int, int] | None) -> np.ndarray:
    """CLS rows ``[B, N]`` -> ``[B, h, w]`` over the patch tokens, each map scaled to a maximum of 1."""
    patches = rows[:, prefix_tokens:]
    n = patches.shape[1]
    if grid is None:
        side = math.isqrt(n)
        grid = (side, side)
    if grid[0] * grid[1] != n:
        raise ConfigError(f"{n} patch tokens do not form the grid {grid}; pass grid=(h, w)")
    maps = patches.reshape(-1, *grid).clamp_min(0)
    peak = maps.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1)
    return (maps / peak).numpy().astype(np.float32)


def rollout(maps: Sequence[torch.Tensor], discard_ratio: float = 0.0, head_fusion: str = "mean",
            prefix_tokens: int = 1, grid: tuple[int, int] | None = None) -> np.ndarray:
    """Attention rollout (Abnar & Zuidema 2020): how much each patch flows into the class token, ``[B, h, w]``.

    Per layer the heads are fused (``mean``, ``max`` or ``min``), the weakest ``discard_ratio`` of the weights
    dropped (never the class token's attention to itself), the identity added for the residual path
    (``(A + I) / 2``) and the rows renormalised; the layers are multiplied through. The class token's row over the
    patch tokens (after ``prefix_tokens``) is reshaped to ``grid`` (None: square) and scaled to a maximum of 1.

    Example::

        >>> a = torch.softmax(torch.randn(2, 3, 17, 17), -1)
        >>> rollout([a, a], discard_ratio=0.5).shape
        (2, 4, 4)
    """
    if not maps:
        raise ConfigError("rollout needs at least one attention map")
    if head_fusion not in HEAD_FUSIONS:
        raise ConfigError(f"unknown head fusion {head_fusion!r}; choose one of {', '.join(HEAD_FUSIONS)}")
    if not 0.0 <= discard_ratio < 1.0:
        raise ConfigError(f"discard_ratio must be in [0, 1), got {discard_ratio}")
    b, _, n, _ = maps[0].shape
    eye = torch.eye(n, dtype=torch.float32)
    result = eye.expand(b, n, n)
    for a in maps:
        a = _fuse(a.float(), head_fusion)
        if discard_ratio > 0:
            flat = a.reshape(b, -1).clone()
            k = int(flat.shape[1] * discard_ratio)
            drop = flat.topk(k, dim=1, largest=False).indices
            keep_cls = drop != 0  # the class token's attention to itself stays
            flat.scatter_(1, drop, torch.where(keep_cls, 0.0, flat.gather(1, drop)))
            a = flat.view(b, n, n)
        a = (a + eye) / 2
        a = a / a.sum(-1, keepdim=True)
        result = a @ result
    return _to_grid(result[:, 0], prefix_tokens, grid)


def cls_attention(maps: Sequence[torch.Tensor], prefix_tokens: int = 1,
                  grid: tuple[int, int] | None = None) -> np.ndarray:
    """The last layer's attention of the class token to the patches, heads averaged: ``[B, h, w]``, max 1.

    Example::

        >>> cls_attention([torch.softmax(torch.randn(2, 3, 17, 17), -1)]).shape
        (2, 4, 4)
    """
    if not maps:
        raise ConfigError("cls_attention needs at least one attention map")
    return _to_grid(maps[-1].float().mean(1)[:, 0], prefix_tokens, grid)
