"""The benchmark harness runs and produces complete rows (speed is never asserted).

The scripts of bench/ are run as a user runs them (a subprocess), never
imported: tests do not put bench/ on sys.path.
"""
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
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


def test_ratio_to_cudnn_compares_graph_with_graph_and_eager_with_eager():
    from invconv.benchmarks import add_step_and_cudnn_measures
    rows = [dict(op=op, implementation=impl, device=device, median_ms=ms, diagonal_steps=steps)
            for op, impl, device, ms, steps in [
                ("inv", "invconv-cuda", "cuda", 0.5, 63),
                ("inv", "invconv-cuda-graph", "cuda", 0.3, 63),
                ("inv", "per-diagonal-cuda-graph", "cuda", 0.9, 63),
                ("inv", "invconv-cpu", "cpu", 2.0, 63),
                ("inv_vjp", "invconv-cuda-graph", "cuda", 0.8, 63),
                ("inv_vjp", "invconv-cuda", "cuda", 1.2, 63),
                ("conv", "cudnn-conv2d", "cuda", 0.25, 0),
                ("conv", "cudnn-conv2d-graph", "cuda", 0.05, 0),
                ("conv_vjp", "cudnn-conv2d", "cuda", 0.6, 0)]]   # no vjp graph row
    add_step_and_cudnn_measures(rows)
    by = {(r["op"], r["implementation"]): r for r in rows}
    # graph over cuDNN's graph, eager over cuDNN's eager
    assert by["inv", "invconv-cuda-graph"]["ratio_to_cudnn"] == pytest.approx(0.3 / 0.05)
    assert by["inv", "invconv-cuda-graph"]["cudnn_baseline"] == "cudnn-conv2d-graph"
    assert by["inv", "per-diagonal-cuda-graph"]["ratio_to_cudnn"] == pytest.approx(0.9 / 0.05)
    assert by["inv", "invconv-cuda"]["ratio_to_cudnn"] == pytest.approx(0.5 / 0.25)
    assert by["inv", "invconv-cuda"]["cudnn_baseline"] == "cudnn-conv2d"
    # a host row has no GPU counterpart; a graph row without cuDNN's graph
    # row gets no ratio rather than one over the eager call
    assert by["inv", "invconv-cpu"]["ratio_to_cudnn"] is None
    assert by["inv_vjp", "invconv-cuda-graph"]["ratio_to_cudnn"] is None
    assert by["inv_vjp", "invconv-cuda-graph"]["cudnn_baseline"] is None
    assert by["inv_vjp", "invconv-cuda"]["ratio_to_cudnn"] == pytest.approx(1.2 / 0.6)
    assert by["inv", "invconv-cuda-graph"]["us_per_step"] == pytest.approx(300 / 63)
    assert "ratio_to_cudnn" not in by["conv", "cudnn-conv2d"]


def test_gpu_run_pairs_ratios_with_a_stand_in_timer(monkeypatch):
    # run() as on a GPU, with stand-in implementations and timer (no CUDA
    # here): every ratio is taken over the row timed the same way.
    import types
    from invconv import benchmarks
    monkeypatch.setitem(sys.modules, "cupy", types.SimpleNamespace(asarray=lambda a: a))
    times = {("inv", "invconv-cuda"): 0.40, ("inv", "invconv-cuda-graph"): 0.10,
             ("inv", "invconv-lanes-cuda-graph"): 0.08, ("inv", "invconv-cpu"): 3.0,
             ("conv", "invconv-cuda"): 0.06, ("conv", "invconv-cuda-graph"): 0.01,
             ("conv", "cudnn-conv2d"): 0.05, ("conv", "cudnn-conv2d-graph"): 0.02}

    def stand_in_implementations(op, shape, k, weight, xp_sets, have_gpu, *rest):
        for (row_op, name), ms in times.items():
            if row_op == op:
                fn = (lambda ms: lambda *args: ms)(ms)
                if name.endswith("-graph"):
                    fn = benchmarks.TorchGraphReplay(fn)
                yield name, "cpu" if name.endswith("-cpu") else "cuda", fn, xp_sets["numpy"], None

    class StandInTimer:
        def __call__(self, fn, inputs, **kwargs):
            fn = fn.fn if isinstance(fn, benchmarks.GraphReplay) else fn
            return [fn()] * 5
    monkeypatch.setattr(benchmarks, "implementations", stand_in_implementations)
    monkeypatch.setattr(benchmarks, "GpuTimer", StandInTimer)
    monkeypatch.setattr(benchmarks, "cpu_timer", lambda fn, inputs, **kw: [fn()] * 3)
    monkeypatch.setattr(benchmarks, "peak_bytes", lambda fn, inputs: 0)
    rows = benchmarks.run([(2, 3, 8, 8)], 3, np.float32, True, n_sets=1, repeats=5,
                          budget_s=0.1, dense_limit_bytes=0, skip_reference_above=0)
    by = {(r["op"], r["implementation"]): r for r in rows}
    assert by["inv", "invconv-cuda-graph"]["ratio_to_cudnn"] == pytest.approx(0.10 / 0.02)
    assert by["inv", "invconv-lanes-cuda-graph"]["ratio_to_cudnn"] == pytest.approx(0.08 / 0.02)
    assert by["inv", "invconv-cuda"]["ratio_to_cudnn"] == pytest.approx(0.40 / 0.05)
    assert by["inv", "invconv-cpu"]["ratio_to_cudnn"] is None
    # ratio_to_invconv likewise: graph rows over invconv's graph replay
    assert by["conv", "cudnn-conv2d-graph"]["baseline"] == "invconv-cuda-graph"
    assert by["conv", "cudnn-conv2d-graph"]["ratio_to_invconv"] == pytest.approx(2.0)
    assert by["conv", "cudnn-conv2d"]["baseline"] == "invconv-cuda"
    assert by["inv", "invconv-lanes-cuda-graph"]["ratio_to_invconv"] == pytest.approx(0.8)


