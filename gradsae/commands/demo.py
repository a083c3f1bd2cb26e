"""Run the paper's perturbation study on the demo bundled with gradsae: a tiny Llama-style
model trained on key-value lookup (``k3:v7 , k1:v2 ... Q : k1 -> Result = [[ v2 ]]``) with a
TopK and a JumpReLU SAE on its residual stream. Masks the Top-K latents by GradSAE, the Top-K by
activation, and the Bottom-K of each, for K in {1, 5, 10, 50%}; prints the accuracy table,
writes a PNG plot, and shows the top latents of one prompt. CPU only, no network.

    gradsae demo                      # under a minute on a 2-core CPU
    gradsae demo --quick --out /tmp/demo.png
"""

from __future__ import annotations

HELP = "perturbation study on the bundled demo model (no network, no GPU)"


def add_arguments(p) -> None:
    p.add_argument("--quick", action="store_true", help="a few prompts and K in {1, 50%%} (a smoke test)")
    p.add_argument("--out", default="demo_results.png", help="where to write the plot (default demo_results.png)")
    p.add_argument("--sae", choices=("topk", "jumprelu"), default="topk", help="which bundled SAE (default topk)")
    p.add_argument("--prompts", type=int, default=None, help="number of prompts asked (default 200, 12 with --quick)")
    p.add_argument("--trigger", choices=("answer", "["), default="answer",
                   help="score at the label token (default) or at the first token containing '[' (the paper's)")
    p.add_argument("--data", default=None,
                   help="a demo directory written by scripts/train_demo.py (default: the bundled one)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args) -> int:
    import torch
    from transformers.utils import logging as hf_logging

    from ..demo.study import KS, QUICK_KS, run_demo
    from ..errors import InputError
    from ._model import check_writable_file

    if args.prompts is not None and args.prompts < 1:
        raise InputError(f"--prompts must be >= 1, got {args.prompts}")
    check_writable_file(args.out, "--out")  # before the study, not after it
    hf_logging.disable_progress_bar()  # the weight-loading bar of a 1 MB model is noise here
    torch.manual_seed(0)
    torch.set_num_threads(1)  # a 64-wide model: more threads only add overhead
    n = args.prompts if args.prompts is not None else (12 if args.quick else 200)
    run_demo(n_prompts=n, sae_kind=args.sae, out=args.out, ks=QUICK_KS if args.quick else KS,
             trigger=args.trigger, progress=not args.no_progress, root=args.data)
    return 0
