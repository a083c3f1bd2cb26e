"""Check GradSAE's first-order score against integrated gradients and exact zero-ablation.

    gradsae validate --demo                                   # the bundled demo model and SAE
    gradsae validate --model ./gpt2 --sae ./sae --prompts-file prompts.txt --k 10 --out val/

For each prompt, its active latents (at most --budget, those with the largest first-order
|score|) are scored three ways, each an estimate or a measurement of Y(clean) - Y(latent zeroed
at every position): the first-order score summed over positions, integrated gradients from
zero (--steps), and the exact change of Y with the latent zeroed. Prints Pearson and Spearman
correlation, sign agreement and Top-K overlap of each pair of methods, and writes
validate.csv (one row per prompt and latent), validate.json and validate.png (scatter plots;
needs matplotlib) into --out.

With --demo, the prompts are fresh key-value lookups of the demo's task cut after
"Result = [[", so Y (predicted_prob) is the probability of the answer token (--mode, --hook and
--backend apply; the model runs on the CPU).
"""

from __future__ import annotations

from ._model import add_model_arguments, add_objective_arguments, objective_kwargs

HELP = "first-order scores vs integrated gradients vs exact ablation, on your model or the demo"


def add_arguments(p) -> None:
    g = p.add_argument_group("model and SAE")
    g.add_argument("--demo", action="store_true", help="use the bundled demo model, SAE and prompts")
    g.add_argument("--demo-sae", choices=("topk", "jumprelu"), default="topk",
                   help="which bundled SAE with --demo (default topk)")
    add_model_arguments(p, prompt=False, required=False, group=g)
    q = p.add_argument_group("prompts and methods")
    q.add_argument("--prompts-file", default=None, help="a text file, one prompt per line (not with --demo)")
    q.add_argument("--prompts", type=int, default=None,
                   help="how many prompts: the first N of --prompts-file, or N demo prompts (default 60 with --demo)")
    q.add_argument("--k", type=int, default=10, help="K of the Top-K overlap (default 10)")
    q.add_argument("--steps", type=int, default=16, help="integration steps of integrated gradients (default 16)")
    q.add_argument("--budget", type=int, default=64,
                   help="latents ablated per prompt, those with the largest first-order |score| (default 64)")
    q.add_argument("--batch-size", type=int, default=16, help="prompts per forward (default 16)")
    add_objective_arguments(q, default="predicted_prob")
    q.add_argument("--out", default="validate_out", help="output directory (default validate_out)")
    q.add_argument("--no-plot", action="store_true", help="do not write validate.png")


def _check(args) -> None:
    from ..errors import InputError

    for name in ("k", "steps", "budget", "batch_size"):
        v = getattr(args, name)
        if v < 1:
            raise InputError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    if args.prompts is not None and args.prompts < 1:
        raise InputError(f"--prompts must be >= 1, got {args.prompts}")
    if args.demo:
        if args.model or args.sae or args.prompts_file or args.tokenizer:
            raise InputError("--demo brings its own model, SAE and prompts; drop --model, --sae, --tokenizer and "
                             "--prompts-file (or drop --demo)")
    elif not (args.model and args.sae and args.prompts_file):
        raise InputError("give --demo, or --model, --sae and --prompts-file")


def _out_dir(path: str) -> None:
    """--out is a directory that can be created (or exists) and written to; nothing is left."""
    import os
    from pathlib import Path

    from ..errors import InputError
    from ._model import check_writable_file

    p = Path(path)
    if p.exists() and not p.is_dir():
        raise InputError(f"--out {path} exists and is not a directory")
    parent = p if p.is_dir() else p.parent
    if not parent.is_dir():
        raise InputError(f"--out {path}: the directory {parent} does not exist")
    check_writable_file(os.path.join(str(parent), ".gradsae-probe"), "--out")


def _read_prompts(path: str, n: int | None) -> list[str]:
    from ..errors import InputError

    try:
        with open(path, encoding="utf-8") as f:
            lines = [ln.strip() for ln in f if ln.strip()]
    except OSError as e:
        raise InputError(f"--prompts-file {path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise InputError(f"--prompts-file {path}: not UTF-8 text ({e.reason})") from None
    if not lines:
        raise InputError(f"--prompts-file {path} holds no prompt (one per line)")
    return lines[:n] if n else lines


def run(args) -> int:
    import time

    _check(args)
    objective_kwargs(args, None)  # option combinations, before anything loads
    _out_dir(args.out)
    t0 = time.perf_counter()
    if args.demo:
        import torch
        from transformers.utils import logging as hf_logging

        from .. import GradSAE
        from ..demo import bundle, task
        from ..demo.study import EVAL_SEED

        hf_logging.disable_progress_bar()
        torch.set_num_threads(1)  # a 64-wide model: more threads only add overhead
        model, tok = bundle.load_model()
        sae = bundle.load_demo_sae(args.demo_sae)
        scorer = GradSAE(model, sae, hook=args.hook or sae.hook_name, mode=args.mode, tokenizer=tok,
                         backend=args.backend)
        prompts = [e.prompt for e in task.examples(args.prompts or 60, EVAL_SEED + 7)]
    else:
        from ._model import build_scorer

        prompts = _read_prompts(args.prompts_file, args.prompts)
        scorer = build_scorer(args)
    kw = objective_kwargs(args, scorer.tokenizer)
    position = kw.pop("position", -1)
    v = scorer.validate(prompts, K=args.k, steps=args.steps, budget=args.budget, objective=args.objective,
                        position=position, batch_size=args.batch_size, **kw)
    paths = v.write(args.out, plot=not args.no_plot)
    print(v.table())
    print(f"wrote {paths['csv']} and {paths['json']}" + (f" and {paths['png']}" if paths["png"] else ""))
    if paths["png"] is None and not args.no_plot:
        print("note: matplotlib is not installed, so no scatter plot was written (pip install matplotlib)")
    print(f"total {time.perf_counter() - t0:.1f} s (model loading included)")
    return 0
