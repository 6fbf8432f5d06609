import sys, time, json, subprocess
src = sys.argv[1]
sys.path.insert(0, src)
import torch
from invconv import flows
torch.set_num_threads(1)
out = {}
for preset in ("glow", "inverse-flow"):
    torch.manual_seed(0)
    m = flows.build(preset, (1, 28, 28), levels=2, steps=4, hidden=64).train()
    with torch.no_grad(): m.log_prob(torch.rand(100, 1, 28, 28))
    m.eval(); b = torch.rand(100, 1, 28, 28)
    with torch.no_grad():
        for _ in range(2): m.sample(100); m.log_prob(b)
        ts, tf = [], []
        for _ in range(8):
            t0 = time.perf_counter(); m.sample(100); ts.append(time.perf_counter() - t0)
            t0 = time.perf_counter(); m.log_prob(b); tf.append(time.perf_counter() - t0)
    out[preset] = (round(min(ts) * 1e3, 1), round(min(tf) * 1e3, 1))
print(out)
