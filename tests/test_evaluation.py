"""Ensembles and test-time augmentation: the pure pieces exactly, then real checkpoints through the API and the CLI."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import visionkit
from visionkit.config import ConfigError
from visionkit.tasks.classify.evaluate import combine, cross_fit, evaluate_checkpoints, fit_weights, score, tta_views

FAST = {"data.img_size": 28, "data.batch_size": 32, "aug.hflip": 0.0, "model.kwargs": {"width": 16},
        "data.split_seed": 0, "optim.lr": 3e-3, "train.report": False}


# ------------------------------------------------------------------------------------------------ pure functions
def test_tta_views_identity_first_and_shapes():
    x = torch.rand(3, 1, 20, 20)
    assert len(tta_views(x, "none")) == 1 and tta_views(x, "none")[0] is x
    v = tta_views(x, "flip")
    assert len(v) == 2 and torch.equal(v[1], x.flip(3))
    v = tta_views(x, "flip+crops")
    assert len(v) == 10 and all(t.shape == x.shape for t in v)
    assert torch.equal(v[3], v[2].flip(3))  # each crop also mirrored
    # the same scale, shifted: the top-left crop is the image moved 1 px (1/16 of 20 px, rounded) right and down
    assert torch.equal(v[2][..., 1:, 1:], x[..., :-1, :-1]) and torch.equal(v[2][..., 0, 1:], x[..., 0, :-1])
    with pytest.raises(ConfigError, match="flip\\+crops"):
        tta_views(x, "rotate")


def test_combine_mean_weighted_vote():
    p = torch.tensor([[[0.6, 0.4, 0.0]], [[0.2, 0.8, 0.0]], [[0.1, 0.0, 0.9]]])
    assert torch.allclose(combine(p[:2], "mean"), torch.tensor([[0.4, 0.6, 0.0]]))
    assert torch.allclose(combine(p[:2], "weighted", torch.tensor([1.0, 0.0])), p[0])
    # one vote each: the tie is broken by the mean probability (class 0: 0.3, class 1: 0.4, class 2: 0.3)
    assert combine(p, "vote").argmax(1).item() == 1
    # two votes beat any probability
    q = torch.tensor([[[0.51, 0.49]], [[0.51, 0.49]], [[0.0, 1.0]]])
    assert combine(q, "vote").argmax(1).item() == 0 and combine(q, "mean").argmax(1).item() == 1


def test_fit_weights_prefers_the_informative_member():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 4, (400,), generator=g)
    good = torch.full((400, 4), 0.1).scatter_(1, y[:, None], 0.7)
    noise = torch.rand(400, 4, generator=g).softmax(1)
    w = fit_weights(torch.stack([noise, good]), y)
    assert w.sum().item() == pytest.approx(1.0, abs=1e-5) and (w >= 0).all() and w[1] > 0.9


def test_cross_fit_scores_each_half_with_the_other_halfs_weights():
    g = torch.Generator().manual_seed(1)
    y = torch.randint(0, 3, (50,), generator=g)
    probs = torch.rand(2, 50, 3, generator=g).softmax(2)
    out = cross_fit(probs, y, seed=5)
    perm = torch.randperm(50, generator=torch.Generator().manual_seed(5))
    a, b = perm[:25], perm[25:]
    assert torch.allclose(out[b], combine(probs[:, b], "weighted", fit_weights(probs[:, a], y[a])))
    assert torch.allclose(out[a], combine(probs[:, a], "weighted", fit_weights(probs[:, b], y[b])))


def test_score_matches_hand_counts():
    s = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.5, 0.4, 0.1]])
    y = torch.tensor([0, 1, 1])
    r = score(s, y, full=True)
    assert r["acc1"] == pytest.approx(1 / 3) and r["acc5"] == 1.0 and r["n"] == 3
    assert r["loss"] == pytest.approx(-(np.log(0.7) + np.log(0.3) + np.log(0.4)) / 3, rel=1e-5)
    assert r["confusion_matrix"] == [[1, 0, 0], [1, 0, 1], [0, 0, 0]]
    assert "loss" not in score(s, y, probabilities=False)


# ------------------------------------------------------------------------------------------------ real checkpoints
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two digits models differing only in seed, on the same validation split (data.split_seed=0)."""
    base = tmp_path_factory.mktemp("ens")
    return [visionkit.train("digits", "fastnet", epochs=2, seed=s, out=str(base / f"s{s}"), quiet=True,
                            overrides=FAST).dir / "best.pt" for s in (0, 1)]


def test_a_run_directory_means_its_best_checkpoint(runs):
    from visionkit.tasks.classify.evaluate import load_member
    assert load_member(runs[0].parent, "cpu").path == str(runs[0])
    assert visionkit.load(runs[0].parent).members[0].path == str(runs[0])


