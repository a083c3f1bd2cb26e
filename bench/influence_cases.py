"""The benchmark variants (gradsae op, dense anchor, bare GEMM); they live in gradsae.benchmark
so that `gradsae bench` and the scripts here measure the same code."""

from gradsae.benchmark import VARIANTS, make_inputs, run_dense, run_gemm, run_gradsae  # noqa: F401
