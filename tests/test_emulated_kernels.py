"""The CUDA kernels themselves, run by the CPU emulator, under every launch shape.

test_dense.py and test_properties.py already run every op through
backend="emulator" with its default launch limits; this file varies the
limits so that block sizes do not divide the work, the solves work in global
instead of shared memory, and the weight gradient splits its reduction, and
checks that launch counts do not grow with the image.
"""
import contextlib
import re

import numpy as np
import pytest
from hypothesis import given, settings

import invconv
from support import assert_close, make_weight
from test_properties import problems, setup

_emulated = pytest.importorskip("invconv._emulated")

LIMITS = {
    "one-thread": dict(block=1, max_block=1, max_grid=3),
    "block-7": dict(block=7, max_block=7, max_grid=5, target_blocks=50),
    "block-33-global": dict(block=33, max_block=33, smem_bytes=0),
    "k-table-only": dict(block=32, max_block=64, smem_bytes=9 * 16 * 8),
    "wide": dict(block=256, max_block=1024, max_grid=2, target_blocks=1),
}


def _all_ops(x, g, w, opts, backend):
    inv = invconv.inv_conv2d(x, w, backend=backend, **opts)
    return [invconv.conv2d(x, w, backend=backend, **opts), inv,
            *invconv.conv2d_vjp(g, x, w, backend=backend, **opts),
            *invconv.inv_conv2d_vjp(g, inv, w, backend=backend, **opts)]


@pytest.mark.parametrize("limits", LIMITS.values(), ids=LIMITS.keys())
@settings(max_examples=8)
@given(p=problems(max_hw=9))
def test_kernels_match_reference_under_any_launch_shape(limits, p):
    _, w, x, g, opts = setup(p)
    expected = _all_ops(x, g, w, opts, "reference")
    with _emulated.launch_limits(**limits):
        got = _all_ops(x, g, w, opts, "emulator")
    for a, e in zip(got, expected):
        assert_close(a, e)


@pytest.mark.parametrize("schedule", ["slices:2", "slices:8"])
@pytest.mark.parametrize("limits", LIMITS.values(), ids=LIMITS.keys())
@settings(max_examples=6)
@given(p=problems(max_hw=9))
def test_slices_schedule_under_any_launch_shape(limits, schedule, p):
    # The off-by-default "slices" schedule (kernels/solve_slices.cu) under
    # every launch shape: one thread owning every lane, blocks that divide
    # nothing, the slices (or also the K' tables) in global memory.
    _, w, x, g, opts = setup(p)
    expected = _all_ops(x, g, w, opts, "reference")
    with _emulated.launch_limits(**limits), _emulated._ops.using_schedule(schedule):
        got = _all_ops(x, g, w, opts, "emulator")
    for a, e in zip(got, expected):
        assert_close(a, e)


@pytest.mark.parametrize("schedule", ["smem:1", "direct"])
@pytest.mark.parametrize("group_channels", range(1, 10))
def test_convolutions_for_every_channels_per_thread(group_channels, schedule):
    # The convolution kernels accumulate 1, 2 or 4 channels a thread; group
    # sizes 1..9 reach every variant, whole and partial last chunks, with
    # two groups so a chunk never reads into the next group; under the
    # default schedule (smem:1) and the one it replaced (direct).
    from invconv._kernels import conv_channels_per_thread
    assert {conv_channels_per_thread(c) for c in range(1, 10)} == {1, 2, 4}
    rng = np.random.default_rng(group_channels)
    C = 2 * group_channels
    for corner, unit in (("top-left", True), ("bottom-right", False)):
        w = rng.uniform(-0.3, 0.3, (C, group_channels, 3, 2))
        x, g = rng.standard_normal((2, C, 4, 5)), rng.standard_normal((2, C, 4, 5))
        opts = dict(corner=corner, groups=2, unit_diagonal=unit)
        for op, args in (("conv2d", (x, w)), ("conv2d_vjp", (g, x, w))):
            want = getattr(invconv.reference, op)(*args, **opts)
            with (_emulated.launch_limits(block=7, max_grid=3),
                  _emulated._ops.using_schedule(schedule)):
                got = getattr(invconv, op)(*args, backend="emulator", **opts)
            for a, e in zip(got if op.endswith("vjp") else [got],
                            want if op.endswith("vjp") else [want]):
                assert_close(a, e)


