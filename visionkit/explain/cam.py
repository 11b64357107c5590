"""Class activation maps with pytorch-grad-cam, and the choice of the layer they are taken at.

The layer comes from the model's structure and one dummy forward, never from its name:

* **CNNs**: the last module with a spatial output whose result feeds the global pooling (or the head): ResNet's
  ``layer4``, EfficientNet's final ``bn2`` (timm) or ``features`` (torchvision), LeNet's ``features``.
* **Token models** (ViT, DeiT: outputs ``[B, N, C]``): the first norm of the last attention block (timm
  ``blocks[-1].norm1``, torchvision ``encoder.layers[-1].ln_1``), as pytorch-grad-cam's docs advise: the class token
  alone feeds the head, so later layers get gradients on that token only. Prefix tokens (class, distillation,
  register) are dropped and the patch tokens reshaped to their grid.
* **NHWC models** (Swin in timm and torchvision): the same rule as CNNs (the final norm after the last stage), with an
  NHWC -> NCHW reshape.

Example::

    >>> import torch
    >>> from visionkit.models import create_model
    >>> m = create_model("tv:resnet18", num_classes=3).eval()
    >>> target_layer(m, (3, 64, 64))[2]
    'layer4'
    >>> compute_cams(m, torch.randn(2, 3, 64, 64)).shape
    (2, 64, 64)
"""
from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pytorch_grad_cam
import torch
from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, HiResCAM, LayerCAM
from pytorch_grad_cam.utils.image import show_cam_on_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from ..config import ConfigError

__all__ = ["METHODS", "EigenCAM", "LayerInfo", "ScoreCAM", "compute_cams", "denormalize", "overlay", "spatial_layers",
           "target_layer"]


class EigenCAM(pytorch_grad_cam.EigenCAM):
    """pytorch-grad-cam's EigenCAM (the activations projected on their first principal component), with its sign
    fixed and a thin SVD.

    SVD leaves the sign of the component arbitrary (jacobgil/pytorch-grad-cam#315): about one map in four came out
    inverted, highlighting the background (70 % localised in our test, 100 % with the fix). Here the projection is
    flipped where it correlates negatively with the activations summed over channels, so high means "more
    activation". The library's own Seg-Eigen-CAM rule, "make |max| > |min|", fails for objects larger than half the
    image (0 % localised at 56 % area, against 100 % with this rule). The library's ``full_matrices=True`` SVD also
    builds a C x C matrix it does not use: 0.3 s an image for 2048 channels instead of 5 ms.
    """

    def get_cam_image(self, input_tensor, target_layer, target_category, activations, grads, eigen_smooth):
        acts = np.nan_to_num(np.asarray(activations, dtype=np.float32))
        out = []
        for a in acts:  # [C, h, w]
            flat = a.reshape(a.shape[0], -1).T
            flat = flat - flat.mean(axis=0)
            proj = (flat @ np.linalg.svd(flat, full_matrices=False)[2][0]).reshape(a.shape[1:])
            energy = a.sum(axis=0)
            out.append(-proj if float(((proj - proj.mean()) * (energy - energy.mean())).sum()) < 0 else proj)
        return np.float32(out)


class _Discard(list):
    def append(self, item: object) -> None:
        pass


class ScoreCAM(pytorch_grad_cam.ScoreCAM):
    """pytorch-grad-cam's ScoreCAM without keeping the target layer's output of every masked forward.

    The library's hooks stay on while it scores one masked copy of the input per channel, and store each one's
    activations until the next call: for ResNet-50 at 224 px that is 0.8 GB per image explained. They are dropped.
    """

    def get_cam_weights(self, input_tensor, target_layer, targets, activations, grads):
        hooks = self.activations_and_grads
        kept, hooks.activations = hooks.activations, _Discard()
        try:
            return super().get_cam_weights(input_tensor, target_layer, targets, activations, grads)
        finally:
            hooks.activations = kept


METHODS: dict[str, type] = {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus, "scorecam": ScoreCAM,
                            "eigencam": EigenCAM, "layercam": LayerCAM, "hirescam": HiResCAM}
MAX_LISTED = 25  # layer names shown in an "unknown layer" message


