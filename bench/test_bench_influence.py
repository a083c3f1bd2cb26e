"""pytest-benchmark view of the influence op: ``pytest bench/ --benchmark-only``.

Shapes default to a quick size; set GRADSAE_BENCH_SHAPE="T,d_in,d_sae,k" for others (the
issue's CPU shape is 2048,768,32768,64). bench/run.py measures the same variants with peak
memory and writes the results table.
"""

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from influence_cases import VARIANTS, make_inputs  # noqa: E402

SHAPE = tuple(int(v) for v in os.environ.get("GRADSAE_BENCH_SHAPE", "512,768,16384,64").split(","))
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def inputs():
    return make_inputs(*SHAPE, device=DEVICE)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_influence_variants(benchmark, inputs, variant):
    sae, x, grad = inputs
    benchmark.group = f"influence T,d_in,d_sae,k={SHAPE} on {DEVICE}"
    fn = VARIANTS[variant]
    out = benchmark(fn, sae, x, grad)
    assert out is not None
