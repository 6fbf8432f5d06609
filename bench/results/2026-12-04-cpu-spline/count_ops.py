import sys, json, torch
from torch.profiler import profile, ProfilerActivity
from invconv import flows
torch.set_num_threads(1)
def count(fn):
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    evs = [e for e in prof.events() if e.name.startswith("aten::") or e.name.startswith("invconv")]
    # top-level ops only: an op called inside another op is not a launch of its own
    top = 0
    names = {}
    for e in prof.events():
        if (e.name.startswith("aten::") or e.name.startswith("invconv")) and (e.cpu_parent is None or not (e.cpu_parent.name.startswith("aten::") or e.cpu_parent.name.startswith("invconv"))):
            top += 1; names[e.name] = names.get(e.name, 0) + 1
    return top, names
res = {}
for preset in ("inverse-flow","finc-flow","glow","emerging","snf-small","snf-small-emerging"):
    torch.manual_seed(0)
    if preset.startswith("snf"): m = flows.build(preset,(1,28,28))
    else: m = flows.build(preset,(1,28,28),levels=2,steps=4,hidden=64)
    m.train()
    with torch.no_grad(): m.log_prob(torch.rand(100,1,28,28))
    m.eval()
    batch = torch.rand(100,1,28,28)
    with torch.no_grad():
        m.sample(100); m.log_prob(batch)
        s, sn = count(lambda: m.sample(100))
        d, dn = count(lambda: m.log_prob(batch))
    res[preset] = dict(sampling=s, density=d)
    print(preset, s, d, flush=True)
    if len(sys.argv) > 2 and preset == "inverse-flow":
        print(sorted(sn.items(), key=lambda kv: -kv[1])[:30])
json.dump(res, open(sys.argv[1], "w"), indent=1)