@dataclass(frozen=True)
class LayerInfo:
    """A module with a spatial output, as seen in one dummy forward."""

    name: str
    shape: tuple[int, ...]  # output shape for a batch of one
    layout: str  # "NCHW", "NHWC" or "tokens" ([B, N, C]: prefix tokens, then the patch grid row by row)
    grid: tuple[int, int]  # height and width of the map
    prefix_tokens: int  # tokens before the patch grid (class / distillation / register tokens); 0 for maps
    order: int  # when the module was entered in the forward (execution order)


class TokensToMap:
    """Reshape transform ``[B, N, C]`` -> ``[B, C, h, w]``, dropping the ``prefix`` tokens."""

    def __init__(self, prefix: int, grid: tuple[int, int]) -> None:
        self.prefix, self.grid = prefix, grid

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        t = t[:, self.prefix:]
        return t.reshape(t.shape[0], *self.grid, t.shape[-1]).permute(0, 3, 1, 2)


class NHWCToNCHW:
    """Reshape transform ``[B, H, W, C]`` -> ``[B, C, H, W]`` (Swin stages)."""

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        return t.permute(0, 3, 1, 2)


# ------------------------------------------------------------------------------------------------- structure
def _fits(h: int, w: int, H: int, W: int) -> bool:
    """Whether an ``h x w`` map is the ``H x W`` input seen at some stride (rounding allowed)."""
    return 1 <= h <= H and 1 <= w <= W and abs(W * h / H - w) <= 1.0


