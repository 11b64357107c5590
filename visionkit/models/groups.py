"""Layer groups for transfer learning: every model split into ordered stages and blocks of parameter names.

:func:`layer_groups` returns a :class:`LayerGroups`: ``stages`` (stem first, head excluded) for freezing and
unfreezing from the top and for discriminative learning rates, ``blocks`` (one per residual / transformer block,
nested in the stages) for layer-wise lr decay, and ``head`` (the parameters of
:func:`visionkit.models.get_classifier`). Every parameter of ``model.named_parameters()`` (trainable or not) is in
exactly one stage or the head, and in exactly one block or the head; names inside a group keep the
``named_parameters`` order. Nothing is hard-coded per model: groups come from the model's structure.

**timm models with** ``group_matcher``: ``group_matcher(coarse=True)`` gives the stages and ``coarse=False`` the
blocks, grouped with timm's own ``group_with_matcher`` (as timm's ``param_groups_layer_decay`` does). The head is taken
out; what timm could not match besides it (a final norm, ``conv_head``) joins the last stage / block. When coarse and
fine grouping agree and give more than 4 stages (isotropic models: ViT, DeiT), the blocks are gathered into 4 stages.

**Other models** (torchvision, own, timm without ``group_matcher``) get a structural walk:

1. *Units*: the root, plain containers (exactly ``nn.Sequential`` / ``nn.ModuleList`` / ``nn.ModuleDict``) and a
   module holding more than half of the parameters around blocks (torchvision ViT's ``Encoder``) are opened;
   everything else is a unit. Not opened: a plain container with at most one weight layer (``Sequential(conv, bn,
   relu)``, ConvNeXt's ``Sequential(LayerNorm2d, Conv2d)`` downsample: one layer, not a stage), a plain container of
   single layers repeated three or more times among its siblings (ConvMixer's blocks) and a big module with
   siblings of its class (one stage of several). Direct parameters of an opened module (``class_token``,
   ``encoder.pos_embedding``) are units of their own.
2. *Runs* of consecutive units with the same parent. In a run holding blocks (units with two or more weight layers),
   single layers at either end are peeled off (the stem conv and final 1x1 conv of torchvision MobileNet's flat
   ``features``, DenseNet's ``norm5``). The rest is cut before each downsampling unit (a strided conv or a pooling
   layer inside: MobileNet's stride-2 blocks, DenseNet's transitions) and at pooling layers between units (VGG).
3. A piece is a *stage* when it holds a block, two or more weight layers, or is one of several pieces of a cut run;
   other pieces (a lone conv or norm, ``class_token``, a downsample layer) are merged: leading ones into the
   ``"stem"`` stage, trailing ones (a final norm or 1x1 conv) into the last stage, others into the next stage. A run
   that is one stage of a stage-sized container keeps its peeled layers (FastNet's ``stages.0``).
4. A single stage of many blocks (torchvision ViT's 12 encoder layers) is split into 4 roughly equal stages, so
   "unfreeze the last stage" means the last quarter.

``blocks`` are the units of each stage (the blocks inside a stage module such as timm's ``ConvNeXtStage``);
units without a weight layer (a norm, a parameter) and merged pieces join the neighbouring block.
``transformer`` is True when the model has attention modules (``nn.MultiheadAttention`` or a class named
``*Attention*``): layer-wise lr decay is the usual recipe there.

Example::

    >>> from visionkit.models import create_model
    >>> g = layer_groups(create_model("tv:resnet18", num_classes=5))
    >>> g.stage_names, g.head, g.source, len(g.blocks)
    (['stem', 'layer1', 'layer2', 'layer3', 'layer4'], ['fc.weight', 'fc.bias'], 'structure', 9)
    >>> layer_groups(create_model("timm:vit_tiny_patch16_224", num_classes=5)).stage_names
    ['stem', 'blocks.0-2', 'blocks.3-5', 'blocks.6-8', 'blocks.9-11']
"""
from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from torch import nn

__all__ = ["LayerGroups", "layer_groups"]

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
_POOLS = (nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd)
_ISOTROPIC_STAGES = 4
_UNMATCHED = "\x00unmatched"  # a name no group_matcher pattern matches: marks timm's group of unmatched params


