"""Classification models: every name of the registry (own, ``tv:``, ``timm:``) with a classifier head; see
``visionkit.models``. Here: rebuilding a trained one from its checkpoint.

Example::

    net = model_from_checkpoint(load_checkpoint("runs/x/best.pt"), torch.device("cpu"))
"""
from __future__ import annotations

import torch

from ...models import create_model


def model_from_checkpoint(ckpt: dict, device: torch.device) -> torch.nn.Module:
    cfg, pre = ckpt["config"], ckpt["preprocess"]
    net = create_model(ckpt["model_cfg"]["name"], num_classes=len(ckpt["classes"]), in_chans=pre["input_size"][0],
                       drop_rate=cfg["model"]["drop_rate"], drop_path_rate=cfg["model"]["drop_path_rate"],
                       **cfg["model"]["kwargs"])
    net.load_state_dict(ckpt["ema"] if ckpt.get("ema") is not None else ckpt["model"])
    return net.to(device).eval()
