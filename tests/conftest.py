import os

import pytest
from hypothesis import HealthCheck, settings

# "ci": derandomised and without deadlines (shared 2-core machines are noisy);
# "dev" (default): fewer examples, runs in seconds.
# The backend fixture is a constant per test, so reusing it across examples is safe.
settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.register_profile("dev", max_examples=15, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE",
                                     "ci" if os.environ.get("CI") else "dev"))


from invconv import _backends

# Every registered host backend that can run here (the registry's probe).
CPU_BACKENDS = list(_backends.names("numpy", available_only=True))


@pytest.fixture(params=CPU_BACKENDS)
def backend(request):
    return request.param


def pytest_collection_modifyitems(config, items):
    try:
        import cupy
        has_gpu = cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        has_gpu = False
    if has_gpu:
        return
    skip = pytest.mark.skip(reason="needs CuPy and a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
