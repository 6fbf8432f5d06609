"""Every template instantiation compiles for the GPUs we target (sm_80, sm_90)."""
import os
import shutil
import subprocess

import pytest

from invconv._kernels import KERNELS, kernel_dir, name_expressions

NVCC = shutil.which("nvcc") or (os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc")
                                if os.environ.get("CUDA_HOME") else None)


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("source", sorted(KERNELS))
def test_every_instantiation_compiles(source, arch, tmp_path):
    if NVCC is None or not os.path.exists(NVCC):
        pytest.skip("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    unit = tmp_path / f"instantiate_{source}"
    # Taking each instantiation's address makes nvcc emit it, as NVRTC's
    # name expressions do.
    refs = ", ".join(f"(void*)&{name}" for name in name_expressions(source))
    unit.write_text(f'#include "{source}"\nvoid* invconv_instances[] = {{{refs}}};\n')
    cubin = tmp_path / "out.cubin"
    proc = subprocess.run([NVCC, "--std=c++17", f"-arch={arch}", "-cubin", "-Werror",
                           "all-warnings", "-Xptxas", "-v", f"-I{kernel_dir()}", "-o",
                           str(cubin), str(unit)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert cubin.stat().st_size > 0
    report = proc.stderr
    for name in KERNELS[source]:
        assert name in report, f"{name} was not compiled"
    assert "spill" not in report.replace("0 bytes spill", ""), report