@pytest.mark.parametrize("schedule", ["lanes:2", "diagonal:2", "slices:2"])
@pytest.mark.parametrize("op", ["inv_conv2d", "inv_conv2d_vjp"])
def test_nonfinite_reach_under_the_other_schedules(op, schedule):
    # tests/test_nonfinite.py holds the default schedule to the structure of
    # the operator (on its small shapes "auto" picks diagonal); the lanes and
    # 2 channels a thread that "auto" picks on larger ones meet the same check.
    from test_nonfinite import check_nonfinite_reach

    def run(op, args, opts):
        return getattr(invconv, op)(*args, backend="emulator", **opts)
    with _emulated.launch_limits(block=7, max_block=7), _emulated._ops.using_schedule(schedule):
        for value in (np.nan, np.inf):
            for groups, unit in ((1, True), (2, False)):
                check_nonfinite_reach(run, op, value, "bottom-left", groups, unit, np.float64)


@pytest.mark.parametrize("schedule, staged", [("smem:4", True), ("smem:4", False),
                                              ("direct", True)],
                         ids=["smem:4-staged", "smem:4-unstaged", "direct"])
@pytest.mark.parametrize("op", ["conv2d", "conv2d_vjp"])
def test_nonfinite_reach_under_the_conv_schedule(op, schedule, staged):
    # The same check for the convolution schedules besides the default
    # (smem:1, which test_nonfinite.py checks): smem with its weights in
    # shared memory and read from global memory (the fallback), and direct;
    # both corner signs.
    from test_nonfinite import check_nonfinite_reach

    def run(op, args, opts):
        return getattr(invconv, op)(*args, backend="emulator", **opts)
    limits = dict(block=7, max_block=7, max_grid=3, **({} if staged else dict(smem_bytes=0)))
    with _emulated.launch_limits(**limits), _emulated._ops.using_schedule(schedule):
        for value in (np.nan, np.inf):
            for corner, groups, unit in (("bottom-left", 1, True), ("top-right", 2, False)):
                check_nonfinite_reach(run, op, value, corner, groups, unit, np.float64)


class _CountingModule:
    def __init__(self, module, counts):
        self.module, self.counts = module, counts

    def get_function(self, name):
        fn = self.module.get_function(name)
        counts = self.counts

        def launch(*args, **kwargs):
            counts.append(name)
            return fn(*args, **kwargs)
        launch.max_dynamic_shared_size_bytes = fn.max_dynamic_shared_size_bytes
        launch.max_threads_per_block = fn.max_threads_per_block
        return launch


@contextlib.contextmanager
def counting_launches():
    counts, ops = [], _emulated._ops
    original = ops.module_for
    ops.module_for = lambda source: _CountingModule(original(source), counts)
    try:
        yield counts
    finally:
        ops.module_for = original


def test_kernel_params_mirror_the_struct():
    # kernel_params() builds IcParams byte for byte: the same int members in
    # the same order as common.cuh declares them.
    from invconv._kernels import PARAM_FIELDS, PARAMS_DTYPE, kernel_dir
    source = (kernel_dir() / "common.cuh").read_text()
    body = re.search(r"struct IcParams \{(.*?)\n\s*//", source, re.S).group(1)
    declared = [name.strip() for line in re.findall(r"^\s*int ([^;]*);", body, re.M)
                for name in line.split(",")]
    assert tuple(declared) == PARAM_FIELDS
    assert PARAMS_DTYPE.itemsize == 4 * len(PARAM_FIELDS)


# Shapes for the solve schedules: sides of 1 and 2, odd sides, kernels taller
# or wider than the image.
SCHEDULE_SHAPES = [  # (B, C, groups, H, W, kh, kw)
    (2, 3, 1, 5, 7, 3, 2), (1, 4, 2, 9, 4, 2, 3), (3, 2, 2, 1, 6, 3, 3),
    (1, 1, 1, 7, 1, 1, 2), (2, 3, 3, 6, 6, 3, 3), (1, 5, 1, 2, 3, 2, 2),
]
SCHEDULE_LIMITS = {
    "default": {},
    "block-7": dict(block=7, max_block=7),
    # the slice in global memory
    "small-smem": dict(block=33, max_block=33, smem_bytes=400),
}


