"""Time the influence op against the dense PyTorch anchor and the bare encode GEMM, with peak
memory, and write the results table to bench/results/<device>.json (relative to the current
directory). See gradsae/benchmark.py for the protocol."""

HELP = "benchmark the influence op against the dense anchor and the bare GEMM"


def add_arguments(p) -> None:
    from gradsae.benchmark import build_parser

    build_parser(p)


def check(args) -> None:
    """The options, before any process is started."""
    from gradsae import available_backends
    from gradsae.corpus.preflight import check_device
    from gradsae.errors import InputError

    from ._model import check_writable_file

    if args.child:
        return
    for name in ("T", "d_in", "d_sae", "k", "repeat"):
        v = getattr(args, name)
        if v < 1:
            raise InputError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    if args.k > args.d_sae:
        raise InputError(f"--k {args.k} is larger than --d-sae {args.d_sae}")
    check_device(args.device)
    names = list(available_backends())
    if args.backend != "auto" and args.backend not in names:
        raise InputError(f"unknown --backend {args.backend!r}; expected auto or one of {', '.join(names)}")
    if args.out:
        check_writable_file(args.out, "--out")


def run(args) -> int:
    from gradsae.benchmark import run as run_bench

    check(args)
    return run_bench(args)
