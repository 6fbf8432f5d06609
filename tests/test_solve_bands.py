"""The solves' off-by-default schedule "bands:R" (kernels/solve_bands.cu) on
the CPU emulator: a pipelined band wavefront, one block a (slice, band of R
rows), blocks taking bands by atomic ticket and waiting on the progress
counter of the band above.

Against the reference over awkward shapes (sides of 1 and 2, H not a
multiple of R, R above H, kernels taller than a band, kh = 1, kw = 1,
groups, C_g 1..5), both float types, all four corners, the forward and
adjoint solves and inv_conv2d_vjp; both block orders (blocks start in
reverse but take tickets in order); block sizes that divide nothing; the K'
table in global memory; bands halved to fit shared memory and the fallback
to the diagonal schedule where none fits; non-finite reach; the
ThreadSanitizer race check; the schedule's parsing.
"""
import numpy as np
import pytest
from hypothesis import given, settings

import invconv
from support import assert_close, make_weight
from test_emulated_kernels import counting_launches
from test_properties import problems, setup

_emulated = pytest.importorskip("invconv._emulated")

# (B, C, groups, H, W, kh, kw)
BAND_SHAPES = [
    (1, 3, 1, 9, 7, 3, 2),     # H not a multiple of R
    (2, 4, 2, 5, 6, 2, 3),     # groups, C_g = 2
    (1, 2, 1, 7, 1, 3, 3),     # one column, kernel wider than the image
    (1, 1, 1, 1, 5, 1, 2),     # one row, kh = 1: bands need no halo
    (1, 3, 3, 12, 9, 4, 3),    # C_g = 1, kernel taller than a band of 2 (R raised to 3)
    (2, 5, 1, 6, 2, 2, 1),     # C_g = 5, kw = 1
    (1, 4, 1, 2, 3, 3, 3),     # kernel taller than the image
    (3, 2, 1, 11, 4, 2, 2),    # batch, many bands
    (1, 5, 1, 4, 2, 3, 3),     # C_g = 5, 3x3: under "kp-global" the K' table does not fit
]
ROWS = [1, 2, 3, 32]           # 32 is above every H here: one band
BAND_LIMITS = {
    "default": {},
    "block-7": dict(block=7, max_block=7),
    "one-thread": dict(block=1, max_block=1),
    # the K' table (up to 5*5*9 doubles) in global memory, the band halved
    # to fit the rest
    "kp-global": dict(block=33, max_block=33, smem_bytes=720),
}


def _run_solves(shape, rng, dtype, schedule):
    B, C, G, H, W, kh, kw = shape
    corner = invconv.CORNERS[rng.integers(4)]
    unit = bool(rng.integers(2))
    w = make_weight(rng, C, G, kh, kw, corner, unit, dtype, junk=np.nan)
    y, g = rng.standard_normal((2, B, C, H, W)).astype(dtype)
    opts = dict(corner=corner, groups=G, unit_diagonal=unit)
    want = invconv.reference.inv_conv2d(y, w, **opts)
    want_vjp = invconv.reference.inv_conv2d_vjp(g, want, w, **opts)
    with _emulated._ops.using_schedule(schedule), counting_launches() as launched:
        got = invconv.inv_conv2d(y, w, backend="emulator", **opts)
        got_vjp = invconv.inv_conv2d_vjp(g, want, w, backend="emulator", **opts)
    assert_close(got, want, dtype)
    for a, e in zip(got_vjp, want_vjp, strict=True):
        assert_close(a, e, dtype)
    return {name.split("<")[0] for name in launched}


@pytest.mark.parametrize("limits", BAND_LIMITS.values(), ids=BAND_LIMITS.keys())
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("block_order", ["forward", "reverse"])
def test_bands_match_reference(rows, limits, dtype, block_order, monkeypatch):
    if block_order == "reverse":
        monkeypatch.setenv("INVCONV_EMULATOR_BLOCK_ORDER", "reverse")
    from invconv._kernels import band_plan
    rng = np.random.default_rng(rows * 7 + len(limits))
    plans = []
    with _emulated.launch_limits(**limits) as lim:
        for shape in BAND_SHAPES:
            B, C, G, H, W, kh, kw = shape
            plan = band_plan(rows, H, W, C // G, kh, kw, np.dtype(dtype).itemsize,
                             lim.smem_bytes)
            plans.append(plan)
            kinds = _run_solves(shape, rng, dtype, f"bands:{rows}")
            bands = {"inv_conv_solve_bands", "inv_conv_solve_adjoint_bands"}
            default = {"inv_conv_solve", "inv_conv_solve_adjoint"}
            assert bands <= kinds if plan else default <= kinds, shape
            assert not (default if plan else bands) & kinds, shape
    # Most shapes band; under "kp-global" some with the K' table in global memory.
    assert sum(plan is not None for plan in plans) >= len(plans) - 3
    if "smem_bytes" in limits:
        assert any(plan and not plan[1] for plan in plans)


