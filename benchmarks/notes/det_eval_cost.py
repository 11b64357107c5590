# Cost of one detection evaluation pass (record behind benchmarks/RESULTS.md, issue #12 first figures):
# TinySSD forward + post-processing over det-shapes' 300 validation images, then COCOeval through torchmetrics.
# Run from the repo root: .venv/bin/python benchmarks/notes/det_eval_cost.py RUN_DIR/best.pt
import sys, time, torch
torch.set_num_threads(2)
from visionkit.tasks.detect.data import build_det_data, make_det_loader
from visionkit.tasks.detect.models import create_det_model
from visionkit.tasks.detect.task import DetectionTask
from visionkit.tasks.detect.metrics import DetMetrics
b = build_det_data("det-shapes")
dl = make_det_loader(b.val, batch_size=64, train=False, seed=0, device="cpu", input_size=(3,128,128))
ck = torch.load(sys.argv[1], weights_only=False)
m = create_det_model("tinyssd", 5, img_size=128); m.load_state_dict(ck["model"]); m.eval()
m.score_thresh=0.01
task = DetectionTask(5)
met = task.new_metrics()
t=time.perf_counter(); tp=0
for x,y in dl.epoch(0):
    t1=time.perf_counter(); out = task.predict(m, x); tp+=time.perf_counter()-t1
    met.update(out,y)
print("predict", tp, "loop", time.perf_counter()-t, "dets/img", sum(len(p["scores"]) for p in met.preds)/len(met.preds))
t=time.perf_counter(); r=met.compute(); print("compute", time.perf_counter()-t, r)