def test_gpu_suite_shapes_and_shape_option():
    from invconv.benchmarks import GPU_SHAPES, FLOW_SHAPES, _shape_list
    assert set(FLOW_SHAPES) | {(1, 3, 256, 256), (100, 3, 64, 64), (16, 16, 64, 64),
                               (256, 12, 16, 16), (1, 3, 1024, 1024)} == set(GPU_SHAPES)
    assert _shape_list("100x1x28x28, 1x3x1024x1024") == [(100, 1, 28, 28), (1, 3, 1024, 1024)]
    import argparse
    for bad in ("100x1x28", "0x1x2x2", "axbxcxd", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            _shape_list(bad)


def test_schedule_tables_put_each_schedule_beside_the_ops_it_changes():
    from invconv.benchmarks import schedule_family, schedule_markdown
    assert schedule_family("smem:4") == "conv" and schedule_family("lanes:2") == "solve"
    assert schedule_family("direct") == "conv" and schedule_family("diagonal") == "solve"
    shape = [100, 48, 8, 8]
    rows = [dict(op=op, implementation=impl, median_ms=ms, shape=shape, us_per_step=ms * 1e3 / 15)
            for op, impl, ms in [("inv", "invconv-cuda-graph", 0.4),
                                 ("inv", "invconv-lanes-cuda-graph", 0.2),
                                 ("conv", "invconv-cuda-graph", 0.1),
                                 ("conv", "invconv-smem:4-cuda-graph", 0.05),
                                 ("conv", "cudnn-conv2d", 0.2),   # eager: not the yardstick
                                 ("conv", "cudnn-conv2d-graph", 0.04)]]
    solve, conv = schedule_markdown(rows).split("Convolution schedules")
    assert "Solve schedules" in solve and "lanes ms" in solve and "smem" not in solve
    table = [line for line in conv.splitlines() if line.startswith("| ")]
    assert table[0] == "| op | shape (B,C,H,W) | default ms | default / cuDNN | smem:4 ms |"
    # default / cuDNN = 0.1 / 0.04 (graph over graph), the schedule over the default = 0.05 / 0.1
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


def _device_check_dry_run(tmp_path, **env):
    out = tmp_path / "check"
    proc = subprocess.run(["bash", str(ROOT / "bench" / "device_check.sh"), str(out)],
                          env=dict(os.environ, INVCONV_CHECK_DRY_RUN="1", **env),
                          capture_output=True, text=True, timeout=120)
    return proc, out


def test_device_check_runs_correctness_at_once_then_timings_alone(tmp_path):
    # The script's structure, with each command recorded instead of run.
    from invconv._kernels import parse_schedule
    proc, out = _device_check_dry_run(tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    commands = [line.split("\t") for line in (out / "dry_run.txt").read_text().splitlines()]
    phases = [phase for phase, _, _ in commands]
    # every correctness job is started before the first timing, and (the
    # script waits for them) recorded before it
    assert phases == sorted(phases, key=["correctness", "timings"].index)
    by_name = {name: command for _, name, command in commands}
    assert "-m gpu" in by_name["gpu_tests"] and "tests/test_gpu.py" in by_name["gpu_tests"]
    for tool in ("memcheck", "racecheck"):
        assert by_name[tool].startswith(f"compute-sanitizer --tool {tool}")
        assert by_name[tool].endswith("bench/sanitize_ops.py")
    timings = [name for phase, name, _ in commands if phase == "timings"]
    assert timings[:2] == ["bench_ops", "bench_models"] and timings[-1] == "host_profile"
    if (ROOT / "bench" / "overhead.py").exists():
        assert "--device cuda" in by_name["call_cost"]
    ops = by_name["bench_ops"]
    assert "--device-check" in ops and f"--out {out}/ops.json" in ops
    # every schedule named is one the kernels still have
    named = ops.split("--schedules ")[1].split()[0].split(",")
    named += [c.split("_SCHEDULE=")[1].split()[0] for c in by_name.values() if "_SCHEDULE=" in c]
    assert {"diagonal", "lanes", "diagonal:2", "direct", "smem:4"} <= set(named)
    for schedule in named:
        parse_schedule(schedule)
    for name in by_name:
        if "[" in name:
            assert name.split("[")[1].rstrip("]") in named
    # the JSON of the steps, and the table of steps printed last
    steps = json.loads((out / "steps.json").read_text())["steps"]
    assert [s["step"] for s in steps if s["phase"] == "timings"] == timings
    assert {s["result"] for s in steps} == {"PASS"}
    assert proc.stdout.rstrip().splitlines()[-1].startswith("| all | whole call |")
    assert (out / "summary.md").read_text().rstrip().endswith(
        proc.stdout.rstrip().splitlines()[-1])
    assert "-n 6" in (ROOT / "bench" / "device_check.sh").read_text()   # xdist, where installed


def test_device_check_holds_its_time_budget(tmp_path):
    # With no time left every step is recorded as skipped, the summary is
    # still written, and the call fails.
    proc, out = _device_check_dry_run(tmp_path, INVCONV_CHECK_BUDGET_S="10")
    assert proc.returncode != 0
    steps = json.loads((out / "steps.json").read_text())["steps"]
    assert steps and {s["result"] for s in steps} == {"SKIPPED (no time left)"}
    assert not (out / "dry_run.txt").exists()
    assert "| all | whole call | 0 of" in (out / "summary.md").read_text()