@pytest.mark.parametrize("limits", SCHEDULE_LIMITS.values(), ids=SCHEDULE_LIMITS.keys())
@pytest.mark.parametrize("schedule", ["diagonal", "lanes", "diagonal:2", "lanes:2",
                                      "slices:2", "slices", "slices:8"])
@pytest.mark.parametrize("block_order", ["forward", "reverse"])
def test_solve_schedules_match_reference(schedule, limits, block_order, monkeypatch):
    # Every solve schedule (each a choice "auto" can make, and "slices")
    # computes the reference's result on awkward shapes (for "slices", B * G
    # slices that S does not divide, groups in one block), whatever order the
    # blocks start in, and launches the kernels it names.
    if block_order == "reverse":
        monkeypatch.setenv("INVCONV_EMULATOR_BLOCK_ORDER", "reverse")
    rng = np.random.default_rng(len(schedule))
    kinds = set()
    for B, C, G, H, W, kh, kw in SCHEDULE_SHAPES:
        corner = invconv.CORNERS[rng.integers(4)]
        unit = bool(rng.integers(2))
        w = make_weight(rng, C, G, kh, kw, corner, unit, junk=np.nan)
        y, g = rng.standard_normal((2, B, C, H, W))
        opts = dict(corner=corner, groups=G, unit_diagonal=unit)
        want = invconv.reference.inv_conv2d(y, w, **opts)
        want_vjp = invconv.reference.inv_conv2d_vjp(g, want, w, **opts)
        with (_emulated.launch_limits(**limits), _emulated._ops.using_schedule(schedule),
              counting_launches() as launched):
            got = invconv.inv_conv2d(y, w, backend="emulator", **opts)
            got_vjp = invconv.inv_conv2d_vjp(g, want, w, backend="emulator", **opts)
        assert_close(got, want)
        for a, e in zip(got_vjp, want_vjp):
            assert_close(a, e)
        kinds.update(name.split("<")[0] for name in launched)
        if schedule.startswith("slices"):
            continue
        channels = invconv._kernels.SolveSchedule.parse(schedule).channels
        assert all(name.endswith(f", {channels}>") for name in launched if "_solve" in name)
    suffix = "_slices" if schedule.startswith("slices") else ""
    assert {"inv_conv_solve" + suffix, "inv_conv_solve_adjoint" + suffix} <= kinds


# Shapes where schedule "auto" picks each of its choices (default_solve_choice):
# (B, C, groups, H, W, kh, kw), and (lanes, channels) of the forward and the
# adjoint solve. The longest diagonal's elements min(H, W) * C_g decide
# 2 channels a thread for the forward solve (>= 96 with 2 <= C_g <= 12).
AUTO_SHAPES = [
    ((1, 3, 1, 32, 33, 3, 3), (False, 2), (False, 1)),     # C_g = 3, 96 elements
    ((2, 24, 2, 8, 9, 3, 2), (False, 2), (True, 1)),       # C_g = 12, 96 elements
    ((1, 13, 1, 5, 4, 2, 3), (True, 1), (True, 1)),        # C_g = 13: lanes
    ((2, 4, 1, 14, 14, 3, 3), (False, 1), (False, 1)),     # 56 elements: diagonal
    ((3, 2, 2, 6, 7, 3, 3), (False, 1), (False, 1)),       # C_g = 1: nothing to share
]


@pytest.mark.parametrize("shape, forward, adjoint", AUTO_SHAPES,
                         ids=[f"cg{s[1] // s[2]}-{s[3]}x{s[4]}" for s, _, _ in AUTO_SHAPES])
@pytest.mark.parametrize("limits", [{}, dict(block=33, max_block=33, smem_bytes=0)],
                         ids=["default", "global"])
