"""Batches as trees: a batch is ``(inputs, targets)`` where either may be a tensor, a tv_tensor, or a list / tuple /
dict of them (a detection target is a list of dicts of boxes and labels). The engine moves and never inspects them.

Example::

    x, y = to_device((torch.zeros(2, 3, 8, 8), [{"boxes": torch.zeros(0, 4)}]), torch.device("cpu"))
"""
from __future__ import annotations

from typing import Any

import torch


def to_device(tree: Any, device: torch.device, non_blocking: bool = False) -> Any:
    """``tree`` with every tensor moved to ``device`` (tv_tensors keep their type and metadata)."""
    if torch.is_tensor(tree):
        return tree.to(device, non_blocking=non_blocking)
    if isinstance(tree, dict):
        return {k: to_device(v, device, non_blocking) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        moved = [to_device(v, device, non_blocking) for v in tree]
        return type(tree)(moved) if not hasattr(tree, "_fields") else type(tree)(*moved)
    return tree
