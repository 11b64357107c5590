"""One name space for every model: own models (registered here), torchvision (`tv:NAME`) and timm (`timm:NAME`).

Own models register with ``@register_model``, exactly like timm: the decorated factory takes
``num_classes``, ``in_chans`` and keyword options (``drop_rate``, ``drop_path_rate``) and returns an ``nn.Module``.
Each registered entry carries a ``default_cfg`` (input size, mean, std) so eval, predict and export never guess the
preprocessing.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn


@dataclass(frozen=True)
class ModelEntry:
    name: str
    factory: Callable[..., nn.Module]
    default_cfg: dict = field(default_factory=dict)  # input_size (C,H,W), mean, std, interpolation, crop_pct
    description: str = ""
    small_input: bool = False  # designed for 28-32 px inputs


_OWN: dict[str, ModelEntry] = {}


class ModelError(ValueError):
    """A model could not be created or changed; the message is one line saying what to do."""


def register_model(name: str | None = None, *, default_cfg: dict | None = None, description: str = "",
                   small_input: bool = False) -> Callable:
    """Register an own model factory under ``name`` (defaults to the function name).

    Example::

        @register_model(default_cfg={"input_size": (1, 28, 28)}, small_input=True)
        def lenet(num_classes=10, in_chans=1, **kw): ...
    """
    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        key = name or fn.__name__
        if key in _OWN:
            raise ValueError(f"model {key!r} registered twice")
        _OWN[key] = ModelEntry(key, fn, dict(default_cfg or {}), description or (fn.__doc__ or "").strip().split("\n")[0],
                               small_input)
        return fn
    return deco


def own_models() -> dict[str, ModelEntry]:
    """All registered own models by name.

    Example::

        >>> import visionkit.models
        >>> "lenet" in own_models()
        True
    """
    return dict(_OWN)


def note_no_drop_path(model_name: str, drop_path_rate: float) -> None:
    """Models without residual branches have no stochastic depth: say so once on stderr and train without it.

    Recipes set ``drop_path_rate`` for the models that support it; refusing every other model would make a recipe
    unusable with half the registry, and ignoring it silently would hide a setting the user may have asked for.
    """
    if drop_path_rate:
        import sys
        print(f"note: {model_name} has no stochastic depth; drop_path_rate={drop_path_rate} is ignored "
              f"(use drop_rate for dropout)", file=sys.stderr)