@dataclass
class LayerGroups:
    """Parameter names of a model in ordered groups; see the module docstring for how they are found."""

    stages: list[list[str]]  # input side first; head excluded
    stage_names: list[str]  # one readable name per stage: "stem", "layer1", "blocks.3", "features.5"
    head: list[str]  # parameters of get_classifier(model); [] when it has none
    blocks: list[list[str]]  # finer split of the same parameters (one per block, stem first)
    transformer: bool  # attention blocks: layer-wise lr decay is the default
    source: str  # "timm group_matcher" or "structure"

    def head_module_name(self) -> str:
        """Qualified name of the classifier module (``"fc"``, ``"head.fc"``), ``""`` when the head has no params."""
        prefixes = {n.rpartition(".")[0] for n in self.head}
        return prefixes.pop() if len(prefixes) == 1 else _common_prefix(sorted(prefixes))


# ------------------------------------------------------------------------------------------------------- helpers
def _common_prefix(names: list[str]) -> str:
    """Longest common dotted prefix of module / parameter names (``"layer1"`` for ``layer1.0.x``, ``layer1.1.y``)."""
    if not names:
        return ""
    parts = [n.split(".") for n in names]
    out = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        out.append(level[0])
    return ".".join(out)


def _span(first: str, last: str) -> str:
    """``blocks.0`` .. ``blocks.2`` → ``blocks.0-2`` (the shared prefix of ``last`` is dropped, never inside a number)."""
    if first == last:
        return first
    cut = 0
    while cut < min(len(first), len(last)) and first[cut] == last[cut]:
        cut += 1
    while cut and last[cut - 1].isdigit():
        cut -= 1
    return f"{first}-{last[cut:]}"


def _chunks(items: list, n: int) -> list[list]:
    """Split ``items`` into ``n`` consecutive chunks of sizes differing by at most one (larger ones first)."""
    size, extra = divmod(len(items), n)
    out, start = [], 0
    for i in range(n):
        end = start + size + (i < extra)
        out.append(items[start:end])
        start = end
    return [c for c in out if c]


def _is_transformer(model: nn.Module) -> bool:
    return any(isinstance(m, nn.MultiheadAttention) or "Attention" in type(m).__name__ for m in model.modules())


def _head_param_ids(model: nn.Module) -> set[int]:
    from visionkit.models import ModelError, get_classifier

    cfg = getattr(model, "visionkit_cfg", None)
    if isinstance(cfg, dict) and cfg.get("num_classes") == 0:  # identity head (torchvision's has no get_classifier)
        return set()
    try:
        head = get_classifier(model)
    except ModelError:  # no Linear / Conv2d anywhere: no head
        return set()
    heads = head if isinstance(head, (tuple, list)) else [head]  # distilled timm models return (head, head_dist)
    return {id(p) for h in heads if isinstance(h, nn.Module) for p in h.parameters()}


# ---------------------------------------------------------------------------------------------- timm matcher
@dataclass
class _TimmGroups:
    groups: list[list[str]]  # in timm's ordinal order, head taken out, unmatched params joined to the last group
    names: list[str]  # a readable name per group
    unmatched: set[str]  # the params timm's matcher did not place (they joined the last group)
    has_stem: bool  # the first group is the matcher's "stem"


def _patterns(matcher: object) -> list[re.Pattern]:
    """The regexes of a dict ``group_matcher`` in timm's order (first match wins); [] for a callable matcher."""
    if not isinstance(matcher, dict):
        return []
    specs = [s for spec in matcher.values() if spec is not None
             for s in (spec if isinstance(spec, (tuple, list)) else [(spec, None)])]
    return [re.compile(s[0]) for s in specs]


def _group_name(names: list[str], patterns: list[re.Pattern]) -> str:
    """What the matcher matched in most of the group (``blocks.6`` for ``blocks.6.*``, ``conv_head``, ``bn2``), else
    the common module prefix of the group's main part."""
    texts = [next((m.group(0).rstrip(".") for p in patterns if (m := p.match(n))), "") for n in names]
    texts = [t for t in texts if t]
    if texts:
        return max(dict.fromkeys(texts), key=texts.count)
    modules = [n.rpartition(".")[0] or n for n in names]
    tops = [m.split(".")[0] for m in modules]
    main = max(dict.fromkeys(tops), key=tops.count)
    return _common_prefix([m for m, t in zip(modules, tops) if t == main]) or main


