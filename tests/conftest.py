import os

import pytest
import torch

# Triton kernels run under the interpreter where there is no GPU; it must be set before
# triton is imported. The dispatcher never picks the interpreter for backend="auto".
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


# Strategy decisions measured by the tests (on a GPU) go to a file of the test session, not
# the user's cache; tests of the cache itself point it elsewhere.
if not os.environ.get("GRADSAE_STRATEGY_CACHE"):
    import tempfile

    os.environ["GRADSAE_STRATEGY_CACHE"] = os.path.join(tempfile.mkdtemp(prefix="gradsae-test-"), "strategy.json")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # Fresh random inputs every run, but reproducible from the printed seed on failure.
    seed = int.from_bytes(os.urandom(4), "little") if not os.environ.get("GRADSAE_TEST_SEED") else int(
        os.environ["GRADSAE_TEST_SEED"])
    torch.manual_seed(seed)
    request.node.user_properties.append(("seed", seed))
    yield


def pytest_runtest_makereport(item, call):
    if call.excinfo is not None and call.when == "call":
        for k, v in item.user_properties:
            if k == "seed":
                item.add_report_section("call", "seed", f"GRADSAE_TEST_SEED={v} reproduces this run")
