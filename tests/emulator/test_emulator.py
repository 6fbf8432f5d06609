"""Tests of the CPU emulator of CUDA kernels (invconv.emulator)."""
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import invconv.emulator
from invconv.emulator import EmulatedKernel, EmulatedModule, _module
from invconv.emulator.racecheck import run_race_check, tsan_runtime

KERNELS = Path(__file__).with_name("kernels")
BASICS = KERNELS / "basics.cu"
NAMES = ["block_sum<float>", "block_sum<double>", "write_indices", "atomic_count<float>",
         "atomic_count<double>", "read_unwritten<float>", "read_unwritten<double>",
         "read_unwritten<unsigned>", "early_exit", "votes", "shift_nosync", "trap_if", "scalars", "ticket_chain"]

CTYPES = {np.float32: "float", np.float64: "double"}

pytestmark = pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++").split()[0]) is None,
                                reason="needs a C++ compiler")


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory):
    """A private compile cache, so that each run builds (and tests) afresh."""
    path = tmp_path_factory.mktemp("emulator-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("INVCONV_EMULATOR_CACHE", str(path))
        mp.delenv("INVCONV_EMULATOR_RACE_CHECK", raising=False)
        mp.delenv("INVCONV_EMULATOR_ENGINE", raising=False)
        yield path


@pytest.fixture(scope="module", params=["fibers", "threads"])
def basics(request, cache):
    return EmulatedModule(path=BASICS, name_expressions=NAMES, engine=request.param)


def is_fibers(module):
    return module.engine == "fibers"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("threads", [1, 7, 32, 33, 1024])
def test_block_sum_awkward_sizes(basics, dtype, threads):
    blocks = 37 if is_fibers(basics) or threads < 1024 else 3
    rng = np.random.default_rng(threads)
    x = rng.integers(-50, 50, size=blocks * threads - 5).astype(dtype)  # exact sums
    partial = np.full(blocks, np.nan, dtype)
    k = basics.get_function(f"block_sum<{CTYPES[dtype]}>")
    k((blocks,), (threads,), (x, partial, np.int32(x.size)),
      shared_mem=threads * np.dtype(dtype).itemsize)
    expected = np.concatenate([x, np.zeros(5, dtype)]).reshape(blocks, threads).sum(axis=1)
    np.testing.assert_array_equal(partial, expected)


@pytest.mark.parametrize("grid,block", [((3, 2, 2), (4, 3, 2)), ((2, 3), (5, 1, 3)), (5, (2, 2, 2)),
                                        ((1, 1, 3), (1, 1, 64))])
def test_indices(basics, grid, block):
    g = (grid,) if isinstance(grid, int) else grid
    g, b = np.array(g + (1,) * (3 - len(g))), np.array(block)
    out = np.full((g.prod(), b.prod(), 8), 0xDEAD, np.uint32)
    basics.get_function("write_indices")(grid, block, (out,))
    # Linear orders: x fastest, then y, then z, for blocks and threads alike.
    bz, by, bx = np.unravel_index(np.arange(g.prod()), g[::-1])
    tz, ty, tx = np.unravel_index(np.arange(b.prod()), b[::-1])
    for k, v in enumerate((tx, ty, tz)):
        assert (out[:, :, k] == v[None, :]).all()
    for k, v in enumerate((bx, by, bz)):
        assert (out[:, :, 3 + k] == v[:, None]).all()
    assert (out[:, :, 6] == b.prod()).all() and (out[:, :, 7] == g.prod()).all()


@pytest.mark.parametrize("dtype,name", [(np.float32, "float"), (np.float64, "double")])
def test_atomics_exact(basics, dtype, name):
    acc, icount, ucount = np.zeros(1, dtype), np.zeros(1, np.int32), np.zeros(1, np.uint64)
    blocks, threads, reps = 6, 128, 20
    basics.get_function(f"atomic_count<{name}>")(blocks, threads, (acc, icount, ucount, np.int32(reps)))
    n = blocks * threads * reps
    assert acc[0] == n and icount[0] == n and ucount[0] == n


@pytest.mark.parametrize("dtype,name", [(np.float32, "float"), (np.float64, "double"),
                                        (np.uint32, "unsigned")])
def test_poison_every_block(basics, dtype, name):
    blocks, threads = 5, 64
    outs = [np.zeros(blocks * threads, dtype), np.zeros(blocks * threads, dtype),
            np.zeros(blocks * threads, np.float32)]
    basics.get_function(f"read_unwritten<{name}>")(blocks, threads, tuple(outs),
                                                   shared_mem=threads * np.dtype(dtype).itemsize)
    for out in outs:  # static template, dynamic, static in an inline device function
        if out.dtype.kind == "f":
            assert np.isnan(out).all()
        assert (out.view(np.uint8) == 0xFF).all()
    assert basics.static_shared_bytes >= 64 * (4 + 8 + 4 + 4)


@pytest.mark.parametrize("threads", [1, 2, 5, 64, 100, 1024])
def test_early_return_does_not_hang(basics, threads):
    blocks = 4
    out = np.full((blocks, threads), np.nan, np.float32)
    start = time.monotonic()
    basics.get_function("early_exit")(blocks, threads, (out,))
    assert time.monotonic() - start < 20
    t = np.arange(threads)
    for b in range(blocks):
        expected = np.where(t % 3 == 1, t + b, np.where(t + 3 < threads, t + 3, t) + b)
        expected = np.where(t % 3 == 0, np.nan, expected)
        np.testing.assert_array_equal(out[b], expected)


@pytest.mark.parametrize("threads", [1, 3, 200, 1024])
def test_syncthreads_count_and_or(basics, threads):
    blocks = 3
    out = np.zeros((blocks, threads, 3), np.int32)
    basics.get_function("votes")(blocks, threads, (out,))
    for b in range(blocks):
        assert (out[b, :, 0] == (threads + 2) // 3).all()
        assert (out[b, :, 1] == int(threads <= 1000)).all()
        assert (out[b, :, 2] == int(b < threads)).all()


def test_fibers_expose_missing_barrier(cache):
    # Fibers run even blocks forwards, odd ones backwards: a read of a
    # neighbour's unsynchronised write sees poison in one of the two.
    mod = EmulatedModule(path=BASICS, name_expressions=NAMES, engine="fibers")
    out = np.zeros((2, 32), np.float32)
    mod.get_function("shift_nosync")(2, 32, (out,))
    np.testing.assert_array_equal(out[0], np.maximum(np.arange(32) - 1, 0))
    assert np.isnan(out[1, 1:]).all()


def test_scalar_arguments(basics):
    out = np.zeros(7)
    pair = np.array((-3, 2.5), dtype=[("a", "<i4"), ("b", "<f4")])[()]
    basics.get_function("scalars")(1, 1, (out, np.float32(1.5), np.float64(-2.25), np.int32(-7),
                                          np.int64(2**40), np.uint32(4000000000), pair))
    np.testing.assert_array_equal(out, [1.5, -2.25, -7, 2**40, 4000000000, -3, 2.5])


def test_struct_arguments_as_one_element_arrays(basics):
    # CuPy passes a struct by value as a one-element host array; so does the emulator.
    out = np.zeros(7)
    pair = np.array([(-3, 2.5)], dtype=[("a", "<i4"), ("b", "<f4")])
    scalars = (out, np.float32(1.5), np.float64(-2.25), np.int32(-7), np.int64(2**40),
               np.uint32(4000000000))
    basics.get_function("scalars")(1, 1, (*scalars, pair))
    np.testing.assert_array_equal(out[5:], [-3, 2.5])
    with pytest.raises(TypeError, match="8-byte struct and needs a one-element array"):
        basics.get_function("scalars")(1, 1, (*scalars, np.concatenate([pair, pair])))
    with pytest.raises(TypeError, match="8-byte struct and needs a one-element array"):
        basics.get_function("scalars")(1, 1, (*scalars, np.zeros(1, np.int32)))


@pytest.mark.parametrize("order", ["forward", "reverse"])
def test_blocks_waiting_on_earlier_tickets(basics, order, monkeypatch):
    # Blocks run one after another, in blockIdx order or (on request) the
    # reverse; tickets from an atomic counter follow the run order either way,
    # so a chain of waits on earlier tickets never spins, and a wait on a
    # later one fails at once instead of hanging.
    if order == "reverse":
        monkeypatch.setenv("INVCONV_EMULATOR_BLOCK_ORDER", "reverse")
    k = basics.get_function("ticket_chain")
    n = 6
    counter, flags, ran = np.zeros(1, np.int32), np.zeros(n, np.int32), np.full(n, -1, np.int32)
    k(n, 5, (counter, flags, ran, np.int32(0)))
    expect = np.arange(n) if order == "forward" else np.arange(n)[::-1]
    np.testing.assert_array_equal(ran, expect)
    assert counter[0] == n and flags.all()
    counter[:], flags[:] = 0, 0
    with pytest.raises(RuntimeError, match="no block that ran before it made true"):
        k(n, 5, (counter, flags, ran, np.int32(1)))


def test_kernel_exception_becomes_runtime_error(basics):
    k = basics.get_function("trap_if")
    k(3, 4, (np.int32(0),))
    with pytest.raises(RuntimeError, match="__trap"):
        k(3, 4, (np.int32(1),))
    k(3, 4, (np.int32(0),))  # the module still works


@pytest.mark.parametrize("grid,block,shared_mem,match", [
    (1, 1025, 0, "block dimension x is 1025"),
    (1, (1, 1, 65), 0, "block dimension z is 65"),
    (1, (32, 32, 2), 0, "2048 threads"),
    (0, 32, 0, "grid dimension x is 0"),
    ((1, 0), 32, 0, "grid dimension y is 0"),
    (1, (32, 0), 0, "block dimension y is 0"),
    ((1, 65536), 32, 0, "grid dimension y is 65536"),
    (2**31, 32, 0, "grid dimension x"),
    (1, 32, 48 * 1024 + 1, "shared_mem is 49153 bytes"),
])
def test_launch_limits(basics, grid, block, shared_mem, match):
    x, partial = np.zeros(32, np.float32), np.zeros(1, np.float32)
    with pytest.raises(ValueError, match=match):
        basics.get_function("block_sum<float>")(grid, block, (x, partial, np.int32(32)),
                                                shared_mem=shared_mem)


def test_dynamic_shared_opt_in(basics):
    k = basics.get_function("block_sum<double>")
    assert k.max_threads_per_block == 1024
    assert k.attributes["max_dynamic_shared_size_bytes"] == 48 * 1024
    assert k.attributes["shared_size_bytes"] == basics.static_shared_bytes
    x, partial = np.ones(64), np.zeros(1)
    with pytest.raises(ValueError):
        k.max_dynamic_shared_size_bytes = 228 * 1024
    k.max_dynamic_shared_size_bytes = 100 * 1024
    k(1, 64, (x, partial, np.int32(64)), shared_mem=100 * 1024)
    assert partial[0] == 64


def test_argument_errors(basics):
    k = basics.get_function("block_sum<float>")
    x, p, n = np.zeros(4, np.float32), np.zeros(1, np.float32), np.int32(4)
    with pytest.raises(TypeError, match="takes 3 arguments, got 2"):
        k(1, 4, (x, p))
    with pytest.raises(TypeError, match="4-byte integer scalar, got int64"):
        k(1, 4, (x, p, np.int64(4)))
    with pytest.raises(TypeError, match="4-byte integer scalar, got float32"):
        k(1, 4, (x, p, np.float32(4)))
    with pytest.raises(TypeError, match="needs a NumPy scalar.*got int"):
        k(1, 4, (x, p, 4))
    with pytest.raises(TypeError, match="needs a NumPy scalar.*got an array"):
        k(1, 4, (x, p, np.array([4], np.int32)))
    with pytest.raises(TypeError, match="pointer and needs a numpy.ndarray.*list"):
        k(1, 4, ([0.0] * 4, p, n))
    with pytest.raises(TypeError, match="pointer and needs a numpy.ndarray"):
        k(1, 4, (n, p, n))
    with pytest.raises(TypeError, match="points to a 4-byte floating-point, got an array of float64"):
        k(1, 4, (x.astype(np.float64), p, n))
    swapped = x.astype(x.dtype.newbyteorder())  # same values, other byte order
    with pytest.raises(TypeError, match="argument 0 is an array of >f4 in non-native byte order"):
        k(1, 4, (swapped, p, n))
    fake_gpu_array = type("ndarray", (), {"__module__": "cupy"})()
    with pytest.raises(TypeError, match="cupy.ndarray"):
        k(1, 4, (fake_gpu_array, p, n))


def test_unsupported_features_fail_at_compile_time(cache):
    code = textwrap.dedent("""
        extern "C" __global__ void k(float* x) {
          x[threadIdx.x] = __shfl_down_sync(0xffffffffu, x[threadIdx.x], 1);
        }""")
    with pytest.raises(RuntimeError, match="warp shuffles are not supported by the emulator"):
        EmulatedKernel(code, "k")
    code = '#include <cooperative_groups.h>\nextern "C" __global__ void k() {}\n'
    with pytest.raises(RuntimeError, match="cooperative groups are not supported"):
        EmulatedKernel(code, "k")


def test_compile_errors_carry_compiler_output(cache):
    with pytest.raises(RuntimeError, match="compilation failed(.|\n)*no_such_thing"):
        EmulatedKernel('extern "C" __global__ void k() { no_such_thing(); }', "k")


def test_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("INVCONV_EMULATOR_CACHE", str(tmp_path / "cache"))
    (tmp_path / "value.h").write_text("#define VALUE 3\n")
    src = tmp_path / "k.cu"
    src.write_text('#include "value.h"\nextern "C" __global__ void k(int* o) { o[0] = VALUE; }\n')

    def run():
        mod = EmulatedModule(path=src)  # no name_expressions: get_function adds it
        out = np.zeros(1, np.int32)
        mod.get_function("k")(1, 1, (out,))
        return mod, out[0]

    count = _module.compile_count
    first, value = run()
    assert value == 3 and _module.compile_count == count + 1
    mtime = first.library_path.stat().st_mtime_ns
    second, value = run()
    assert value == 3 and _module.compile_count == count + 1
    assert second.library_path == first.library_path
    assert second.library_path.stat().st_mtime_ns == mtime
    (tmp_path / "value.h").write_text("#define VALUE 4\n")  # an included header
    third, value = run()
    assert value == 4 and _module.compile_count == count + 2
    assert third.library_path != first.library_path
    src.write_text(src.read_text().replace("o[0] =", "o[0] = 10 +"))
    _, value = run()
    assert value == 14 and _module.compile_count == count + 3
    EmulatedModule(path=src, name_expressions=["k"])  # same source and names: cached
    assert _module.compile_count == count + 3
    # Source text (headers from -I) instead of a path: a module of its own.
    k = EmulatedKernel(src.read_text(), "k", options=("-I", str(tmp_path), "-DUNUSED=1"))
    out = np.zeros(1, np.int32)
    k(1, 1, (out,))
    assert out[0] == 14 and _module.compile_count == count + 4


CACHED_KERNEL = """
import numpy as np
from invconv.emulator import EmulatedKernel, _module
k = EmulatedKernel('extern "C" __global__ void k(int* o) { o[0] = 3; }', "k")
out = np.zeros(1, np.int32)
k(1, 1, (out,))
print(int(out[0]), _module.compile_count)
"""


def test_damaged_cache_entries_are_rebuilt(tmp_path):
    # Each load runs in a child process: a library mapped here and then
    # truncated would crash pytest itself, and dlopen in this process would
    # hand back the copy it already has instead of reading the cache.
    cache = tmp_path / "cache"
    env = dict(os.environ, INVCONV_EMULATOR_CACHE=str(cache),
               PYTHONPATH=os.pathsep.join(filter(None, [
                   str(Path(invconv.emulator.__file__).parents[2]), os.environ.get("PYTHONPATH")])))

    def load(what):
        proc = subprocess.run([sys.executable, "-c", CACHED_KERNEL], env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"{what}: exit {proc.returncode}\n{proc.stderr}"
        value, compiled = map(int, proc.stdout.split())
        assert value == 3, what
        return compiled

    assert load("first build") == 1
    assert load("cache hit") == 0
    manifest, = cache.glob("*.json")
    library, = cache.glob("*.so")

    def truncate():
        data = library.read_bytes()
        library.write_bytes(data[:len(data) // 2])  # the ELF header still reads fine

    def flip_a_byte():
        data = bytearray(library.read_bytes())
        data[len(data) // 2] ^= 0xFF
        library.write_bytes(bytes(data))

    def rewrite_manifest(text):
        return lambda: manifest.write_text(text)

    damages = {
        "truncated library": truncate,
        "library of the right size, other bytes": flip_a_byte,
        "missing library": library.unlink,
        "truncated manifest": lambda: manifest.write_text(manifest.read_text()[:20]),
        "manifest of the wrong shape": rewrite_manifest("[1, 2]"),
        "manifest naming a file outside the cache": rewrite_manifest(json.dumps(
            dict(json.loads(manifest.read_text()), library="../elsewhere.so"))),
        "manifest without a library hash": rewrite_manifest(json.dumps(
            {k: v for k, v in json.loads(manifest.read_text()).items() if k != "sha256"})),
    }
    for what, damage in damages.items():
        damage()
        assert load(what) == 1, f"{what}: not rebuilt"
        assert library.exists() and load(f"after {what}") == 0, f"{what}: rebuilt entry not used"


def one_line_error(match, code='extern "C" __global__ void k(int* o) { o[0] = 1; }'):
    """Build `code` and return the RuntimeError's message, checked to be one line."""
    with pytest.raises(RuntimeError, match=match) as info:
        EmulatedKernel(code, "k")
    error, message = info.value, str(info.value)
    chained = error.__cause__ or (error.__context__ and not error.__suppress_context__)
    assert "\n" not in message and not chained, message  # no second traceback
    return message


@pytest.mark.parametrize("cxx, match", [
    ("true", "CXX='true' exited 0 but wrote no library"),
    ("/nonexistent/c++", "cannot run the C\\+\\+ compiler CXX='/nonexistent/c\\+\\+': No such file"),
    ("no-such-compiler-here", "cannot run the C\\+\\+ compiler CXX='no-such-compiler-here'"),
    ('"g++', "CXX='\"g\\+\\+' is not a valid command line"),
])
def test_compiler_problems_name_cxx(cache, monkeypatch, cxx, match):
    monkeypatch.setenv("CXX", cxx)
    one_line_error(match)


def test_race_check_without_a_compiler_is_one_line(monkeypatch):
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    with pytest.raises(RuntimeError, match="CXX='/nonexistent/c\\+\\+': No such file"):
        tsan_runtime()
    src = str(Path(invconv.emulator.__file__).parents[2])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-m", "invconv.emulator.racecheck", "-c", "pass"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "racecheck: cuemu: cannot run the C++ compiler CXX='/nonexistent/c++'" in proc.stderr


def test_a_failing_compiler_without_output_is_named(cache, monkeypatch):
    monkeypatch.setenv("CXX", "false")
    with pytest.raises(RuntimeError, match="compilation failed(.|\n)*CXX='false' exited with "
                                           "status 1 and printed nothing"):
        EmulatedKernel('extern "C" __global__ void k(int* o) { o[0] = 2; }', "k")


def test_cache_path_problems_name_the_setting(tmp_path, monkeypatch):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory")
    monkeypatch.setenv("INVCONV_EMULATOR_CACHE", str(a_file))
    one_line_error(r"emulator cache .*a-file \(INVCONV_EMULATOR_CACHE\): it is a file")
    monkeypatch.setenv("INVCONV_EMULATOR_CACHE", str(a_file / "cache"))
    one_line_error(r"\(INVCONV_EMULATOR_CACHE\): a component of the path is a file")
    assert a_file.read_text() == "not a directory"
    if sys.platform.startswith("linux") and Path("/sys/kernel").is_dir():
        # sysfs takes no new directories, not even from root.
        monkeypatch.setenv("INVCONV_EMULATOR_CACHE", "/sys/invconv-emulator-cache")
        one_line_error(r"emulator cache /sys/invconv-emulator-cache \(INVCONV_EMULATOR_CACHE\)")


def test_read_only_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("INVCONV_EMULATOR_CACHE", str(cache))
    code = 'extern "C" __global__ void k(int* o) { o[0] = 5; }'
    EmulatedKernel(code, "k")
    count = _module.compile_count
    cache.chmod(0o555)
    try:
        k = EmulatedKernel(code, "k")  # what it holds is still served
        out = np.zeros(1, np.int32)
        k(1, 1, (out,))
        assert out[0] == 5 and _module.compile_count == count
        if os.access(cache, os.W_OK):
            pytest.skip("this user (root?) can write to a read-only directory")
        one_line_error(r"\(INVCONV_EMULATOR_CACHE\): Permission denied",
                       code.replace("5", "6"))
    finally:
        cache.chmod(0o755)


def test_relative_cache_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("INVCONV_EMULATOR_CACHE", "relative-cache")
    k = EmulatedKernel('extern "C" __global__ void k(int* o) { o[0] = 7; }', "k")
    out = np.zeros(1, np.int32)
    k(1, 1, (out,))
    assert out[0] == 7 and k.module.library_path.parent == tmp_path / "relative-cache"


def test_race_check_needs_the_runner(cache):
    from invconv.emulator import tsan_loaded
    if tsan_loaded():
        pytest.skip("this process already runs under ThreadSanitizer")
    with pytest.raises(RuntimeError, match="racecheck"):
        EmulatedModule(path=KERNELS / "race.cu", name_expressions=["reduce<true>"], race_check=True)


RACE_SCRIPT = """
import sys
import numpy as np
from invconv.emulator import EmulatedModule
mod = EmulatedModule(path=sys.argv[1], name_expressions=["reduce<true>", "reduce<false>"])
x = np.arange(128, dtype=np.float32)
out = np.zeros(2, np.float32)
mod.get_function(sys.argv[2])(2, 64, (x, out, np.int32(x.size)))
assert sys.argv[2] == "reduce<false>" or (out == x.reshape(2, 64).sum(axis=1)).all(), out
"""


def test_race_check(tmp_path, cache):
    try:
        tsan_runtime()
    except RuntimeError:
        pytest.skip("no ThreadSanitizer runtime")
    env = dict(os.environ, INVCONV_EMULATOR_CACHE=str(cache))
    probe = run_race_check(["-c", "pass"], env=env, timeout=60)
    if probe.returncode != 0:
        pytest.skip(f"ThreadSanitizer cannot run Python here:\n{probe.report[-2000:]}")
    script = tmp_path / "launch.py"
    script.write_text(RACE_SCRIPT)
    racy = run_race_check([str(script), str(KERNELS / "race.cu"), "reduce<false>"], env=env,
                          timeout=300)
    assert racy.races >= 1 and racy.returncode != 0 and not racy.ok, racy.report
    assert "reduce<false>" in racy.report
    clean = run_race_check([str(script), str(KERNELS / "race.cu"), "reduce<true>"], env=env,
                           timeout=300)
    assert clean.ok, clean.report
    # The command-line runner says the same.
    src = str(Path(invconv.emulator.__file__).parents[2])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-m", "invconv.emulator.racecheck", str(script),
                           str(KERNELS / "race.cu"), "reduce<false>"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 66, proc.stderr
    assert f"racecheck: {racy.races} data race(s) reported" in proc.stderr