def _timm_grouping(model: nn.Module, coarse: bool, names: list[str], head: set[str]) -> _TimmGroups:
    """timm's own grouping (as in its ``param_groups_layer_decay``) without the head; params the matcher leaves
    unmatched (final norm, ``conv_head``) join the group before them instead of standing alone."""
    try:
        from timm.models._manipulate import group_with_matcher
    except ImportError:  # pragma: no cover - older / newer timm layouts
        from timm.models import group_with_matcher

    matcher = model.group_matcher(coarse=coarse)
    try:  # the sentinel lands in the group of unmatched names (classifier, final norms)
        grouped = group_with_matcher([(n, None) for n in [*names, _UNMATCHED]], matcher)
    except Exception:  # noqa: BLE001  (a callable matcher that cannot take a foreign name)
        grouped = group_with_matcher([(n, None) for n in names], matcher)
    groups = [list(grouped[k]) for k in sorted(grouped)]
    leftover = next((i for i, g in enumerate(groups) if _UNMATCHED in g), None)
    if leftover is None and any(n in head for n in groups[-1]):  # no sentinel: the head's group is the leftover one
        leftover = len(groups) - 1
    if leftover == 0:  # nothing matched (names with a prefix, e.g. torch.compile's _orig_mod.): no grouping
        return _TimmGroups([], [], set(), False)
    patterns = _patterns(matcher)
    out: list[list[str]] = []
    out_names: list[str] = []
    unmatched: set[str] = set()
    for i, g in enumerate(groups):
        keep = [n for n in g if n not in head and n != _UNMATCHED]
        if i == leftover and out:
            out[-1].extend(keep)
            unmatched.update(keep)
        elif keep:
            out.append(keep)
            out_names.append(_group_name(keep, patterns))
    stem = isinstance(matcher, dict) and next(iter(matcher), None) == "stem" and isinstance(matcher["stem"], str)
    has_stem = bool(out) and stem and all(re.match(matcher["stem"], n) for n in out[0])
    if has_stem:
        out_names[0] = "stem"
    return _TimmGroups(out, out_names, unmatched, has_stem)


def _from_matcher(model: nn.Module, names: list[str], head: set[str]) -> tuple[list[list[str]], list[str],
                                                                               list[list[str]]] | None:
    try:
        c = _timm_grouping(model, True, names, head)
        fine = _timm_grouping(model, False, names, head).groups
    except Exception:  # noqa: BLE001  (a model whose group_matcher is not implemented): use the structure
        return None
    if not c.groups:
        return None
    coarse, stage_names, first = c.groups, c.names, int(c.has_stem)
    if coarse == fine and len(coarse) - first > _ISOTROPIC_STAGES:  # isotropic (ViT): gather blocks into 4 stages
        parts = _chunks(list(zip(coarse[first:], stage_names[first:])), _ISOTROPIC_STAGES)
        coarse = coarse[:first] + [[n for g, _ in part for n in g] for part in parts]
        stage_names = stage_names[:first] + [_span(part[0][1], part[-1][1]) for part in parts]
    elif len(coarse) - first >= 2:  # a last stage that is one lone layer (MobileNetV3's 1x1 conv) joins the one before
        shapes = dict(model.named_parameters())
        if sum(shapes[n].ndim >= 2 for n in coarse[-1] if n not in c.unmatched) <= 1:
            coarse = coarse[:-2] + [coarse[-2] + coarse[-1]]
            stage_names = stage_names[:-1]
    block_of = {n: i for i, g in enumerate(fine) for n in g}
    blocks: list[list[str]] = []
    for stage in coarse:  # blocks = fine groups cut along the stages, so they nest and concatenate to the stages
        per: dict[int, list[str]] = {}
        for n in stage:
            per.setdefault(block_of.get(n, len(fine)), []).append(n)
        blocks += [per[k] for k in sorted(per)]
    return coarse, stage_names, blocks