def token_grid(n: int, H: int, W: int) -> tuple[int, int] | None:
    """The ``h x w`` patch grid of ``n`` tokens for an ``H x W`` input (None when no grid of that aspect fits)."""
    if n < 1:
        return None
    h = max(1, round(math.sqrt(n * H / W)))
    for hh in (h, h - 1, h + 1):
        if hh >= 1 and n % hh == 0 and _fits(hh, n // hh, H, W):
            return hh, n // hh
    return None


def prefix_tokens(model: nn.Module) -> int | None:
    """Tokens before the patch grid: timm's ``num_prefix_tokens``, torchvision ViT's class token; None: unknown."""
    n = getattr(model, "num_prefix_tokens", None)
    if isinstance(n, int):
        return n
    if isinstance(getattr(model, "class_token", None), torch.Tensor):
        return 1
    return None


def _layout(shape: tuple[int, ...], H: int, W: int, prefix: int | None) -> tuple[str, tuple[int, int], int] | None:
    if len(shape) == 4:
        if _fits(shape[2], shape[3], H, W):
            return "NCHW", (shape[2], shape[3]), 0
        if _fits(shape[1], shape[2], H, W):
            return "NHWC", (shape[1], shape[2]), 0
        return None
    if len(shape) == 3 and shape[1] >= 2:
        for p in ([prefix, 0] if prefix else range(9)):  # a patch embedding's output has no prefix tokens yet
            grid = token_grid(shape[1] - p, H, W)
            if grid is not None:
                return "tokens", grid, p
    return None


def _passthrough(m: nn.Module) -> bool:
    """Modules that return their input in eval (identity, dropout, drop-path): never a layer of their own."""
    return (isinstance(m, (nn.Identity, nn.modules.dropout._DropoutNd))
            or any(k in type(m).__name__ for k in ("DropPath", "StochasticDepth")))


def _global_pool(m: nn.Module, out: torch.Tensor) -> bool:
    name = type(m).__name__
    return "Pool" in name and "Adaptive" in name and (out.ndim == 2 or out.shape[-1] * out.shape[-2] == 1)


def _layout_only(m: nn.Module, inp: object, out: torch.Tensor) -> bool:
    """A parameter-free module that only permutes its input's dimensions (torchvision Swin's ``Permute``)."""
    return (isinstance(inp, torch.Tensor) and next(m.parameters(), None) is None and inp.shape != out.shape
            and sorted(inp.shape) == sorted(out.shape))


def _head_names(model: nn.Module) -> set[str]:
    from ..models import ModelError, get_classifier
    try:
        head = get_classifier(model)
    except ModelError:
        return set()
    heads = {id(h) for h in (head if isinstance(head, (tuple, list)) else [head]) if isinstance(h, nn.Module)}
    roots = [n for n, m in model.named_modules() if id(m) in heads and n]
    return {n for n, _ in model.named_modules() for r in roots if n == r or n.startswith(r + ".")}


def _attention(m: nn.Module) -> bool:
    return isinstance(m, nn.MultiheadAttention) or "Attention" in type(m).__name__


@dataclass
class _Trace:
    infos: dict[str, LayerInfo]  # spatial modules (head and pass-through modules left out), in execution order
    shapes: dict[str, tuple[int, ...]]  # output shape of every module that returned a tensor
    auto: str | None  # the automatic layer
    head: set[str]  # the classifier and its submodules
    passthrough: set[str]  # left out: identity / dropout / permute modules and global pools
    num_outputs: int  # size of the model's last output dimension (the number of classes)


@contextlib.contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    """Eval mode and no parameter gradients inside; every module's mode, ``requires_grad`` and ``.grad`` restored."""
    modes = [(m, m.training) for m in model.modules()]
    params = list(model.parameters())
    saved = [(p, p.requires_grad, p.grad) for p in params]
    try:
        model.eval()
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for m, mode in modes:
            m.training = mode
        for p, flag, grad in saved:
            p.requires_grad_(flag)
            p.grad = grad


def _model_device(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters(), None)
    return (p.device, p.dtype) if p is not None else (torch.device("cpu"), torch.float32)


def _trace(model: nn.Module, input_size: Sequence[int]) -> _Trace:
    """One dummy forward with hooks on every module: output shapes, execution order and what feeds the head."""
    c, H, W = (int(v) for v in input_size)
    prefix = prefix_tokens(model)
    head = _head_names(model)
    names = {m: n for n, m in model.named_modules() if n}
    step = [0]
    entered: dict[str, int] = {}
    finished: dict[str, int] = {}
    outputs: dict[str, torch.Tensor] = {}
    inputs: dict[str, object] = {}
    skip: set[str] = set()
    cut: dict[str, tuple[int, object]] = {}  # the head and the global pool before it: (entry step, input tensor)

    def pre(m: nn.Module, args: tuple) -> None:
        n = names[m]
        step[0] += 1
        entered.setdefault(n, step[0])
        if n in head and "head" not in cut:
            cut["head"] = step[0], args[0] if args else None

    def post(m: nn.Module, args: tuple, out: object) -> None:
        n = names[m]
        step[0] += 1
        finished[n] = step[0]
        if not isinstance(out, torch.Tensor):
            return
        outputs[n] = out  # kept alive, so tensor identity is meaningful
        inp = inputs[n] = args[0] if args else None
        if _global_pool(m, out) and "head" not in cut:  # the last one before the head (not a squeeze-excite's)
            cut["pool"] = entered[n], inp
        if _passthrough(m) or _layout_only(m, inp, out) or _global_pool(m, out):
            skip.add(n)

    handles = [h for m in names for h in (m.register_forward_pre_hook(pre), m.register_forward_hook(post))]
    device, dtype = _model_device(model)
    try:
        with _frozen(model), torch.no_grad():
            logits = model(torch.zeros(1, c, H, W, device=device, dtype=dtype))
    finally:
        for h in handles:
            h.remove()

    infos: dict[str, LayerInfo] = {}
    for n in sorted(outputs, key=entered.__getitem__):
        found = None if n in head or n in skip else _layout(tuple(outputs[n].shape), H, W, prefix)
        if found:
            infos[n] = LayerInfo(n, tuple(outputs[n].shape), found[0], found[1], found[2], entered[n])
    shapes = {n: tuple(t.shape) for n, t in outputs.items()}
    classes = int(logits.shape[-1]) if isinstance(logits, torch.Tensor) and logits.ndim else 0
    return _Trace(infos, shapes, _auto(model, infos, finished, outputs, inputs, cut), head, skip, classes)


def _auto(model: nn.Module, infos: dict[str, LayerInfo], finished: dict[str, int], outputs: dict[str, torch.Tensor],
          inputs: dict[str, object], cut: dict[str, tuple[int, object]]) -> str | None:
    at, fed = min(cut.values(), key=lambda v: v[0], default=(math.inf, None))  # global pool, else the head
    before = [n for n in infos if finished[n] < at]
    if not before:
        return None
    mods = dict(model.named_modules())

    def producer(t: object, among: list[str]) -> str | None:  # the outermost module that returned tensor t
        found = [n for n in among if outputs[n] is t]
        return max(found, key=finished.__getitem__) if found else None

    chosen = producer(fed, before) or max(before, key=finished.__getitem__)
    while "Pool" in type(mods[chosen]).__name__ and next(mods[chosen].parameters(), None) is None:
        feeder = producer(inputs[chosen], [n for n in before if finished[n] < finished[chosen]])
        if feeder is None:  # a pooling layer (VGG's 7x7 avgpool) is no place for a CAM: take what feeds it
            break
        chosen = feeder
    if infos[chosen].layout != "tokens":
        return chosen
    # token model: the first norm of the last attention block
    attn = [n for n, m in model.named_modules() if n and _attention(m) and n in finished]
    if not attn:
        return chosen
    block = max(attn, key=finished.__getitem__).rpartition(".")[0]
    if not block:
        return chosen
    norms = [n for n in infos if n.startswith(block + ".") and "Norm" in type(mods[n]).__name__
             and infos[n].layout == "tokens"]
    return min(norms, key=lambda n: infos[n].order) if norms else block if block in infos else chosen


def spatial_layers(model: nn.Module, input_size: Sequence[int]) -> dict[str, LayerInfo]:
    """Every named module whose output is spatial (a 4-D map, NCHW or NHWC, or a token sequence of a patch grid),
    in execution order, found with hooks in one dummy forward of ``input_size`` (C, H, W). The classifier head and
    pass-through modules (identity, dropout, drop-path) are left out.

    Example::

        >>> from visionkit.models import create_model
        >>> list(spatial_layers(create_model("lenet", num_classes=3, in_chans=1), (1, 28, 28)))[:3]
        ['features', 'features.0', 'features.2']
    """
    return _trace(model, input_size).infos


def _listing(infos: dict[str, LayerInfo]) -> str:
    names = sorted(infos, key=lambda n: (n.count("."), infos[n].order))
    more = len(names) - MAX_LISTED
    return ", ".join(names[:MAX_LISTED]) + (f", ... (and {more} more)" if more > 0 else "")


def target_layer(model: nn.Module, input_size: Sequence[int],
                 name: str = "auto") -> tuple[nn.Module, Callable | None, str]:
    """The module to take CAMs at, the reshape transform its output needs (None for NCHW maps) and its name.

    ``name="auto"`` picks it from the structure (see the module docstring); an unknown name, or one without a
    spatial output, is a :class:`ConfigError` listing the valid names.

    Example::

        >>> from visionkit.models import create_model
        >>> m = create_model("timm:vit_tiny_patch16_224", num_classes=3, img_size=32, patch_size=8, depth=2)
        >>> target_layer(m, (3, 32, 32))[2]
        'blocks.1.norm1'
    """
    return _resolve(model, input_size, name)[:3]


def _resolve(model: nn.Module, input_size: Sequence[int],
             name: str) -> tuple[nn.Module, Callable | None, str, _Trace]:
    trace = _trace(model, input_size)
    if not trace.infos:
        raise ConfigError(f"{type(model).__name__} has no layer with a spatial output at input size "
                          f"{tuple(input_size)}; CAMs need a CNN or a vision transformer")
    if name == "auto":
        name = trace.auto or next(reversed(trace.infos))
    elif name not in trace.infos:
        valid = f"layers with spatial outputs: {_listing(trace.infos)}"
        if name in trace.head:
            raise ConfigError(f"layer {name!r} is the classifier head; {valid}")
        if name in trace.passthrough:
            raise ConfigError(f"layer {name!r} is a global pool or passes its input through (identity, dropout, "
                              f"permute); {valid}")
        if name in trace.shapes:
            raise ConfigError(f"layer {name!r} has no spatial output (shape {list(trace.shapes[name])}); {valid}")
        if name in dict(model.named_modules()):
            raise ConfigError(f"layer {name!r} returns no single tensor; {valid}")
        raise ConfigError(f"unknown layer {name!r}; {valid}")
    info = trace.infos[name]
    reshape = (TokensToMap(info.prefix_tokens, info.grid) if info.layout == "tokens"
               else NHWCToNCHW() if info.layout == "NHWC" else None)
    return model.get_submodule(name), reshape, name, trace


def method_class(method: str) -> type:
    """The pytorch-grad-cam class of ``method``; an unknown one is a :class:`ConfigError` listing the valid ones."""
    if method not in METHODS:
        raise ConfigError(f"unknown CAM method {method!r}; choose one of {', '.join(METHODS)}")
    return METHODS[method]


# ------------------------------------------------------------------------------------------------------- CAMs
def compute_cams(model: nn.Module, x: torch.Tensor, targets: int | Sequence[int] | None = None,
                 method: str = "gradcam", layer: str = "auto", batch_size: int = 32) -> np.ndarray:
    """CAMs ``[N, H, W]`` (float32 in [0, 1], at the input's size) of a normalised batch ``x`` ``[N, C, H, W]``.

    ``targets``: a class index per image (or one for all); None explains each image's predicted class. Runs in fp32
    with gradients enabled (also inside ``torch.no_grad``); the model comes back as it was: train/eval mode of every
    module, ``requires_grad`` and ``.grad`` of its parameters, no hooks left.

    Example::

        >>> from visionkit.models import create_model
        >>> m = create_model("lenet", num_classes=3, in_chans=1)
        >>> cams = compute_cams(m, torch.randn(4, 1, 28, 28), targets=[0, 1, 2, 0], method="gradcam++")
        >>> cams.shape, float(cams.min()) >= 0, float(cams.max()) <= 1
        ((4, 28, 28), True, True)
    """
    cls = method_class(method)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4:
        raise ConfigError(f"compute_cams needs a batch [N, C, H, W], got shape {tuple(x.shape)}")
    n = len(x)
    if targets is not None:
        targets = [int(targets)] * n if isinstance(targets, (int, np.integer)) else [int(t) for t in targets]
        if len(targets) != n:
            raise ConfigError(f"{len(targets)} targets for {n} images")
    device, _ = _model_device(model)
    out = []
    with torch.inference_mode(False), torch.enable_grad():
        x = x.detach().to(device=device, dtype=torch.float32).clone()
        module, reshape, _, trace = _resolve(model, tuple(x.shape[1:]), layer)
        bad = [t for t in targets or [] if not 0 <= t < trace.num_outputs]
        if bad:
            raise ConfigError(f"target class {bad[0]} out of range; the model has {trace.num_outputs} classes")
        with _frozen(model):
            cam = cls(model, [module], reshape_transform=reshape)
            cam.batch_size = batch_size  # ScoreCAM's masked forwards per batch
            # ScoreCAM reports progress with tqdm on stderr: explaining prints nothing
            quiet = contextlib.redirect_stderr(io.StringIO()) if method == "scorecam" else contextlib.nullcontext()
            try:
                for i in range(0, n, batch_size):
                    xb = x[i:i + batch_size].clone().requires_grad_(cam.uses_gradients)
                    tb = None if targets is None else [ClassifierOutputTarget(t) for t in targets[i:i + batch_size]]
                    with quiet:
                        out.append(cam(input_tensor=xb, targets=tb))
            finally:
                cam.activations_and_grads.release()
                cam.outputs = None
    cams = np.concatenate(out) if out else np.zeros((0, *x.shape[2:]), np.float32)
    return np.clip(np.nan_to_num(cams.astype(np.float32)), 0.0, 1.0)


# ----------------------------------------------------------------------------------------------------- images
def denormalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Undo the normalisation of a batch ``[N, C, H, W]``: RGB images ``[N, H, W, 3]`` in [0, 1] (grey -> 3 channels).

    Example::

        >>> denormalize(torch.zeros(2, 1, 8, 8), mean=[0.5], std=[0.25]).shape
        (2, 8, 8, 3)
    """
    if x.ndim == 3:
        x = x[None]
    x = x.detach().float().cpu()
    m = torch.as_tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.as_tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1)
    img = (x * s + m).clamp(0, 1)
    if img.shape[1] == 1:
        img = img.expand(-1, 3, -1, -1)
    return img[:, :3].permute(0, 2, 3, 1).contiguous().numpy()


def overlay(rgb: np.ndarray, cam: np.ndarray, image_weight: float = 0.5) -> np.ndarray:
    """A CAM ``[h, w]`` in [0, 1] as a jet heat map over an RGB image ``[H, W, 3]`` in [0, 1]: uint8 ``[H, W, 3]``.

    Example::

        >>> overlay(np.zeros((8, 8, 3), np.float32), np.ones((4, 4), np.float32)).shape
        (8, 8, 3)
    """
    import cv2
    rgb = np.clip(np.asarray(rgb, dtype=np.float32), 0, 1)
    if rgb.ndim == 2:
        rgb = np.repeat(rgb[..., None], 3, axis=2)
    cam = np.clip(np.asarray(cam, dtype=np.float32), 0, 1)
    if cam.shape != rgb.shape[:2]:
        cam = cv2.resize(cam, (rgb.shape[1], rgb.shape[0]), interpolation=cv2.INTER_LINEAR)
    return show_cam_on_image(rgb, cam, use_rgb=True, image_weight=image_weight)
