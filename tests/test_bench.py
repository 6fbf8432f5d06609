"""The benchmark harness runs and produces complete rows (speed is never asserted)."""
import json

import pytest

from invconv import cli

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
    baselines = [r for r in rows if r["implementation"] == r["baseline"]]
    assert baselines and all(r["ratio_to_invconv"] == 1.0 for r in baselines)
    assert md.read_text().count("\n|") >= len(rows)


def test_model_timings_quick(tmp_path):
    torch = pytest.importorskip("torch")  # noqa: F841
    import pathlib
    import sys
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "bench"))
    import bench_models
    out = tmp_path / "models.json"
    bench_models.main(["--quick", "--out", str(out), "--device", "cpu"])
    rows = json.loads(out.read_text())["rows"]
    assert {r["model"] for r in rows} == {"inverse-flow", "finc-flow", "glow"}
    assert all(r["sampling_ms_100"] > 0 and r["parameters"] > 0 for r in rows)


def test_scaling_sweeps_quick(tmp_path):
    import importlib.util
    import pathlib
    import sys
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "bench"))
    import bench_sweeps
    out, png, md = tmp_path / "sweeps.json", tmp_path / "sweeps.png", tmp_path / "sweeps.md"
    bench_sweeps.main(["--quick", "--out", str(out), "--plot", str(png), "--markdown", str(md)])
    rows = json.loads(out.read_text())["rows"]
    assert {r["sweep"] for r in rows} == {"image size", "kernel size", "batch size", "channels"}
    assert all(r["median_ms"] > 0 and r["peak_bytes"] > 0 for r in rows)
    points = {(r["sweep"], r["value"], r["op"]) for r in rows}
    table = [line for line in md.read_text().splitlines() if line.startswith("| ")]
    assert len(table) == 1 + len(points)          # header + one line per sweep point and op
    assert all(line.count("|") == table[0].count("|") for line in table)
    if importlib.util.find_spec("matplotlib") is not None:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_readme_quotes_the_results_it_names():
    # The README's performance tables are printed by bench/readme_tables.py
    # from a committed results folder; they must match that folder exactly.
    import contextlib
    import io
    import pathlib
    import re
    import sys
    root = pathlib.Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "bench"))
    import readme_tables
    readme = (root / "README.md").read_text()
    folder = re.search(r"python3 bench/readme_tables\.py (\S+?)`", readme).group(1)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        readme_tables.main([str(root / folder)])
    tables = [t.strip() for t in out.getvalue().split("\n\n") if t.strip()]
    assert len(tables) == 3
    for table in tables:
        assert table in readme, table.splitlines()[2]