# --------------------------------------------------------------------------------------------- structure walk
@dataclass
class _Unit:
    name: str  # module name, or parameter name for a direct parameter
    parent: str  # name of the opened module it sits in
    params: list[str]  # its non-head parameter names
    numel: int
    weights: int  # number of weight layers (modules with a >= 2-D non-head parameter)
    down: bool  # holds a strided conv or a pooling layer
    cut_before: bool = False  # a pooling layer sits between it and the previous unit of the same parent
    inner: list[list[str]] = field(default_factory=list)  # its blocks, when it is a stage module (timm's ConvNeXtStage)


@dataclass
class _Piece:
    units: list[_Unit]
    major: bool  # a stage of its own (else merged into a neighbour)
    blocks: list[list[str]] = field(default_factory=list)  # set for major pieces


def _weight_layers(module: nn.Module, head: set[int]) -> int:
    return sum(any(p.ndim >= 2 and id(p) not in head for p in m.parameters(recurse=False)) for m in module.modules())


def _strided(m: nn.Module) -> bool:
    """A pooling layer or conv that lowers the resolution (adaptive / global pools do not count)."""
    if isinstance(m, (*_POOLS, nn.modules.conv._ConvNd)):
        stride = m.stride if isinstance(m.stride, (tuple, list)) else (m.stride,)
        return any(s is not None and s > 1 for s in stride)
    return False


def _downsamples(module: nn.Module) -> bool:
    return any(_strided(m) for m in module.modules())


def _inner_blocks(name: str, module: nn.Module, params: list[str], head: set[int]) -> list[list[str]]:
    """Blocks of a stage module (a unit holding a plain container of two or more blocks, like timm's
    ``ConvNeXtStage.blocks``, or itself a container of them, like DenseNet's ``_DenseBlock``): one per block, the
    layers before (a downsample) and after joined to the first / last."""
    own = [(name, module)] if isinstance(module, _CONTAINERS) else []
    for prefix, child in own + [(f"{name}.{n}", c) for n, c in module.named_children() if type(c) in _CONTAINERS]:
        keys = [f"{prefix}.{k}." for k, b in child.named_children() if _weight_layers(b, head) >= 2]
        if len(keys) < 2:
            continue
        blocks: list[list[str]] = [[] for _ in keys]
        before: list[str] = []
        for n in params:
            i = next((i for i, k in enumerate(keys) if n.startswith(k)), None)
            if i is not None:
                blocks[i].append(n)
            elif any(blocks):
                blocks[-1].append(n)
            else:
                before.append(n)
        blocks[0][:0] = before
        return [b for b in blocks if b]
    return []


def _units(model: nn.Module, head: set[int], name_of: dict[int, str]) -> list[_Unit]:
    total = sum(p.numel() for p in model.parameters())
    seen_params: set[int] = set()
    seen_modules: set[int] = set()
    units: list[_Unit] = []
    pool_after: set[str] = set()  # parents where a pooling layer followed the last unit

    def own(ps: Iterable) -> list:
        out = [p for p in ps if id(p) not in seen_params and id(p) not in head and id(p) in name_of]
        seen_params.update(id(p) for p in out)
        return out

    def sequence(m: nn.Module) -> bool:  # a plain container of two or more weight layers
        return type(m) in _CONTAINERS and _weight_layers(m, head) >= 2

    def opened(m: nn.Module, siblings: list[nn.Module]) -> bool:
        if sequence(m):  # ... unless it is a block of single layers repeated among its siblings (ConvMixer's blocks)
            layers_only = all(_weight_layers(c, head) <= 1 for c in m.children())
            return not (layers_only and sum(type(s) is type(m) for s in siblings) >= 3)
        # a wrapper of blocks holding most of the model (torchvision ViT's Encoder, PiT's SequentialTuple of stages);
        # not a block made of single layers (FastNet's BasicBlock), not one stage of several (timm Swin's layers.3)
        return (sum(p.numel() for p in m.parameters()) > total / 2
                and any(_weight_layers(c, head) >= 2 for c in m.children())
                and not any(type(s) is type(m) for s in siblings if s is not m))

    def visit(name: str, module: nn.Module, parent: str, siblings: list[nn.Module]) -> None:
        if not name or opened(module, siblings):
            for p in own(module.parameters(recurse=False)):
                units.append(_Unit(name_of[id(p)], name, [name_of[id(p)]], p.numel(), 0, False,
                                   name in pool_after))
                pool_after.discard(name)
            children = list(module.named_children())
            for child_name, child in children:
                if id(child) in seen_modules:
                    continue
                seen_modules.add(id(child))
                visit(f"{name}.{child_name}" if name else child_name, child, name, [c for _, c in children])
            return
        ps = own(module.parameters())
        if ps:
            pnames = [name_of[id(p)] for p in ps]
            units.append(_Unit(name, parent, pnames, sum(p.numel() for p in ps),
                               _weight_layers(module, head), _downsamples(module), parent in pool_after,
                               _inner_blocks(name, module, pnames, head)))
            pool_after.discard(parent)
        elif isinstance(module, _POOLS) and _strided(module) and any(u.parent == parent for u in units[-1:]):
            pool_after.add(parent)

    visit("", model, "", [])
    return units