@pytest.mark.parametrize("block_order", ["forward", "reverse"])
def test_default_schedule_follows_the_measured_rule(shape, forward, adjoint, limits,
                                                    block_order, monkeypatch):
    # The default schedule's choices, as the kernels receive them (the CH
    # template argument and the lanes flag), and its results against the
    # reference, at shapes that reach every branch of the rule.
    from invconv import _kernels
    from invconv._kernels import SolveSchedule, default_solve_choice
    if block_order == "reverse":
        monkeypatch.setenv("INVCONV_EMULATOR_BLOCK_ORDER", "reverse")
    B, C, G, H, W, kh, kw = shape
    assert default_solve_choice(False, C // G, H, W) == forward
    assert default_solve_choice(True, C // G, H, W) == adjoint
    lanes_flags = []
    original = _kernels.kernel_params

    def recording(shape, conv, **choices):
        if "lanes" in choices:
            lanes_flags.append(bool(choices["lanes"]))
        return original(shape, conv, **choices)
    monkeypatch.setattr(_kernels, "kernel_params", recording)
    rng = np.random.default_rng(C * H + W)
    corner = invconv.CORNERS[rng.integers(4)]
    w = make_weight(rng, C, G, kh, kw, corner, True, junk=np.nan)
    y, g = rng.standard_normal((2, B, C, H, W))
    opts = dict(corner=corner, groups=G, unit_diagonal=True)
    want = invconv.reference.inv_conv2d(y, w, **opts)
    want_gy, want_gw = invconv.reference.inv_conv2d_vjp(g, want, w, **opts)
    assert _emulated._ops.schedule == SolveSchedule("auto")
    with _emulated.launch_limits(**limits), counting_launches() as launched:
        got = invconv.inv_conv2d(y, w, backend="emulator", **opts)
        got_gy, got_gw = invconv.inv_conv2d_vjp(g, want, w, backend="emulator", **opts)
    assert_close(got, want)
    assert_close(got_gy, want_gy)
    assert_close(got_gw, want_gw)
    solves = [name for name in launched if "_solve" in name]
    assert solves == [f"inv_conv_solve<double, {forward[1]}>",
                      f"inv_conv_solve_adjoint<double, {adjoint[1]}>"]
    assert lanes_flags == [forward[0], adjoint[0]]


def test_schedule_option_is_checked():
    from invconv._kernels import SolveSchedule
    assert SolveSchedule.parse("") == SolveSchedule("auto") == SolveSchedule.parse(" auto ")
    assert SolveSchedule.parse("lanes:2") == SolveSchedule("lanes", channels=2)
    assert SolveSchedule.parse("diagonal") == SolveSchedule("diagonal", channels=1)
    assert SolveSchedule.parse("slices") == SolveSchedule("slices", slices=4)
    assert SolveSchedule.parse("slices:8") == SolveSchedule("slices", slices=8)
    for bad in ("fast", "lanes:2x2", "diagonal:3", "auto:2", "smem", "lanes:0", "slices:3",
                "slices:1", "slices:x"):
        with pytest.raises(ValueError, match="INVCONV_SOLVE_SCHEDULE must be"):
            SolveSchedule.parse(bad)
    # Schedules removed by measurement say so.
    for removed in ("tiled", "tiled:16x16", "tiled:2"):
        with pytest.raises(ValueError, match="tiled schedule was removed"):
            SolveSchedule.parse(removed)
    for removed in ("diagonal:4", "lanes:4"):
        with pytest.raises(ValueError, match="4 channels a thread were removed"):
            SolveSchedule.parse(removed)


def test_removed_schedule_in_the_environment_is_a_clear_error(monkeypatch):
    from invconv._kernels import KernelOps
    monkeypatch.setenv("INVCONV_SOLVE_SCHEDULE", "tiled:16x16")
    with pytest.raises(ValueError, match="INVCONV_SOLVE_SCHEDULE.*tiled schedule was removed"):
        KernelOps(np, None, None)


def test_conv_schedule_option_is_checked():
    from invconv._kernels import ConvSchedule, SolveSchedule, parse_schedule
    assert ConvSchedule.parse("") == ConvSchedule("smem", pixels=1) == ConvSchedule()
    assert ConvSchedule.parse("smem") == ConvSchedule("smem", pixels=1)
    assert ConvSchedule.parse("direct") == ConvSchedule("direct")
    assert ConvSchedule.parse(" smem:4 ") == ConvSchedule("smem", pixels=4)
    for bad in ("smem:3", "smem:0", "smem:2x2", "direct:2", "lanes", "smem:8"):
        with pytest.raises(ValueError, match="INVCONV_CONV_SCHEDULE"):
            ConvSchedule.parse(bad)
    # Either kind by name, for the benchmarks' --schedules and using_schedule.
    assert parse_schedule("smem:1") == ConvSchedule("smem", pixels=1)
    assert parse_schedule("lanes:2") == SolveSchedule("lanes", channels=2)
    with pytest.raises(ValueError, match="INVCONV_SOLVE_SCHEDULE.*INVCONV_CONV_SCHEDULE"):
        parse_schedule("fastest")
    ops = _emulated._ops
    before = (ops.schedule, ops.conv_schedule)
    with ops.using_schedule("smem:4") as chosen:
        assert (ops.schedule, ops.conv_schedule) == (before[0], chosen)
        with ops.using_schedule(SolveSchedule("lanes")):
            assert (ops.schedule, ops.conv_schedule) == (SolveSchedule("lanes"), chosen)
    assert (ops.schedule, ops.conv_schedule) == before
    with pytest.raises(TypeError, match="schedule must be"):
        with ops.using_schedule(4):
            pass


def test_conv_schedule_is_read_from_the_environment(monkeypatch):
    from invconv._kernels import ConvSchedule, KernelOps
    monkeypatch.setenv("INVCONV_CONV_SCHEDULE", "smem:4")
    assert KernelOps(np, None, None).conv_schedule == ConvSchedule("smem", pixels=4)
    monkeypatch.setenv("INVCONV_CONV_SCHEDULE", "smem:5")
    with pytest.raises(ValueError, match="INVCONV_CONV_SCHEDULE"):
        KernelOps(np, None, None)


# Shapes for the convolutions' "smem" schedule: channels per group 1, 2, 4
# (one whole chunk of 4 channels a thread), 3 (a partial chunk) and 5 and 7
# (chunks of 2, the last partial), in two groups where a chunk could run into
# the next group; sides of 1; a 1x1 kernel; (image, pixel) positions that
# neither P nor the block divide.
CONV_SHAPES = [  # (B, C, groups, H, W, kh, kw)
    (2, 1, 1, 5, 7, 3, 2), (3, 4, 2, 1, 6, 3, 3), (1, 10, 2, 7, 1, 2, 3),
    (2, 6, 2, 3, 5, 3, 3), (1, 7, 1, 4, 3, 2, 2), (3, 4, 1, 2, 3, 1, 1),
]
CONV_LIMITS = {
    "default": {},
    # blocks that divide nothing; fewer blocks than slabs, so a block stages
    # the weights of several slabs one after another
    "block-7-grid-2": dict(block=7, max_block=7, max_grid=2),
    # the weights stay in global memory
    "no-smem": dict(block=33, max_block=33, smem_bytes=0),
}


@pytest.mark.parametrize("limits", CONV_LIMITS.values(), ids=CONV_LIMITS.keys())
@pytest.mark.parametrize("schedule", ["smem", "smem:2", "smem:4"])
def test_conv_schedule_matches_reference(schedule, limits, monkeypatch):
    from invconv import _kernels
    staged = []
    original = _kernels.kernel_params

    def recording(shape, conv, **choices):
        staged.append(choices.get("w_in_smem"))
        return original(shape, conv, **choices)
    monkeypatch.setattr(_kernels, "kernel_params", recording)
    rng = np.random.default_rng(len(schedule))
    for B, C, G, H, W, kh, kw in CONV_SHAPES:
        corner = invconv.CORNERS[rng.integers(4)]
        unit = bool(rng.integers(2))
        w = make_weight(rng, C, G, kh, kw, corner, unit, junk=np.nan)
        x, g = rng.standard_normal((2, B, C, H, W))
        opts = dict(corner=corner, groups=G, unit_diagonal=unit)
        want = invconv.reference.conv2d(x, w, **opts)
        want_vjp = invconv.reference.conv2d_vjp(g, x, w, **opts)
        with (_emulated.launch_limits(**limits), _emulated._ops.using_schedule(schedule),
              counting_launches() as launched):
            got = invconv.conv2d(x, w, backend="emulator", **opts)
            got_vjp = invconv.conv2d_vjp(g, x, w, backend="emulator", **opts)
        assert_close(got, want)
        for a, e in zip(got_vjp, want_vjp):
            assert_close(a, e)
        pixels = _kernels.ConvSchedule.parse(schedule).pixels
        assert {name.split("<")[0] for name in launched} >= {
            "masked_conv_forward_smem", "masked_conv_adjoint_smem"}
        assert all(name.endswith(f", {pixels}>") for name in launched if "_smem" in name)
    # Both convolutions took the path the limits allow.
    assert set(staged) - {None} == ({0} if limits.get("smem_bytes") == 0 else {1})


@pytest.mark.parametrize("schedule", ["auto", "lanes:2", "slices", "bands:2", "direct", "smem:4"])
@pytest.mark.parametrize("op", ["conv2d", "inv_conv2d", "conv2d_vjp", "inv_conv2d_vjp"])
def test_launch_count_does_not_grow_with_the_image(op, schedule):
    rng = np.random.default_rng(0)
    w = rng.uniform(-0.05, 0.05, (2, 2, 3, 3))
    counts = {}
    for size in (3, 17):
        x = rng.standard_normal((2, 2, size, size + 1))
        args = (x, x, w) if op.endswith("vjp") else (x, w)
        with counting_launches() as launched, _emulated._ops.using_schedule(schedule):
            getattr(invconv, op)(*args, backend="emulator")
        counts[size] = launched
    assert counts[3] == counts[17]
    assert len(counts[3]) == {"conv2d": 1, "inv_conv2d": 3, "conv2d_vjp": 3,
                              "inv_conv2d_vjp": 5}[op]


def test_per_diagonal_baseline_matches_reference():
    from invconv.baselines import PerDiagonal
    base = PerDiagonal("emulator")
    rng = np.random.default_rng(1)
    for corner in invconv.CORNERS:
        for groups in (1, 3):
            w = rng.uniform(-0.05, 0.05, (3, 3 // groups, 2, 3))
            x = rng.standard_normal((2, 3, 5, 4))
            opts = dict(corner=corner, groups=groups, unit_diagonal=True)
            assert_close(base.solve(x, w, **opts), invconv.reference.inv_conv2d(x, w, **opts))
            g = rng.standard_normal(x.shape)
            want_gy, want_gw = invconv.reference.inv_conv2d_vjp(g, x, w, **opts)
            assert_close(base.solve_adjoint(g, w, **opts), want_gy)
            got_gy, got_gw = base.inv_conv2d_vjp(g, x, w, **opts)
            assert_close(got_gy, want_gy)
            assert_close(got_gw, want_gw)


RACE_SCRIPT = '''
import numpy as np
import invconv
from invconv import _emulated

rng = np.random.default_rng(0)
for limits, schedule in (({}, "auto"), ({"smem_bytes": 0, "block": 33, "max_block": 33}, "lanes:2"),
                         ({"block": 7, "max_block": 7}, "diagonal:2"),
                         ({"block": 33, "max_block": 33}, "lanes"),
                         ({"block": 7, "max_block": 7, "max_grid": 2}, "smem:4"),
                         ({"block": 33, "max_block": 33, "smem_bytes": 0}, "smem:2"),
                         ({"block": 33, "max_block": 33}, "direct"),
                         ({"block": 33, "max_block": 33}, "slices:4"),
                         ({"block": 7, "max_block": 7, "smem_bytes": 0}, "slices:2")):
    with _emulated.launch_limits(**limits), _emulated._ops.using_schedule(schedule):
        for corner, groups in (("top-left", 1), ("bottom-right", 3)):
            w = rng.uniform(-0.05, 0.05, (3, 3 // groups, 3, 2))
            x = rng.standard_normal((2, 3, 5, 6))
            opts = dict(corner=corner, groups=groups, backend="emulator")
            y = invconv.conv2d(x, w, **opts)
            assert np.allclose(invconv.inv_conv2d(y, w, **opts), x)
            invconv.conv2d_vjp(x, x, w, **opts)
            invconv.inv_conv2d_vjp(x, x, w, **opts)
print("kernels ran")
'''


def test_real_kernels_are_race_free_under_thread_sanitizer(tmp_path):
    from invconv.emulator.racecheck import run_race_check, tsan_runtime
    try:
        tsan_runtime()
    except RuntimeError as exc:          # tsan_runtime raises; it never returns None
        pytest.skip(str(exc))
    script = tmp_path / "run_kernels.py"
    script.write_text(RACE_SCRIPT)
    result = run_race_check([str(script)], timeout=600)
    assert result.races == 0, result.report
    assert result.returncode == 0 and "kernels ran" in result.stdout, result.report
