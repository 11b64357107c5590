import pytest

from visionkit.config import Config, ConfigError, list_recipes, parse_set, resolve_config


def test_defaults_then_recipe_then_overrides():
    cfg = resolve_config(recipe="sgd-cifar", overrides={"optim.lr": 0.05, "train.epochs": 3})
    assert cfg.optim.name == "sgd" and cfg.optim.lr == 0.05 and cfg.train.epochs == 3
    assert cfg.model.name == "resnet18_small" and cfg.recipe == "sgd-cifar"
    assert resolve_config().optim.lr == Config().optim.lr


def test_config_file_and_set(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("optim:\n  name: adam\n  lr: 0.01\naug:\n  scale: [0.5, 1.0]\n")
    cfg = resolve_config(config_file=str(f), overrides=parse_set(["train.ema=true", "sched.milestones=[2, 4]"]))
    assert cfg.optim.name == "adam" and cfg.optim.lr == 0.01 and cfg.aug.scale == (0.5, 1.0)
    assert cfg.train.ema is True and cfg.sched.milestones == [2, 4]


@pytest.mark.parametrize("overrides, words", [
    ({"optim.lrr": 0.1}, "unknown config key 'optim.lrr'"),
    ({"nope.x": 1}, "unknown config key 'nope'"),
    ({"train.epochs": "many"}, "expects int"),
    ({"train.epochs": 2.5}, "expects int"),
    ({"optim.name": "lion"}, "must be one of"),
    ({"data.val_split": 1.5}, "val_split"),
    ({"train.ema": "maybe"}, "expects bool"),
    ({"optim": 3}, "is a section"),
])
def test_bad_keys_and_values_are_refused(overrides, words):
    with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace("[", r"\[")):
        resolve_config(overrides=overrides)


def test_unknown_recipe_and_bad_file(tmp_path):
    with pytest.raises(ConfigError, match="unknown recipe 'zzz'; available: .*default"):
        resolve_config(recipe="zzz")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        resolve_config(config_file=str(bad))
    with pytest.raises(ConfigError, match="not found"):
        resolve_config(config_file=str(tmp_path / "missing.yaml"))


def test_every_recipe_resolves_and_is_described():
    recipes = list_recipes()
    assert {"default", "fast-cpu", "sgd-cifar", "finetune"} <= set(recipes)
    for name, desc in recipes.items():
        assert desc, f"recipe {name} needs a first comment line"
        resolve_config(recipe=name)


def test_roundtrip_through_dict():
    cfg = resolve_config(recipe="default")
    again = resolve_config(base=cfg.to_dict())
    assert again == cfg


@pytest.mark.parametrize("has_bf16", [True, False])
def test_recipe_section_for_cpus_without_bf16(monkeypatch, capsys, has_bf16):
    """fast-cpu's cpu_without_bf16 section narrows fastnet where fp32 is the fast path; the user's keys win."""
    import visionkit.core.runtime as rt
    monkeypatch.setattr(rt, "cpu_has_bf16", lambda: has_bf16)
    cfg = resolve_config(recipe="fast-cpu", overrides={"train.device": "cpu"})
    assert cfg.model.name == "fastnet"
    assert cfg.model.kwargs == ({} if has_bf16 else {"width": 24})
    assert ("no native bf16" in capsys.readouterr().err) is not has_bf16
    if not has_bf16:
        mine = resolve_config(recipe="fast-cpu", overrides={"train.device": "cpu", "model.kwargs.width": 32})
        assert mine.model.kwargs == {"width": 32}
        other = resolve_config(recipe="fast-cpu", overrides={"train.device": "cpu", "model.name": "resnet18_small"})
        assert other.model.kwargs == {}


def test_model_kwargs_from_a_later_layer_add_to_the_recipe_s():
    cfg = resolve_config(recipe="seg-cpu", overrides={"model.kwargs.encoder_kwargs": {"drop_rate": 0.1}})
    assert cfg.model.kwargs == {"decoder_channels": [64, 48, 32, 16, 8], "encoder_kwargs": {"drop_rate": 0.1}}


def test_another_model_does_not_inherit_the_recipe_s_model_kwargs():
    # seg-cpu's U-Net over Lite0 takes decoder_channels; the classic unet would refuse it ("does not accept ...")
    cfg = resolve_config(recipe="seg-cpu", overrides={"model.name": "unet"})
    assert cfg.model.kwargs == {}
    cfg = resolve_config(recipe="seg-cpu", overrides={"model.name": "unet", "model.kwargs.base": 8})
    assert cfg.model.kwargs == {"base": 8}
    same = resolve_config(recipe="seg-cpu", overrides={"model.name": "unet-efficientnet_lite0"})
    assert same.model.kwargs == {"decoder_channels": [64, 48, 32, 16, 8]}
