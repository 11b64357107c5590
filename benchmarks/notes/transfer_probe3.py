# Screening script kept as the record behind benchmarks/RESULTS.md (issue #11, ants/bees linear-probe variants);
# run from the repo root: .venv/bin/python benchmarks/notes/transfer_probe3.py SEEDS K   (needs ../shared/data/hymenoptera)
"""Scratch: linear-probe variants on repeated stratified splits of ants/bees (features cached once per split)."""
import random, sys, time, json
from pathlib import Path
import torch, torch.nn.functional as F
from PIL import Image
from torchvision.transforms import v2 as T
from visionkit.models import create_model
torch.set_num_threads(2)
SRC = Path("/work/shared/data/hymenoptera/train")
classes = sorted(p.name for p in SRC.iterdir() if p.is_dir())
files = {c: sorted((SRC / c).iterdir()) for c in classes}
imgs = {}
def load(p):
    if p not in imgs: imgs[p] = Image.open(p).convert("RGB")
    return imgs[p]
m = create_model("efficientnet_lite0", num_classes=2, pretrained=True).eval()
head = m.get_classifier()
norm = [T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize([0.5]*3, [0.5]*3)]
I = T.InterpolationMode.BICUBIC
tf = {
 "eval224": T.Compose([T.Resize(256, I), T.CenterCrop(224)] + norm),
 "whole256": T.Compose([T.Resize((256, 256), I)] + norm),
 "eval288": T.Compose([T.Resize(292, I), T.CenterCrop(256)] + norm),
 "rrc08": T.Compose([T.RandomResizedCrop(224, (0.08, 1), interpolation=I), T.RandomHorizontalFlip()] + norm),
 "rrc35": T.Compose([T.RandomResizedCrop(224, (0.35, 1), interpolation=I), T.RandomHorizontalFlip()] + norm),
}
MAPS = {}
@torch.no_grad()
def feats(paths, t, flip=False, keep=None):
    out, maps = [], []
    for i in range(0, len(paths), 32):
        x = torch.stack([t(load(p)) for p in paths[i:i+32]])
        if flip: x = x.flip(3)
        f = m.forward_features(x)
        if keep: maps.append(f)
        out.append(m.forward_head(f, pre_logits=True))
    if keep: MAPS[keep] = torch.cat(maps)
    return torch.cat(out)
def region_pool(maps, g, min_frac=0.4):
    B, C, H, W = maps.shape
    out = torch.empty(B, C)
    for b in range(B):
        h = int(torch.randint(max(1, round(H * min_frac)), H + 1, (1,), generator=g)); w = int(torch.randint(max(1, round(W * min_frac)), W + 1, (1,), generator=g))
        y = int(torch.randint(0, H - h + 1, (1,), generator=g)); x = int(torch.randint(0, W - w + 1, (1,), generator=g))
        out[b] = maps[b, :, y:y+h, x:x+w].mean((1, 2))
    return out
def train_head_regions(maps, Y, epochs=30, lr=3e-3, wd=1e-4, bs=64, seed=0, p_full=0.5, min_frac=0.4):
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(maps.shape[1], 2); torch.manual_seed(seed); lin.reset_parameters()
    opt = torch.optim.AdamW(lin.parameters(), lr=lr, weight_decay=wd)
    steps = epochs * -(-len(maps) // bs); sch = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    full = maps.mean((2, 3))
    for e in range(epochs):
        perm = torch.randperm(len(maps), generator=g)
        for i in range(0, len(maps), bs):
            idx = perm[i:i+bs]
            X = region_pool(maps[idx], g, min_frac)
            keep = torch.rand(len(idx), generator=g) < p_full
            X[keep] = full[idx][keep]
            loss = F.cross_entropy(lin(X), Y[idx])
            opt.zero_grad(); loss.backward(); opt.step(); sch.step()
    return lin
def train_head(X, Y, epochs=30, lr=3e-3, wd=1e-4, bs=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(X.shape[1], 2); torch.manual_seed(seed); lin.reset_parameters()
    opt = torch.optim.AdamW(lin.parameters(), lr=lr, weight_decay=wd)
    steps = epochs * -(-len(X) // bs); sch = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for e in range(epochs):
        perm = torch.randperm(len(X), generator=g)
        for i in range(0, len(X), bs):
            idx = perm[i:i+bs]; loss = F.cross_entropy(lin(X[idx]), Y[idx])
            opt.zero_grad(); loss.backward(); opt.step(); sch.step()
    return lin
res = {}
K = int(sys.argv[2]) if len(sys.argv) > 2 else 8
for seed in [int(s) for s in sys.argv[1].split(",")]:
    rng = random.Random(seed); tr, te = [], []
    for ci, c in enumerate(classes):
        fs = list(files[c]); rng.shuffle(fs); n = round(len(fs) * 0.3)
        te += [(f, ci) for f in fs[:n]]; tr += [(f, ci) for f in fs[n:]]
    trp, trY = [p for p, _ in tr], torch.tensor([y for _, y in tr]); tep, teY = [p for p, _ in te], torch.tensor([y for _, y in te])
    t0 = time.time()
    F_ = {}
    for k in ("eval224", "whole256"):
        F_[k] = feats(trp, tf[k], keep=k); F_["te_" + k] = feats(tep, tf[k]); F_["tef_" + k] = feats(tep, tf[k], flip=True)
    print(f"split {seed}: features in {time.time()-t0:.0f}s (n_train {len(trp)}, n_test {len(tep)})", flush=True)
    def score(lin, ev, tta):
        with torch.no_grad():
            lo = lin(F_["te_" + ev]).softmax(1)
            if tta: lo = lo + lin(F_["tef_" + ev]).softmax(1)
        return (lo.argmax(1) == teY).float().mean().item()
    n = len(trY); sub = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[: int(n * 0.8)]
    for ev in ("eval224", "whole256"):
        for name, idx in (("all", torch.arange(n)), ("80%", sub)):
            for pf, mf in ((0.5, 0.4), (0.25, 0.5), (0.5, 0.6)):
                lin = train_head_regions(MAPS[ev][idx], trY[idx], 30, 3e-3, 1e-4, bs=64, seed=seed, p_full=pf, min_frac=mf)
                for tta in (False, True):
                    res.setdefault(f"{ev} {name} regions p{pf} m{mf} tta{int(tta)}", []).append(score(lin, ev, tta))
            for bs in (128, 32):
                lin = train_head(F_[ev][idx], trY[idx], 30, 3e-3, 1e-4, bs=bs, seed=seed)
                for tta in (False, True):
                    res.setdefault(f"{ev} {name} bs{bs} tta{int(tta)}", []).append(score(lin, ev, tta))
    json.dump(res, open(f"/tmp/probe_res_{sys.argv[1]}.json", "w"))
import statistics
rows = sorted(res.items(), key=lambda kv: -statistics.mean(kv[1]))
for k, v in rows[:25]:
    print(f"{statistics.mean(v):.4f} min {min(v):.4f} {k}  {[round(x,3) for x in v]}")
for k, v in rows:
    if k.startswith("eval224 80%"): print("CURRENT-ish", f"{statistics.mean(v):.4f}", k, v)
