"""The benchmark harness runs and produces complete rows (speed is never asserted).

The scripts of bench/ are run as a user runs them (a subprocess), never
imported: tests do not put bench/ on sys.path.
"""
import json
import os
import pathlib
import subprocess
import sys

import pytest

import invconv
from invconv import cli

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_script(script, *args, timeout=600):
    """Run ``bench/<script>`` with the invconv under test importable; return stdout."""
    src = str(pathlib.Path(invconv.__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / script), *map(str, args)],
                          env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout

REQUIRED = {"op", "implementation", "shape", "dtype", "device", "median_ms", "q1_ms", "q3_ms",
            "ratio_to_invconv", "min_bytes", "diagonal_steps"}


def test_quick_bench_through_the_cli(tmp_path):
    out, md = tmp_path / "ops.json", tmp_path / "ops.md"
    cli.main(["bench", "--quick", "--out", str(out), "--markdown", str(md)])
    rows = json.loads(out.read_text())["rows"]
    assert {r["op"] for r in rows} == {"inv", "inv_vjp", "conv", "conv_vjp"}
    for r in rows:
        assert REQUIRED <= r.keys()
        assert r["median_ms"] > 0 and r["ratio_to_invconv"] > 0
    # Each ratio is this row's median over its baseline row's median (same op and shape).
    medians = {(r["op"], str(r["shape"]), r["implementation"]): r["median_ms"] for r in rows}
    others = [r for r in rows if r["implementation"] != r["baseline"]]
    assert others
    for r in rows:
        base = medians[(r["op"], str(r["shape"]), r["baseline"])]
        assert r["ratio_to_invconv"] == pytest.approx(r["median_ms"] / base, rel=1e-12)
    assert md.read_text().count("\n|") >= len(rows)
    for r in rows:   # the inverse rows carry issue 12's measures
        if r["op"].startswith("inv"):
            assert r["us_per_step"] == pytest.approx(r["median_ms"] * 1e3 / r["diagonal_steps"])


def test_ratio_to_cudnn_pairs_each_solve_with_its_convolution():
    from invconv.benchmarks import add_step_and_cudnn_measures
    rows = [dict(op=op, implementation=impl, median_ms=ms, diagonal_steps=steps)
            for op, impl, ms, steps in [("inv", "invconv-cuda-graph", 0.3, 63),
                                        ("inv_vjp", "invconv-cuda-graph", 0.8, 63),
                                        ("conv", "cudnn-conv2d", 0.1, 0),
                                        ("conv_vjp", "cudnn-conv2d", 0.5, 0)]]
    add_step_and_cudnn_measures(rows)
    assert rows[0]["ratio_to_cudnn"] == pytest.approx(3.0)
    assert rows[1]["ratio_to_cudnn"] == pytest.approx(1.6)
    assert rows[0]["us_per_step"] == pytest.approx(300 / 63)
    assert "ratio_to_cudnn" not in rows[2]
    add_step_and_cudnn_measures(rows[:2])   # no cuDNN rows: no ratio
    assert rows[0]["ratio_to_cudnn"] is None


def test_schedule_tables_put_each_schedule_beside_the_ops_it_changes():
    from invconv.benchmarks import schedule_family, schedule_markdown
    assert schedule_family("smem:4") == "conv" and schedule_family("tiled:8x8") == "solve"
    shape = [100, 48, 8, 8]
    rows = [dict(op=op, implementation=impl, median_ms=ms, shape=shape, us_per_step=ms * 1e3 / 15)
            for op, impl, ms in [("inv", "invconv-cuda-graph", 0.4),
                                 ("inv", "invconv-lanes-cuda-graph", 0.2),
                                 ("conv", "invconv-cuda-graph", 0.1),
                                 ("conv", "invconv-smem:4-cuda-graph", 0.05),
                                 ("conv", "cudnn-conv2d", 0.04)]]
    solve, conv = schedule_markdown(rows).split("Convolution schedules")
    assert "Solve schedules" in solve and "lanes ms" in solve and "smem" not in solve
    table = [line for line in conv.splitlines() if line.startswith("| ")]
    assert table[0] == "| op | shape (B,C,H,W) | default ms | default / cuDNN | smem:4 ms |"
    # default / cuDNN = 0.1 / 0.04, the schedule over the default = 0.05 / 0.1
    assert table[1] == "| conv | (100, 48, 8, 8) | 0.100 | 2.50 | 0.050 (0.50) |"
    solve_rows = [line for line in solve.splitlines() if line.startswith("| inv ")]
    assert solve_rows == ["| inv | (100, 48, 8, 8) | 0.400 | 26.67 | 10.00 | 0.200 (0.50) |"]
    assert schedule_markdown(rows[2:3]) == ""


def test_bench_refuses_an_unknown_schedule(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "--quick", "--out", "x.json", "--schedules", "fastest"])
    assert "INVCONV_SOLVE_SCHEDULE must be" in capsys.readouterr().err