def test_bands_cover_every_corner_and_group_size():
    # Every corner with C_g 1..5, several bands a slice (R = 2, H = 7).
    rng = np.random.default_rng(5)
    for corner in invconv.CORNERS:
        for cg in range(1, 6):
            w = make_weight(rng, 2 * cg, 2, 3, 2, corner, False, junk=np.nan)
            y, g = rng.standard_normal((2, 1, 2 * cg, 7, 5))
            opts = dict(corner=corner, groups=2, unit_diagonal=False)
            want = invconv.reference.inv_conv2d(y, w, **opts)
            want_gy = invconv.reference.inv_conv2d_vjp(g, want, w, **opts)
            with (_emulated.launch_limits(block=7, max_block=7),
                  _emulated._ops.using_schedule("bands:2")):
                assert_close(invconv.inv_conv2d(y, w, backend="emulator", **opts), want)
                got = invconv.inv_conv2d_vjp(g, want, w, backend="emulator", **opts)
            for a, e in zip(got, want_gy, strict=True):
                assert_close(a, e)


@settings(max_examples=12)
@given(p=problems(max_hw=9))
def test_bands_any_problem(p):
    _, w, x, g, opts = setup(p, junk=np.nan)
    want = invconv.reference.inv_conv2d(x, w, **opts)
    want_vjp = invconv.reference.inv_conv2d_vjp(g, want, w, **opts)
    with _emulated.launch_limits(block=7, max_block=7), _emulated._ops.using_schedule("bands:2"):
        got = invconv.inv_conv2d(x, w, backend="emulator", **opts)
        got_vjp = invconv.inv_conv2d_vjp(g, want, w, backend="emulator", **opts)
    assert_close(got, want)
    for a, e in zip(got_vjp, want_vjp, strict=True):
        assert_close(a, e)


def test_bands_fall_back_to_diagonal_where_no_band_fits():
    rng = np.random.default_rng(3)
    with _emulated.launch_limits(block=33, max_block=33, smem_bytes=0):
        kinds = _run_solves((1, 3, 1, 6, 5, 3, 2), rng, np.float64, "bands")
    assert {"inv_conv_solve", "inv_conv_solve_adjoint"} <= kinds
    assert not {"inv_conv_solve_bands", "inv_conv_solve_adjoint_bands"} & kinds


def test_band_plan():
    from invconv._kernels import band_plan
    # The issue's shape: 1x3x1024x1024 float32, the H200's 227 KiB a block:
    # 32 rows do not fit, 16 rows with the 2-row halo take 216 KiB.
    rows, kp_in_smem, shared = band_plan(32, 1024, 1024, 3, 3, 3, 4, 227 * 1024)
    assert (rows, kp_in_smem) == (16, True)
    assert shared == 16 + 9 * 9 * 4 + 3 * 18 * 1024 * 4
    assert band_plan(32, 1024, 1024, 3, 3, 3, 4, 100 * 1024)[0] == 4
    # R is raised to kh - 1 and lowered to H; halving stops at kh - 1.
    assert band_plan(2, 64, 8, 1, 5, 3, 8, 48 * 1024)[0] == 4
    assert band_plan(32, 5, 8, 1, 2, 2, 8, 48 * 1024)[0] == 5
    assert band_plan(32, 64, 8, 1, 5, 3, 8, 16 + 15 * 8 + 8 * 8 * 8)[0] == 4
    assert band_plan(32, 64, 8, 1, 5, 3, 8, 16 + 15 * 8 + 7 * 8 * 8) is None
    # The K' table goes to global memory when it does not fit itself.
    assert band_plan(1, 4, 2, 5, 3, 3, 8, 700) == (2, False, 16 + 5 * 4 * 2 * 8)


