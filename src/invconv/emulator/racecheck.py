"""Run a Python program with ThreadSanitizer watching its emulated kernels.

``python -m invconv.emulator.racecheck SCRIPT [ARGS...]`` re-runs
``python SCRIPT ARGS`` with the ThreadSanitizer runtime preloaded and
``INVCONV_EMULATOR_RACE_CHECK=1``, so that every
:class:`~invconv.emulator.EmulatedModule` is built instrumented and runs each
CUDA thread on its own OS thread.  A data race between CUDA threads (a missing
``__syncthreads()``, say) is reported with both stacks.  The exit status is
non-zero if a race was reported or the program failed.
"""
from __future__ import annotations

import ctypes
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

from ._module import _compiler, _compiler_named, _run_compiler

# halt_on_error=0: report every race, not only the first.  The interpreter is
# not instrumented, so only the emulated kernels (and libc calls) are watched.
TSAN_OPTIONS = "halt_on_error=0 exitcode=66 report_signal_unsafe=0 second_deadlock_stack=1"
RACE_MARKER = "WARNING: ThreadSanitizer: data race"


@dataclasses.dataclass(frozen=True)
class RaceCheckResult:
    """Outcome of :func:`run_race_check`.

    Attributes
    ----------
    returncode : int
        The program's exit status (66 when ThreadSanitizer reported anything).
    races : int
        Number of data-race reports.
    report : str
        The program's standard error, which holds ThreadSanitizer's reports.
    stdout : str
        The program's standard output.
    """

    returncode: int
    races: int
    report: str
    stdout: str = ""

    @property
    def ok(self):
        """True if the program succeeded and no race was reported."""
        return self.returncode == 0 and self.races == 0


def tsan_runtime():
    """Path of the compiler's ThreadSanitizer runtime (``libtsan.so``).

    Raises
    ------
    RuntimeError
        If the compiler (``CXX``) cannot be run or does not know one.
    """
    cxx = _compiler()
    out = _run_compiler(cxx, ["-print-file-name=libtsan.so"]).stdout.strip()
    if not os.path.isabs(out) or not os.path.exists(out):
        raise RuntimeError(f"cuemu: {_compiler_named(cxx)} has no libtsan.so; "
                           "race checking needs g++ with ThreadSanitizer")
    return out


def _disable_aslr():
    # The ThreadSanitizer of older compilers cannot map its shadow memory
    # with the high address randomisation of recent kernels; as `setarch -R`
    # does, turn it off for the program.  Best effort: seccomp may refuse.
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        current = libc.personality(0xFFFFFFFF)
        if current != -1:
            libc.personality(current | 0x0040000)  # ADDR_NO_RANDOMIZE
    except (OSError, AttributeError):
        pass


def run_race_check(argv, env=None, *, timeout=None):
    """Run ``python *argv`` under ThreadSanitizer and count data races.

    Parameters
    ----------
    argv : sequence of str
        Script and its arguments (``["-m", "module", ...]`` works too).
    env : mapping, optional
        Environment of the program (default: this process's).
    timeout : float, optional
        Seconds before the program is killed (:exc:`subprocess.TimeoutExpired`).

    Returns
    -------
    RaceCheckResult
    """
    env = dict(os.environ if env is None else env)
    env["LD_PRELOAD"] = " ".join([tsan_runtime(), *env.get("LD_PRELOAD", "").split()])
    env["INVCONV_EMULATOR_RACE_CHECK"] = "1"
    # The caller's own TSAN_OPTIONS come last, so they win.
    env["TSAN_OPTIONS"] = " ".join([TSAN_OPTIONS, env.get("TSAN_OPTIONS", "")]).strip()
    # The child must import this very package, installed or not.
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, *argv], env=env, capture_output=True, text=True,
                          timeout=timeout, preexec_fn=_disable_aslr)
    return RaceCheckResult(proc.returncode, proc.stderr.count(RACE_MARKER), proc.stderr,
                           proc.stdout)


def main(argv=None):
    """Command-line entry point; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    try:
        result = run_race_check(argv)
    except RuntimeError as e:  # no compiler, or no ThreadSanitizer runtime
        print(f"racecheck: {e}", file=sys.stderr)
        return 2
    sys.stdout.write(result.stdout)
    sys.stderr.write(result.report)
    print(f"racecheck: {result.races} data race(s) reported; program exit status "
          f"{result.returncode}", file=sys.stderr)
    if result.races:
        return 66
    return result.returncode if result.returncode >= 0 else 1  # killed by a signal


if __name__ == "__main__":
    sys.exit(main())