def _runs(units: list[_Unit]) -> list[list[_Unit]]:
    runs: list[list[_Unit]] = []
    for u in units:
        if runs and runs[-1][-1].parent == u.parent:
            runs[-1].append(u)
        else:
            runs.append([u])
    return runs


def _pieces(run: list[_Unit], stage_like: bool) -> list[_Piece]:
    """Peel single layers off the ends of a run of blocks, cut the rest at downsampling.

    ``stage_like``: the run's parent is a stage-sized container (not the root or the trunk), so a run that makes one
    stage keeps its peeled layers (FastNet's ``stages.0``: conv, pool, norm, block)."""
    lo, hi = 0, len(run)
    if any(u.weights >= 2 for u in run):  # a run of blocks: single layers at its ends are stem / final layers
        while lo < hi and run[lo].weights <= 1:
            lo += 1
        while hi > lo and run[hi - 1].weights <= 1:
            hi -= 1
    cuts: list[list[_Unit]] = []
    for u in run[lo:hi]:
        if not cuts or u.down or u.cut_before:
            cuts.append([u])
        else:
            cuts[-1].append(u)
    for i in range(len(cuts) - 1, -1, -1):  # a cut without a weight layer (a parameter, a norm) joins its neighbour
        if len(cuts) > 1 and not any(u.weights for u in cuts[i]):
            j = i + 1 if i + 1 < len(cuts) else i - 1
            cuts[j] = cuts[i] + cuts[j] if j > i else cuts[j] + cuts[i]
            del cuts[i]
    several = len(cuts) > 1

    def major(units: list[_Unit]) -> bool:
        cores = sum(u.weights >= 1 for u in units)
        return any(u.weights >= 2 for u in units) or cores >= 2 or (several and cores >= 1)

    if stage_like and len(cuts) == 1 and major(cuts[0]):  # the run is one stage: it keeps its peeled layers
        blocks = _unit_blocks(cuts[0])
        blocks[0][:0] = [n for u in run[:lo] for n in u.params]
        blocks[-1] += [n for u in run[hi:] for n in u.params]
        return [_Piece(run, True, blocks)]
    return ([_Piece([u], False) for u in run[:lo]] + [_Piece(c, True, _unit_blocks(c)) if major(c) else _Piece(c, False)
                                                      for c in cuts] + [_Piece([u], False) for u in run[hi:]])


def _stage_name(stage_units: list[_Unit], main: list[_Unit], units: list[_Unit]) -> str:
    parent = main[0].parent
    inside = [u for u in stage_units if u.parent == parent]
    below = [u for u in units if u.name.startswith(parent + ".")] if parent else units
    if parent and all(u in stage_units for u in below):
        return parent
    # the range runs from the first unit in the stage's parent to its last main unit (not a merged trailing layer)
    first, last = (u.name[len(parent) + 1:] if parent else u.name for u in (inside[0], main[-1]))
    return f"{parent}.{_span(first, last)}" if parent else _span(first, last)


def _unit_blocks(units: list[_Unit]) -> list[list[str]]:
    """One block per unit (per inner block for a stage module); units without a weight layer (a norm, a parameter)
    join the next block (else the last)."""
    blocks: list[list[str]] = []
    pending: list[str] = []
    for u in units:
        if u.weights and u.inner:
            blocks += [pending + u.inner[0], *u.inner[1:]]
            pending = []
            continue
        pending += u.params
        if u.weights:
            blocks.append(pending)
            pending = []
    if pending:
        if blocks:
            blocks[-1] += pending
        else:
            blocks.append(pending)
    return blocks


