"""Benchmark the influence op against the dense anchor and the bare encode GEMM (CPU or GPU).

Same as `gradsae bench`; see gradsae/benchmark.py for the protocol. Run from the repo root:

    python bench/run.py --help
"""

import sys

from gradsae.benchmark import main

if __name__ == "__main__":
    sys.exit(main())
