# fp32 training-step speed of fastnet widths (record behind benchmarks/RESULTS.md, issue #11 Zen 3 section).
# Run from the repo root: .venv/bin/python benchmarks/notes/fastnet_fp32_speed.py
import time, sys, torch, torch.nn.functional as F
from visionkit.models.fast import FastNet
torch.set_num_threads(2)
def bench(widths, cl, compile_=False, bs=256, steps=12):
    torch.manual_seed(0)
    m = FastNet(widths, (1,1))
    if cl: m = m.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    f = torch.compile(m) if compile_ else m
    x = torch.randn(bs,1,28,28); y = torch.randint(0,10,(bs,))
    if cl: x = x.contiguous(memory_format=torch.channels_last)
    ts=[]
    for i in range(steps+4):
        t=time.perf_counter()
        loss = F.cross_entropy(f(x), y); opt.zero_grad(); loss.backward(); opt.step()
        if i>=4: ts.append(time.perf_counter()-t)
    ms = 1000*sum(ts)/len(ts)
    print(f"{widths} cl={cl} compile={compile_} bs={bs}: {ms:.0f} ms/step  {ms*60000/bs/1000:.1f} s/epoch", flush=True)
for w in [(16,48,96),(16,32,64),(12,32,64),(8,24,48)]:
    for cl in (True, False):
        bench(w, cl)
bench((16,48,96), False, compile_=True)
bench((16,48,96), True, compile_=True)