@pytest.mark.parametrize("op", ["inv_conv2d", "inv_conv2d_vjp"])
def test_nonfinite_reach_under_bands(op):
    from test_nonfinite import check_nonfinite_reach

    def run(op, args, opts):
        return getattr(invconv, op)(*args, backend="emulator", **opts)
    # R = 1 is raised to kh - 1 = 1 there (kh = 2): a band a row.
    with _emulated.launch_limits(block=7, max_block=7), _emulated._ops.using_schedule("bands:1"):
        for value in (np.nan, np.inf):
            for corner, groups, unit in (("bottom-left", 1, True), ("top-right", 2, False)):
                check_nonfinite_reach(run, op, value, corner, groups, unit, np.float64)


def test_bands_schedule_parsing(monkeypatch):
    from invconv._kernels import DEFAULT_BAND_ROWS, KernelOps, SolveSchedule
    assert SolveSchedule.parse("bands") == SolveSchedule("bands", band_rows=DEFAULT_BAND_ROWS)
    assert DEFAULT_BAND_ROWS == 32
    assert SolveSchedule.parse(" bands:16 ") == SolveSchedule("bands", band_rows=16)
    assert SolveSchedule.parse("bands:1") == SolveSchedule("bands", band_rows=1)
    for bad in ("bands:0", "bands:-2", "bands:x", "bands:8x8", "bands:", "band"):
        if bad == "bands:":   # an empty argument is the default, as for slices
            assert SolveSchedule.parse(bad).band_rows == DEFAULT_BAND_ROWS
            continue
        with pytest.raises(ValueError, match="INVCONV_SOLVE_SCHEDULE must be.*bands"):
            SolveSchedule.parse(bad)
    monkeypatch.setenv("INVCONV_SOLVE_SCHEDULE", "bands:8")
    assert KernelOps(np, None, None).schedule == SolveSchedule("bands", band_rows=8)
    monkeypatch.setenv("INVCONV_SOLVE_SCHEDULE", "bands:0")
    with pytest.raises(ValueError, match="INVCONV_SOLVE_SCHEDULE"):
        KernelOps(np, None, None)
    # Not the default: "auto" never launches it.
    monkeypatch.delenv("INVCONV_SOLVE_SCHEDULE")
    assert KernelOps(np, None, None).schedule == SolveSchedule("auto")
    rng = np.random.default_rng(0)
    kinds = _run_solves((1, 3, 1, 40, 40, 3, 3), rng, np.float64, "auto")
    assert not {"inv_conv_solve_bands", "inv_conv_solve_adjoint_bands"} & kinds


BANDS_RACE_SCRIPT = '''
import numpy as np
import invconv
from invconv import _emulated

rng = np.random.default_rng(0)
for limits, schedule in (({"block": 33, "max_block": 33}, "bands:2"),
                         ({"block": 7, "max_block": 7}, "bands:1"),
                         ({"block": 33, "max_block": 33, "smem_bytes": 600}, "bands:3")):
    with _emulated.launch_limits(**limits), _emulated._ops.using_schedule(schedule):
        for corner, groups in (("top-left", 1), ("bottom-right", 3)):
            w = rng.uniform(-0.05, 0.05, (3, 3 // groups, 3, 2))
            x = rng.standard_normal((2, 3, 7, 6))
            opts = dict(corner=corner, groups=groups, backend="emulator")
            y = invconv.conv2d(x, w, **opts)
            assert np.allclose(invconv.inv_conv2d(y, w, **opts), x)
            invconv.inv_conv2d_vjp(x, x, w, **opts)
print("kernels ran")
'''


def test_bands_are_race_free_under_thread_sanitizer(tmp_path):
    from invconv.emulator.racecheck import run_race_check, tsan_runtime
    try:
        tsan_runtime()
    except RuntimeError as exc:
        pytest.skip(str(exc))
    script = tmp_path / "run_bands.py"
    script.write_text(BANDS_RACE_SCRIPT)
    result = run_race_check([str(script)], timeout=600)
    assert result.races == 0, result.report
    assert result.returncode == 0 and "kernels ran" in result.stdout, result.report
