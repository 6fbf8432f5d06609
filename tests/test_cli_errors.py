"""The command line's user errors: one line on stderr and exit status 2, before any work.

None of these needs a dataset: each mistake is caught before data is loaded.
"""
import argparse
import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
from invconv import cli  # noqa: E402


def run_main(capsys, *argv):
    """cli.main(argv) expected to fail: (exit status, stderr lines), stdout empty."""
    with pytest.raises(SystemExit) as exc:
        cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    assert captured.out == ""
    return exc.value.code, captured.err.strip().splitlines()


def assert_one_line_error(capsys, *argv, says):
    code, lines = run_main(capsys, *argv)
    assert code == cli.EXIT_USAGE, (code, lines)
    assert len(lines) == 1, lines
    assert "error" in lines[0]
    for text in ([says] if isinstance(says, str) else says):
        assert text in lines[0], lines[0]
    return lines[0]


# --------------------------------------------------------------------------
# argument ranges (argparse)

TRAIN = ["train", "--out", "never-created"]


@pytest.mark.parametrize("argv, says", [
    (TRAIN + ["--batch-size", "-5"], "--batch-size"),
    (TRAIN + ["--batch-size", "0"], "--batch-size"),
    (TRAIN + ["--batch-size", "ten"], "--batch-size"),
    (TRAIN + ["--epochs", "0"], "--epochs"),
    (TRAIN + ["-K", "0"], "-K"),
    (TRAIN + ["-L", "0"], "-L"),
    (TRAIN + ["--hidden", "0"], "--hidden"),
    (TRAIN + ["--kernel-size", "0"], "--kernel-size"),
    (TRAIN + ["--lr", "0"], "--lr"),
    (TRAIN + ["--lr", "nan"], "--lr"),
    (TRAIN + ["--clip", "-1"], "--clip"),
    (TRAIN + ["--logit", "0.5"], "--logit"),
    (TRAIN + ["--temperature", "-0.1"], "--temperature"),
    (TRAIN + ["--max-steps", "0"], "--max-steps"),
    (TRAIN + ["--limit-train", "0"], "--limit-train"),
    (TRAIN + ["--limit-test", "0"], "--limit-test"),
    (TRAIN + ["--checkpoint-every", "-1"], "--checkpoint-every"),
    (TRAIN + ["--lr-decay-epochs", "0"], "--lr-decay-epochs"),
    (TRAIN + ["--seed", "-1"], "--seed"),
    (TRAIN + ["--resume", "--overwrite"], "--overwrite"),
    (TRAIN + ["--model", "realnvp"], "--model"),
    (["train"], "--out"),
    (["sample", "--checkpoint", "c.pt", "--out", "g.png", "--n", "0"], "--n"),
    (["sample", "--checkpoint", "c.pt", "--out", "g.png", "--seed", "-2"], "--seed"),
    (["evaluate", "--checkpoint", "c.pt", "--batch-size", "0"], "--batch-size"),
    (["evaluate", "--checkpoint", "c.pt", "--limit-test", "-1"], "--limit-test"),
    (["classify", "--epochs", "0"], "--epochs"),
    (["classify", "--batch-size", "0"], "--batch-size"),
    (["classify", "--limit-train", "0"], "--limit-train"),
    ([], "COMMAND"),
])
def test_out_of_range_options_are_one_line_errors(capsys, tmp_path, monkeypatch, argv, says):
    monkeypatch.chdir(tmp_path)
    assert_one_line_error(capsys, *argv, says=says)
    assert not (tmp_path / "never-created").exists()


def test_bad_device_is_a_one_line_error(capsys, tmp_path):
    assert_one_line_error(capsys, "train", "--device", "gpu7", "--out", tmp_path / "run",
                          says="--device gpu7")
    if not torch.cuda.is_available():
        assert_one_line_error(capsys, "train", "--device", "cuda", "--out", tmp_path / "run",
                              says=["--device cuda", "no CUDA device"])


# --------------------------------------------------------------------------
# checkpoint files

