"""Time the influence op against the dense PyTorch anchor and the bare encode GEMM, with peak
memory, and write the results table to bench/results/<device>.json (relative to the current
directory). See gradsae/benchmark.py for the protocol."""

HELP = "benchmark the influence op against the dense anchor and the bare GEMM"


def add_arguments(p) -> None:
    from gradsae.benchmark import build_parser

    build_parser(p)


def run(args) -> int:
    from gradsae.benchmark import run as run_bench

    return run_bench(args)
