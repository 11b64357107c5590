"""Layer groups (visionkit.models.groups): every parameter exactly once, stages ordered input → output, the head is
the classifier, stage names per family, the transformer flag, and the structural walk agreeing with timm's own
group_matcher where both apply. Each model is built once per session (vit_b_16, convnext_tiny and vgg11 are the
big ones; building them takes a few seconds on CPU, grouping takes milliseconds)."""
from __future__ import annotations

import functools

import pytest
import timm
import torch
import torchvision
from torch import nn

import visionkit.models as vm
from visionkit.models.groups import LayerGroups, layer_groups

TV = ["resnet18", "resnet50", "efficientnet_b0", "mobilenet_v2", "mobilenet_v3_small", "convnext_tiny", "vit_b_16",
      "swin_t", "densenet121", "vgg11"]
TIMM = ["resnet18", "efficientnet_b0", "tf_efficientnet_lite0", "mobilenetv3_small_100", "convnext_atto",
        "vit_tiny_patch16_224", "deit_tiny_patch16_224", "swin_tiny_patch4_window7_224"]
OWN = sorted(vm.own_models())
MODELS = [f"tv:{n}" for n in TV] + [f"timm:{n}" for n in TIMM] + [f"own:{n}" for n in OWN]
TRANSFORMERS = {"tv:vit_b_16", "tv:swin_t", "timm:vit_tiny_patch16_224", "timm:deit_tiny_patch16_224",
                "timm:swin_tiny_patch4_window7_224"}