def test_single_checkpoint_keeps_the_plain_evaluation(runs):
    res = visionkit.evaluate_checkpoint(runs[0], "digits", split="test")
    assert res["members"][0]["acc1"] == res["acc1"] and "ensemble" not in res and "tta_gain" not in res
    assert sum(r["support"] for r in res["per_class"]) == res["n"] and 0 <= res["ece"] <= 1


@pytest.mark.parametrize("method", ["mean", "vote", "weighted"])
def test_ensemble_of_two_seeds(runs, method):
    res = evaluate_checkpoints(runs, "digits", split="test", ensemble=method, tta="flip")
    members = res["members"]
    assert len(members) == 2 and all("tta" in m for m in members)
    ens = res["ensemble"]
    assert ens["method"] == method and set(ens) >= {"plain", "tta"}
    assert res["acc1"] == pytest.approx(ens["tta"]["acc1"])
    assert res["tta_gain"] == pytest.approx(ens["tta"]["acc1"] - ens["plain"]["acc1"])
    # probability averaging of two decent members is not worse than the worse member
    assert ens["plain"]["acc1"] >= min(m["acc1"] for m in members)
    if method == "weighted":
        assert len(ens["weights"]) == 2 and sum(ens["weights"]) == pytest.approx(1, abs=1e-3)
        assert ens["weights_fitted_on"] == "val"
    if method == "vote":
        assert "loss" not in ens["plain"]


def test_weighted_on_the_validation_split_is_scored_out_of_fold(runs):
    res = evaluate_checkpoints(runs, "digits", split="val", ensemble="weighted")
    assert "out of fold" in res["ensemble"]["weights_fitted_on"]


def test_ensembles_with_different_class_lists_are_refused(runs, tmp_path):
    other = visionkit.train("fake", "fastnet", epochs=1, out=str(tmp_path / "fake"), quiet=True, overrides=FAST)
    with pytest.raises(ConfigError, match="classes differ"):
        evaluate_checkpoints([runs[0], other.dir / "best.pt"], "digits", split="test")
    with pytest.raises(ConfigError, match="classes differ"):
        visionkit.load([runs[0], other.dir / "best.pt"])


def _digit_pngs(tmp_path, n=6):
    from sklearn.datasets import load_digits
    d = load_digits()
    paths = []
    for i in range(n):
        p = tmp_path / f"d{i}_{d.target[i]}.png"
        Image.fromarray((d.images[i] * 255 / 16).astype(np.uint8)).resize((28, 28)).save(p)
        paths.append(str(p))
    return paths


def test_predictor_ensemble_and_tta(runs, tmp_path):
    paths = _digit_pngs(tmp_path)
    single = visionkit.load(runs[0]).probabilities(paths)
    mean = visionkit.load(runs, ensemble="mean").probabilities(paths)
    assert torch.allclose(mean.sum(1), torch.ones(len(paths)), atol=1e-4)
    second = visionkit.load(runs[1]).probabilities(paths)
    assert torch.allclose(mean, (single + second) / 2, atol=1e-5)
    flip = visionkit.load(runs[0], tta="flip").probabilities(paths)
    assert not torch.allclose(flip, single) and torch.allclose(flip.sum(1), torch.ones(len(paths)), atol=1e-4)
    out = visionkit.load(runs, ensemble="weighted", tta="flip").predict(paths, topk=2)
    assert len(out) == len(paths) and all(len(r["topk"]) == 2 for r in out)


def test_cli_eval_and_predict_with_two_checkpoints(runs, tmp_path, capsys):
    from visionkit.cli import main  # in-process: three fresh interpreters cost ~25 s of imports
    assert main(["eval", *map(str, runs), "--data", "digits", "--split", "test", "--tta", "flip+crops"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(ln.startswith("ensemble (mean)") for ln in lines) and any("TTA (flip+crops) gain" in ln for ln in lines)
    assert sum(ln.startswith(("s0/best.pt", "s1/best.pt")) for ln in lines) == 2
    assert main(["eval", *map(str, runs), "--data", "digits", "--split", "test", "--format", "json", "--ensemble",
                 "vote"]) == 0
    assert json.loads(capsys.readouterr().out)["ensemble"]["method"] == "vote"
    paths = _digit_pngs(tmp_path, 3)
    assert main(["predict", *map(str, runs), *paths, "--topk", "1", "--format", "json"]) == 0
    assert [x["path"] for x in json.loads(capsys.readouterr().out)] == paths


def test_cli_bad_inputs_are_one_line_errors(runs, tmp_path, capsys):
    from visionkit.cli import main
    not_image = tmp_path / "notes.png"
    not_image.write_text("this is text")
    for argv, words in [(["predict", *runs, not_image], "cannot be read"),
                        (["predict", tmp_path / "cat.png"], "not a checkpoint"),
                        (["predict", runs[0]], "no images given")]:
        assert main(list(map(str, argv))) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ") and words in err, err