def _bad_checkpoints(tmp_path):
    """name -> (path, what the error must say)"""
    full = tmp_path / "full.pt"
    torch.save({"model": {"w": torch.ones(4096)}, "config": {}}, full)
    blob = full.read_bytes()
    (tmp_path / "truncated.pt").write_bytes(blob[:len(blob) // 2])
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    torch.save(torch.ones(3), tmp_path / "tensor.pt")
    torch.save({"conv.weight": torch.ones(3)}, tmp_path / "state_dict.pt")
    (tmp_path / "empty_dir").mkdir()
    return {
        "missing": (tmp_path / "nothing.pt", "no such file"),
        "directory without a checkpoint": (tmp_path / "empty_dir", "directory without"),
        "empty": (tmp_path / "empty.pt", "empty"),
        "text": (tmp_path / "notes.txt", "not a checkpoint"),
        "truncated": (tmp_path / "truncated.pt", "truncated or damaged"),
        "a tensor": (tmp_path / "tensor.pt", "not an invconv training checkpoint"),
        "a bare state_dict": (tmp_path / "state_dict.pt", "not an invconv training checkpoint"),
        "incomplete config": (full, "not an invconv training checkpoint"),
    }


@pytest.mark.parametrize("command", ["evaluate", "sample"])
def test_bad_checkpoint_files_are_one_line_errors(capsys, tmp_path, command):
    for name, (path, says) in _bad_checkpoints(tmp_path).items():
        extra = ["--out", tmp_path / "grid.png"] if command == "sample" else []
        line = assert_one_line_error(capsys, command, "--checkpoint", path, *extra,
                                     says=["--checkpoint", says])
        assert str(path) in line, name
    assert not (tmp_path / "grid.png").exists()


@pytest.mark.parametrize("command", ["evaluate", "sample"])
def test_a_checkpoint_from_before_the_first_step_is_a_one_line_error(capsys, tmp_path,
                                                                    command):
    # What Ctrl-C right after `invconv train` starts leaves: ActNorm never initialised.
    from invconv import flows
    model = flows.build("glow", (1, 8, 8), levels=1, steps=1, hidden=4)
    run = tmp_path / "run"
    run.mkdir()
    torch.save(dict(format=cli.CHECKPOINT_FORMAT, model=model.state_dict(), config=dict(
        model="glow", dataset="mnist", input_shape=[1, 8, 8],
        kwargs=dict(levels=1, steps=1, hidden=4))), run / cli.CHECKPOINT)
    extra = ["--out", tmp_path / "grid.png"] if command == "sample" else []
    assert_one_line_error(capsys, command, "--checkpoint", run, *extra,
                          says=["--checkpoint", "before its first training step", "--resume"])
    assert not (tmp_path / "grid.png").exists()


def test_resume_from_a_bad_checkpoint_is_a_one_line_error(capsys, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / cli.CHECKPOINT).write_bytes(b"")
    assert_one_line_error(capsys, "train", "--out", run, "--resume", says=["--resume", "empty"])


class _WritesAMarker:
    """Unpickling this opens (so creates) ``path`` for writing: code run by loading."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_checkpoint_carrying_code_is_refused_without_running_it(capsys, tmp_path):
    marker = tmp_path / "marker"
    evil = tmp_path / "run" / cli.CHECKPOINT
    evil.parent.mkdir()
    torch.save({"model": {}, "config": {"model": _WritesAMarker(marker)}}, evil)
    for argv in (["evaluate", "--checkpoint", evil],
                 ["sample", "--checkpoint", evil, "--out", tmp_path / "grid.png"],
                 ["sample", "--checkpoint", evil.parent, "--out", tmp_path / "grid.png"],
                 ["train", "--out", evil.parent, "--resume"]):
        assert_one_line_error(capsys, *argv, says=["refused", "could run code"])
        assert not marker.exists(), argv
    # The payload is live: an unrestricted load does run it.
    torch.load(evil, weights_only=False)
    assert marker.exists()


# --------------------------------------------------------------------------
# output paths and used run directories

def test_out_naming_a_file_is_a_one_line_error(capsys, tmp_path):
    (tmp_path / "file").write_text("x")
    assert_one_line_error(capsys, "train", "--out", tmp_path / "file",
                          says=["--out", "a file, not a directory"])


def test_sample_out_in_a_missing_directory_or_a_directory(capsys, tmp_path):
    torch.save(torch.ones(1), tmp_path / "c.pt")   # never read: the output is checked first
    assert_one_line_error(capsys, "sample", "--checkpoint", tmp_path / "c.pt",
                          "--out", tmp_path / "no" / "such" / "grid.png",
                          says=["--out", "does not exist"])
    assert_one_line_error(capsys, "sample", "--checkpoint", tmp_path / "c.pt",
                          "--out", tmp_path, says=["--out", "a directory"])
    assert not (tmp_path / "no").exists()


def test_resume_of_nothing_is_an_error(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    for out in (tmp_path / "empty", tmp_path / "absent"):
        assert_one_line_error(capsys, "train", "--out", out, "--resume",
                              says=["--resume", "no", cli.CHECKPOINT])
    assert not (tmp_path / "absent").exists()
    assert list((tmp_path / "empty").iterdir()) == []


def test_a_mistake_found_after_out_is_made_leaves_no_empty_run_directory(capsys, tmp_path):
    assert_one_line_error(capsys, "train", "--out", tmp_path / "run", "--data-root",
                          tmp_path / "no-data", says="MNIST")
    (tmp_path / "kept").mkdir()
    assert_one_line_error(capsys, "train", "--out", tmp_path / "kept", "--data-root",
                          tmp_path / "no-data", says="MNIST")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"]


def test_ctrl_c_before_training_starts_leaves_no_empty_run_directory(capsys, tmp_path,
                                                                   monkeypatch):
    def interrupted(name):
        raise KeyboardInterrupt    # as when Ctrl-C lands while torch is being imported
    monkeypatch.setattr(cli, "_device", interrupted)
    code, lines = run_main(capsys, "train", "--out", tmp_path / "run")
    assert code == cli.EXIT_INTERRUPTED and lines == ["invconv train: aborted"]
    assert list(tmp_path.iterdir()) == []


def test_a_used_out_is_not_overwritten_without_overwrite(capsys, tmp_path):
    for name in (cli.CHECKPOINT, cli.METRICS):
        run = tmp_path / name
        run.mkdir()
        (run / name).write_bytes(b"an earlier run")
        assert_one_line_error(capsys, "train", "--out", run,
                              says=["already holds a run", "--resume", "--overwrite"])
        assert (run / name).read_bytes() == b"an earlier run"


@pytest.mark.parametrize("command", [["demo"], ["sample", "--checkpoint", "c.pt"]])
def test_an_empty_out_is_a_one_line_error_that_writes_nothing(capsys, tmp_path, monkeypatch,
                                                              command):
    monkeypatch.chdir(tmp_path)
    assert_one_line_error(capsys, *command, "--out", "", says=["--out", "empty"])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv, says", [
    (["--kernel-size", "0"], "--kernel-size"),
    (["--kernel-size", "three"], "--kernel-size"),
    (["--out", "{missing}/ops.json"], "--out"),
    (["--out", "{tmp}"], "--out"),
    (["--out", ""], "--out"),
    (["--out", "{tmp}/ops.json", "--markdown", "{missing}/ops.md"], "--markdown"),
    ([], "--out"),
])
def test_bench_mistakes_are_one_line_errors_before_any_timing(capsys, tmp_path, argv, says):
    argv = [a.format(tmp=tmp_path, missing=tmp_path / "no" / "such") for a in argv]
    if "--out" not in argv and argv:
        argv += ["--out", str(tmp_path / "ops.json")]
    assert_one_line_error(capsys, "bench", "--quick", *argv, says=says)
    assert list(tmp_path.iterdir()) == []


def test_bench_interrupted_is_one_line_and_status_130(capsys, tmp_path, monkeypatch):
    from invconv import benchmarks

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(benchmarks, "run", interrupted)
    code, lines = run_main(capsys, "bench", "--quick", "--out", tmp_path / "ops.json")
    assert code == cli.EXIT_INTERRUPTED and lines == ["invconv bench: aborted"]


@pytest.mark.parametrize("command", [["train", "--out", "{tmp}/run"], ["classify"],
                                     ["evaluate", "--checkpoint", "c.pt"],
                                     ["sample", "--checkpoint", "c.pt", "--out", "g.png"]])
def test_commands_needing_torch_say_how_to_install_it(capsys, tmp_path, monkeypatch, command):
    # As after the Quick start's NumPy-only install.
    real_find_spec = cli.importlib.util.find_spec
    monkeypatch.setattr(cli.importlib.util, "find_spec",
                        lambda name, *a: None if name == "torch" else real_find_spec(name, *a))
    assert_one_line_error(capsys, *[a.format(tmp=tmp_path) for a in command],
                          says=["needs PyTorch", "invconv[torch]"])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("failure", [
    MemoryError("Unable to allocate 74.5 GiB for an array with shape (100000, 100000)"),
    RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't "
                 "allocate memory: you tried to allocate 156800000000 bytes."),
])
def test_sizes_too_large_for_memory_are_a_one_line_error(capsys, tmp_path, monkeypatch,
                                                         failure):
    def allocate(size):
        raise failure
    monkeypatch.setattr(cli, "_demo_images", allocate)
    assert_one_line_error(capsys, "demo", "--size", "100000", "--out", tmp_path / "d.png",
                          says=["out of memory", "--size"])


def test_other_runtime_errors_are_not_reported_as_memory(tmp_path, monkeypatch):
    def broken(size):
        raise RuntimeError("a bug")
    monkeypatch.setattr(cli, "_demo_images", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["demo", "--out", str(tmp_path / "d.png")])


# --------------------------------------------------------------------------
# --version, python -m invconv, help text

def test_version_and_python_dash_m():
    from invconv import __version__
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [os.path.dirname(os.path.dirname(cli.__file__)), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "invconv", "--version"], capture_output=True,
                          text=True, env=env, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == f"invconv {__version__}"
    proc = subprocess.run([sys.executable, "-m", "invconv", "sample", "--n", "0"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert proc.stderr.startswith("invconv sample: error:")


def _subparsers(parser):
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def test_every_option_has_help_that_shows_its_default():
    parser = cli._parser()
    commands = _subparsers(parser)
    assert set(commands) >= {"train", "evaluate", "sample", "classify"}
    for name, sub in commands.items():
        if name == "bench":           # parsed by invconv.benchmarks
            continue
        formatter = sub._get_formatter()
        for action in sub._actions:
            if action.dest == "help":
                continue
            text = formatter._get_help_string(action)
            assert text and text.strip(), (name, action.option_strings)
            assert action.required or "default" in text, (name, action.option_strings, text)
        assert "(default: " in sub.format_help()


def test_help_exits_zero(capsys):
    for argv in (["--help"], ["train", "--help"], ["sample", "--help"]):
        with pytest.raises(SystemExit) as exc:
            cli.main(argv)
        assert exc.value.code == 0
    assert "--checkpoint-every" in capsys.readouterr().out


# --------------------------------------------------------------------------
# checkpoints of earlier versions

def test_format_1_checkpoints_still_load(tmp_path):
    # Format 1 recorded every model option the CLI had, also those the preset
    # ignored: an snf-small run was 3 x 3 layers whatever -K and -L said, and
    # the CLI's default turned its learned diagonal off.
    from invconv import flows
    model = flows.InverseFlow((1, 8, 8), levels=3, steps=3, conv="inverse", spline=True,
                              coupling=False, learn_diagonal=False, split=False,
                              squeeze_first=False)
    kwargs = dict(levels=2, steps=4, hidden=64, kernel_size=3, logit=None,
                  learn_diagonal=False)
    torch.save(dict(model=model.state_dict(), config=dict(
        model="snf-small", dataset="mnist", input_shape=(1, 8, 8), kwargs=kwargs)),
        tmp_path / "old.pt")
    loaded, _ = cli._load_checkpoint(str(tmp_path / "old.pt"), torch.device("cpu"))
    assert loaded.config == model.config
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_a_captured_runs_optimizer_state_resumes_eagerly():
    # A checkpoint of `train --captured` holds Adam's state with capturable=True
    # (step counters as float32 tensors on the parameters' device); resumed
    # without --captured, on the CPU, Adam would refuse its first step.
    p = torch.nn.Parameter(torch.ones(3))
    captured = torch.optim.Adam([p], lr=0.1, capturable=True)
    captured.state[p] = {"step": torch.tensor(5.0), "exp_avg": torch.zeros(3),
                         "exp_avg_sq": torch.zeros(3)}
    state = captured.state_dict()
    eager = torch.optim.Adam([p], lr=0.1)
    eager.load_state_dict(state)
    p.grad = torch.ones(3)
    with pytest.raises(AssertionError, match="capturable=True"):
        eager.step()                    # what the CLI met before _set_capturable
    eager.load_state_dict(state)
    cli._set_capturable(eager, False)
    assert eager.param_groups[0]["capturable"] is False
    eager.step()
    assert float(eager.state[p]["step"]) == 6.0 and eager.state[p]["step"].device.type == "cpu"
    cli._set_capturable(eager, True)
    assert eager.state[p]["step"].dtype == torch.float32