def _from_structure(model: nn.Module, head: set[int], name_of: dict[int, str]) -> tuple[list[list[str]], list[str],
                                                                                        list[list[str]]]:
    units = _units(model, head, name_of)
    total = sum(u.numel for u in units)

    def stage_like(parent: str) -> bool:
        return bool(parent) and sum(u.numel for u in units if u.name.startswith(parent + ".")) <= total / 2

    pieces = [p for run in _runs(units) for p in _pieces(run, stage_like(run[0].parent))]
    majors = [p for p in pieces if p.major]
    if len(majors) == 1 and len(majors[0].units) > 1:  # isotropic: one stage of many blocks → 4 stages
        i = pieces.index(majors[0])
        pieces[i:i + 1] = [_Piece(c, True, _unit_blocks(c)) for c in _chunks(majors[0].units, _ISOTROPIC_STAGES)]
        majors = [p for p in pieces if p.major]
    if not majors:  # no stage structure at all: one stage
        flat = [n for u in units for n in u.params]
        return ([flat], [_common_prefix([u.name for u in units]) or "body"], [flat]) if flat else ([], [], [])
    first, last = pieces.index(majors[0]), pieces.index(majors[-1])
    stem = [u for p in pieces[:first] for u in p.units]
    groups: list[tuple[list[_Unit], list[_Unit], list[list[str]]]] = []  # (all units, main units, blocks)
    pending: list[_Unit] = []
    for p in pieces[first:last + 1]:
        if not p.major:
            pending += p.units
            continue
        blocks = [list(b) for b in p.blocks]
        blocks[0][:0] = [n for u in pending for n in u.params]
        groups.append((pending + p.units, p.units, blocks))
        pending = []
    tail = [u for p in pieces[last + 1:] for u in p.units]
    groups[-1][0].extend(tail)
    groups[-1][2][-1].extend(n for u in tail for n in u.params)
    stages = [[n for u in g for n in u.params] for g, _, _ in groups]
    names = [_stage_name(g, main, units) for g, main, _ in groups]
    blocks = [b for _, _, bs in groups for b in bs]
    if stem:
        stem_params = [n for u in stem for n in u.params]
        stages, names, blocks = [stem_params, *stages], ["stem", *names], [stem_params, *blocks]
    return stages, names, blocks


# -------------------------------------------------------------------------------------------------------- API
def layer_groups(model: nn.Module) -> LayerGroups:
    """Split ``model``'s parameters into stages (stem first), blocks and head; see the module docstring.

    Example::

        >>> g = layer_groups(create_model("tv:efficientnet_b0", num_classes=5))
        >>> g.stage_names[0], g.stage_names[-1], g.head
        ('stem', 'features.7', ['classifier.1.weight', 'classifier.1.bias'])
    """
    named = list(model.named_parameters())
    names = [n for n, _ in named]
    index = {n: i for i, n in enumerate(names)}
    name_of = {id(p): n for n, p in named}
    head_ids = _head_param_ids(model)
    head = [n for n, p in named if id(p) in head_ids]
    found = None
    if callable(getattr(model, "group_matcher", None)):
        found = _from_matcher(model, names, set(head))
    source = "timm group_matcher"
    if found is None:
        found, source = _from_structure(model, head_ids, name_of), "structure"
    stages, stage_names, blocks = found

    def order(group: list[str]) -> list[str]:
        return sorted(group, key=index.__getitem__)

    kept = [(order(s), n) for s, n in zip(stages, stage_names) if s]  # empty groups are dropped
    stages, stage_names = [s for s, _ in kept], [n for _, n in kept]
    blocks = [order(b) for b in blocks if b]
    covered = {n for g in stages for n in g} | set(head)
    missing = [n for n in names if n not in covered]
    if missing:  # cannot happen with the rules above; keep the every-parameter-once promise regardless
        if not stages:
            stages, stage_names, blocks = [[]], ["body"], [[]]
        stages[-1] = sorted(stages[-1] + missing, key=index.__getitem__)
        blocks[-1] = sorted(blocks[-1] + missing, key=index.__getitem__)
    return LayerGroups(stages=stages, stage_names=stage_names, head=head, blocks=blocks,
                       transformer=_is_transformer(model), source=source)