# what a person would call the stages; the structure walk finds them without any per-model names
STAGE_NAMES = {
    "tv:resnet18": ["stem", "layer1", "layer2", "layer3", "layer4"],
    "tv:resnet50": ["stem", "layer1", "layer2", "layer3", "layer4"],
    "tv:efficientnet_b0": ["stem"] + [f"features.{i}" for i in range(1, 8)],
    "tv:mobilenet_v2": ["stem", "features.1", "features.2-3", "features.4-6", "features.7-13", "features.14-17"],
    "tv:mobilenet_v3_small": ["stem", "features.1", "features.2-3", "features.4-8", "features.9-11"],
    "tv:convnext_tiny": ["stem", "features.1", "features.3", "features.5", "features.7"],
    "tv:vit_b_16": ["stem"] + [f"encoder.layers.encoder_layer_{a}-{b}" for a, b in ((0, 2), (3, 5), (6, 8), (9, 11))],
    "tv:swin_t": ["stem", "features.1", "features.3", "features.5", "features.7"],
    "tv:densenet121": ["stem", "features.denseblock1", "features.transition1-denseblock2",
                       "features.transition2-denseblock3", "features.transition3-denseblock4"],
    "tv:vgg11": ["features.0", "features.3", "features.6-8", "features.11-13", "features.16-18", "classifier"],
    "timm:resnet18": ["stem", "layer1", "layer2", "layer3", "layer4"],
    "timm:efficientnet_b0": ["stem"] + [f"blocks.{i}" for i in range(7)],
    "timm:tf_efficientnet_lite0": ["stem"] + [f"blocks.{i}" for i in range(7)],
    "timm:mobilenetv3_small_100": ["stem"] + [f"blocks.{i}" for i in range(5)],
    "timm:convnext_atto": ["stem", "stages.0", "stages.1", "stages.2", "stages.3"],
    "timm:vit_tiny_patch16_224": ["stem", "blocks.0-2", "blocks.3-5", "blocks.6-8", "blocks.9-11"],
    "timm:deit_tiny_patch16_224": ["stem", "blocks.0-2", "blocks.3-5", "blocks.6-8", "blocks.9-11"],
    "timm:swin_tiny_patch4_window7_224": ["stem", "layers.0", "layers.1", "layers.2", "layers.3"],
    "own:lenet": ["features.0", "features.4", "mlp"],
    "own:nin": ["features.0", "features.3", "features.6-7"],
    "own:mobilenet_v1": ["features.0-2", "features.3-6", "features.7-10", "features.11-22", "features.23-26"],
    "own:resnet18_small": ["stem", "layer1", "layer2", "layer3", "layer4"],
    "own:resnet34_small": ["stem", "layer1", "layer2", "layer3", "layer4"],
    "own:fastnet": ["stem", "stages.0", "stages.1"],
    "own:fastnet_wide": ["stem", "stages.0", "stages.1"],
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread_and_cleanup() -> object:
    """Shared 2-core machine: one intra-op thread for the weight initialisation of the big models; the cached models
    (about 1 GB of weights) are dropped when this module is done."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
    _groups.cache_clear()
    _model.cache_clear()


@functools.cache
def _model(spec: str) -> nn.Module:
    source, name = spec.split(":", 1)
    if source == "tv":  # torchvision's own builder (what create_model("tv:...") wraps)
        return torchvision.models.get_model(name, weights=None, num_classes=5)
    if source == "timm":
        return timm.create_model(name, num_classes=5)
    in_chans = vm.own_models()[name].default_cfg.get("input_size", (3,))[0]
    return vm.create_model(name, num_classes=10, in_chans=in_chans)


@functools.cache
def _groups(spec: str) -> LayerGroups:
    return layer_groups(_model(spec))


def _names(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_parameters()]


def _stage_of(g: LayerGroups, param: str) -> str:
    return next(name for name, stage in zip(g.stage_names, g.stages) if param in stage)


def _attention(m: nn.Module) -> bool:
    return isinstance(m, nn.MultiheadAttention) or "Attention" in type(m).__name__


# --------------------------------------------------------------------------------------------- every family
@pytest.mark.parametrize("spec", MODELS)
def test_every_parameter_exactly_once_and_blocks_nest_in_stages(spec):
    model, g = _model(spec), _groups(spec)
    names = _names(model)
    flat_stages = [n for s in g.stages for n in s]
    flat_blocks = [n for b in g.blocks for n in b]
    for flat in (flat_stages + g.head, flat_blocks + g.head):
        assert len(flat) == len(set(flat)) and set(flat) == set(names)
    assert flat_blocks == flat_stages  # blocks are a finer split of the same sequence ...
    cuts = {0}
    for b in g.blocks:
        cuts.add(max(cuts) + len(b))
    ends = 0
    for s in g.stages:  # ... and never straddle a stage boundary
        ends += len(s)
        assert ends in cuts
    assert all(g.stages) and all(g.blocks)  # empty groups are dropped
    assert len(g.stage_names) == len(g.stages) == len(set(g.stage_names))


@pytest.mark.parametrize("spec", MODELS)
def test_stages_run_input_to_output_in_named_parameters_order(spec):
    model, g = _model(spec), _groups(spec)
    index = {n: i for i, n in enumerate(_names(model))}
    firsts = [index[s[0]] for s in g.stages]
    assert firsts == sorted(firsts) and len(set(firsts)) == len(firsts)
    for group in [*g.stages, *g.blocks, g.head]:
        assert [index[n] for n in group] == sorted(index[n] for n in group)
    assert index[g.stages[0][0]] == min(index[n] for s in g.stages for n in s)  # the input side comes first


@pytest.mark.parametrize("spec", MODELS)
def test_head_is_the_classifier(spec):
    model, g = _model(spec), _groups(spec)
    head = vm.get_classifier(model)
    assert g.head == [n for n, p in model.named_parameters() if any(p is q for q in head.parameters())]
    assert g.head and model.get_submodule(g.head_module_name()) is head


@pytest.mark.parametrize("spec", MODELS)
def test_stage_names_counts_and_flags(spec):
    model, g = _model(spec), _groups(spec)
    assert g.stage_names == STAGE_NAMES[spec]
    assert len(g.blocks) >= len(g.stages)
    if not spec.startswith("own:"):  # every ImageNet family
        assert len(g.stages) >= 3
    assert g.transformer is (spec in TRANSFORMERS)
    assert g.source == ("timm group_matcher" if spec.startswith("timm:") else "structure")
    if g.transformer:  # one block group (at least) per transformer block, for layer-wise lr decay
        depth = sum(any(_attention(c) for c in m.children()) for m in model.modules())
        assert depth == 12 and len(g.blocks) >= depth


# ------------------------------------------------------------------------------------------- spot checks
def test_resnets_torchvision_and_timm_alike():
    for spec in ("tv:resnet18", "timm:resnet18"):
        g = _groups(spec)
        assert g.stages[0] == ["conv1.weight", "bn1.weight", "bn1.bias"]
        assert all(n.startswith("layer4.") for n in g.stages[-1]) and g.stage_names[-1] == "layer4"
        assert g.head == ["fc.weight", "fc.bias"] and len(g.blocks) == 9  # stem + 8 basic blocks
    assert len(_groups("tv:resnet50").blocks) == 17  # stem + 16 bottlenecks


def test_final_layers_join_the_last_stage_and_downsamplers_the_next():
    eff = _groups("tv:efficientnet_b0")  # the final 1x1 conv features.8
    assert _stage_of(eff, "features.8.0.weight") == "features.7" and _stage_of(eff, "features.0.0.weight") == "stem"
    mnv2 = _groups("tv:mobilenet_v2")
    assert _stage_of(mnv2, "features.0.0.weight") == "stem" and _stage_of(mnv2, "features.18.0.weight") == "features.14-17"
    mnv3 = _groups("tv:mobilenet_v3_small")  # the Linear before the classifier is body, not head
    assert _stage_of(mnv3, "classifier.0.weight") == "features.9-11" and mnv3.head == ["classifier.3.weight",
                                                                                      "classifier.3.bias"]
    cnx = _groups("tv:convnext_tiny")
    assert _stage_of(cnx, "features.2.1.weight") == "features.3" and _stage_of(cnx, "classifier.0.weight") == "features.7"
    swin = _groups("tv:swin_t")
    assert _stage_of(swin, "features.6.reduction.weight") == "features.7" and _stage_of(swin, "norm.weight") == "features.7"
    dense = _groups("tv:densenet121")
    assert _stage_of(dense, "features.norm0.weight") == "stem"
    assert _stage_of(dense, "features.norm5.weight") == "features.transition3-denseblock4"
    assert len(dense.blocks) == 1 + 58 + 3  # stem, every dense layer (6 + 12 + 24 + 16), the transitions
    vgg = _groups("tv:vgg11")
    assert vgg.stages[-1] == ["classifier.0.weight", "classifier.0.bias", "classifier.3.weight", "classifier.3.bias"]


def test_torchvision_vit_stem_and_last_quarter():
    g = _groups("tv:vit_b_16")
    assert g.stages[0] == ["class_token", "conv_proj.weight", "conv_proj.bias", "encoder.pos_embedding"]
    assert [len(s) for s in g.stages[1:]] == [36, 36, 36, 38]  # 3 encoder layers each; the last has encoder.ln too
    assert "encoder.ln.weight" in g.stages[-1] and g.head == ["heads.head.weight", "heads.head.bias"]
    assert len(g.blocks) == 13  # stem + 12 encoder layers


def test_timm_unmatched_params_join_the_last_stage():
    vit = _groups("timm:vit_tiny_patch16_224")
    assert vit.stages[0] == ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"]
    assert vit.stages[-1][-2:] == ["norm.weight", "norm.bias"] and vit.head == ["head.weight", "head.bias"]
    assert vit.blocks[-1][-2:] == ["norm.weight", "norm.bias"] and len(vit.blocks) == 13
    swin = _groups("timm:swin_tiny_patch4_window7_224")  # timm leaves norm unmatched, next to the head
    assert swin.stages[-1][-2:] == ["norm.weight", "norm.bias"] and swin.head == ["head.fc.weight", "head.fc.bias"]
    cnx = _groups("timm:convnext_atto")  # head.norm is body, head.fc the classifier
    assert cnx.stages[-1][-2:] == ["head.norm.weight", "head.norm.bias"] and cnx.head_module_name() == "head.fc"
    eff = _groups("timm:efficientnet_b0")  # conv_head|bn2 (timm's MATCH_PREV_GROUP) stay in the last stage
    assert {"conv_head.weight", "bn2.weight"} <= set(eff.stages[-1])
    mnv3 = _groups("timm:mobilenetv3_small_100")  # the lone 1x1 conv blocks.5 and conv_head are no stage of their own
    assert _stage_of(mnv3, "blocks.5.0.conv.weight") == _stage_of(mnv3, "conv_head.weight") == "blocks.4"


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_b0", "convnext_atto", "vit_tiny_patch16_224",
                                  "swin_tiny_patch4_window7_224"])
def test_structure_walk_agrees_with_timm_group_matcher(name):
    """The generic walk, run on the same timm model with its group_matcher hidden, finds timm's own stages."""
    model = _model(f"timm:{name}")
    with_matcher = _groups(f"timm:{name}")
    model.group_matcher = None  # an instance attribute shadows the method
    try:
        walked = layer_groups(model)
    finally:
        del model.group_matcher
    assert walked.source == "structure"
    assert walked.stages == with_matcher.stages and walked.stage_names == with_matcher.stage_names
    assert walked.blocks == with_matcher.blocks and walked.head == with_matcher.head


# ------------------------------------------------------------------------------------------------- edges
def test_frozen_parameters_are_grouped_too():
    model = vm.create_model("resnet18_small", num_classes=10)
    before = layer_groups(model)
    model.requires_grad_(False)
    after = layer_groups(model)
    assert after == before and len(after.head) == 2


def test_identity_head_gives_an_empty_head():
    for model in (timm.create_model("convnext_atto", num_classes=0), vm.create_model("tv:resnet18", num_classes=0),
                  vm.create_model("lenet", num_classes=0, in_chans=1)):
        g = layer_groups(model)
        assert g.head == [] and g.head_module_name() == ""
        assert sorted(n for s in g.stages for n in s) == sorted(_names(model))
    assert layer_groups(timm.create_model("convnext_atto", num_classes=0)).stages[-1][-2:] == ["head.norm.weight",
                                                                                               "head.norm.bias"]


def test_visionkit_create_model_and_a_plain_mlp():
    g = layer_groups(vm.create_model("tv:resnet18", num_classes=3))
    assert g.stage_names == STAGE_NAMES["tv:resnet18"] and g.head == ["fc.weight", "fc.bias"]
    mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2))
    g = layer_groups(mlp)
    assert g.head == ["4.weight", "4.bias"] and not g.transformer
    assert [n for s in g.stages for n in s] == ["0.weight", "0.bias", "2.weight", "2.bias"]


def test_compiled_model_falls_back_to_the_structure():
    """torch.compile prefixes every name with _orig_mod., which timm's patterns do not match: the walk still works."""
    g = layer_groups(torch.compile(timm.create_model("resnet18", num_classes=5)))
    assert g.source == "structure" and g.head == ["_orig_mod.fc.weight", "_orig_mod.fc.bias"]
    assert g.stage_names == ["stem"] + [f"_orig_mod.layer{i}" for i in range(1, 5)] and len(g.blocks) == 9
