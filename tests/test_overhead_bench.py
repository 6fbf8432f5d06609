"""bench/overhead.py (the call-cost benchmark) runs and reports complete rows;
its speed is never asserted."""
import json

import pytest

pytest.importorskip("torch")
from test_bench import run_script  # noqa: E402


def test_call_cost_bench_quick(tmp_path):
    out, md = tmp_path / "overhead.json", tmp_path / "overhead.md"
    run_script("overhead.py", "--quick", "--training", "--out", out, "--markdown", md)
    report = json.loads(out.read_text())
    rows = report["rows"]
    ops = {r["op"] for r in rows}
    for op in ("array conv2d", "array inv_conv2d", "array conv2d_vjp", "array inv_conv2d_vjp",
               "torch conv2d", "torch inv_conv2d", "torch inv_conv2d fwd+bwd",
               "torch inv_conv2d fwd+bwd new weight"):
        assert op in ops
    by_key = {(tuple(r["shape"]), r["op"]): r for r in rows}
    for r in rows:
        assert r["us"] > 0
        if r["yardstick"] is None:
            assert r["op"].startswith("F.conv2d") and r["ratio"] is None
        else:   # each ratio divides by the eager F.conv2d row of its own shape and kind
            base = by_key[(tuple(r["shape"]), r["yardstick"])]
            assert ("fwd+bwd" in base["op"]) == ("fwd+bwd" in r["op"] or "vjp" in r["op"])
            assert ("new weight" in base["op"]) == ("new weight" in r["op"])
            assert r["ratio"] == pytest.approx(r["us"] / base["us"])
    layers = {layer["layer"]: layer["us"] for layer in report["layers"]}
    assert layers["total: invconv.torch.inv_conv2d"] > 0
    assert {r["preset"] for r in report["training_steps"]} == {"inverse-flow", "glow"}
    assert "ratio to glow" in md.read_text()