def test_model_timings_quick(tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "models.json"
    run_script("bench_models.py", "--quick", "--out", out, "--device", "cpu")
    rows = json.loads(out.read_text())["rows"]
    assert {r["model"] for r in rows} == {"inverse-flow", "finc-flow", "glow", "emerging",
                                          "snf-small", "snf-small-emerging"}
    assert all(r["sampling_ms_100"] > 0 and r["parameters"] > 0 for r in rows)
    assert {r["method"] for r in rows} == {"eager"}      # nothing is captured on the CPU
    assert all(r["sampling_launches"] > 0 and r["forward_launches"] > 0 for r in rows)


def test_layer_breakdown_quick(tmp_path):
    pytest.importorskip("torch")
    out, md = tmp_path / "breakdown.json", tmp_path / "breakdown.md"
    run_script("bench_breakdown.py", "--quick", "--runs", "1", "--presets", "inverse-flow",
               "emerging", "--out", out, "--markdown", md, "--device", "cpu")
    rows = json.loads(out.read_text())["rows"]
    for direction in ("sampling", "density"):
        sel = {r["layer"]: r for r in rows if r["direction"] == direction
               and r["model"] == "inverse-flow"}
        assert {"InvConv2d (k×k)", "spline", "ActNorm", "1×1 conv", "coupling (affine)",
                "coupling network", "split", "squeeze", "other"} <= sel.keys()
        # Exclusive times: nested calls (the coupling's network) are not counted
        # twice, so the layers never add up to more than the pass.
        assert all(r["ms"] >= 0 for r in sel.values())
        layers = sum(r["ms"] for name, r in sel.items() if not name.startswith(("pass", "other")))
        assert layers <= sel["pass, timed per layer"]["ms"]
        assert sel["InvConv2d (k×k)"]["calls_per_pass"] == 8
    # An Emerging convolution's own masked convolutions are booked to it.
    assert not any(r["layer"] == "MaskedConv2d (k×k)" for r in rows if r["model"] == "emerging")
    assert "| layer type |" in md.read_text()


def test_scaling_sweeps_quick(tmp_path):
    import importlib.util
    out, png, md = tmp_path / "sweeps.json", tmp_path / "sweeps.png", tmp_path / "sweeps.md"
    run_script("bench_sweeps.py", "--quick", "--out", out, "--plot", png, "--markdown", md)
    rows = json.loads(out.read_text())["rows"]
    assert {r["sweep"] for r in rows} == {"image size", "kernel size", "batch size", "channels"}
    assert all(r["median_ms"] > 0 and r["peak_bytes"] > 0 for r in rows)
    points = {(r["sweep"], r["value"], r["op"]) for r in rows}
    table = [line for line in md.read_text().splitlines() if line.startswith("| ")]
    assert len(table) == 1 + len(points)          # header + one line per sweep point and op
    assert all(line.count("|") == table[0].count("|") for line in table)
    assert "us / step" in table[0]
    if importlib.util.find_spec("matplotlib") is not None:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_readme_quotes_the_results_it_names():
    # bench/README.md's GPU tables are printed by bench/readme_tables.py
    # from a committed results folder; they must match that folder exactly.
    import re
    readme = (ROOT / "bench" / "README.md").read_text()
    folder = re.search(r"python3 bench/readme_tables\.py (\S+?)`", readme).group(1)
    out = run_script("readme_tables.py", ROOT / folder)
    tables = [t.strip() for t in out.split("\n\n") if t.strip()]
    assert len(tables) == 3
    for table in tables:
        assert table in readme, table.splitlines()[2]


def test_paper_tables_from_a_trained_run(tmp_path):
    pytest.importorskip("torch")
    runs = tmp_path / "runs"
    cli.main(["train", "--model", "snf-small", "--max-steps", "2", "--epochs", "1",
              "--batch-size", "50", "--limit-train", "100", "--limit-test", "50",
              "--device", "cpu", "--out", str(runs / "snf-small")])
    out, md = tmp_path / "tables.json", tmp_path / "tables.md"
    stdout = run_script("paper_tables.py", runs, "--out", out, "--markdown", md)
    assert "inverse-flow: no run" in stdout          # absent runs are named, not invented
    row, = json.loads(out.read_text())["rows"]
    metrics = json.loads((runs / "snf-small" / "metrics.json").read_text())
    assert row["test_bpd"] == metrics["history"][-1]["test_bpd"]
    assert row["steps"] == 2 and row["batch_size"] == 50 and row["test_images"] == 50
    assert row["command"].startswith("invconv train --model snf-small --dataset mnist")
    assert "--max-steps 2" in row["command"]
    t = row["timing"]["eager"]
    assert 0 < t["sampling_100"]["min_ms"] <= t["sampling_100"]["median_ms"]
    assert "| Table 4 | snf-small |" in md.read_text()
