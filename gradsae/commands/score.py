"""Score a whole corpus with GradSAE: per-latent influence statistics and top examples.

    gradsae score --model gpt2 --sae ./sae --hook blocks.6.hook_resid_post \\
                  --data corpus.jsonl --field text --out runs/l6

Writes latents.parquet (one row per latent: statistics and top examples), stats.safetensors,
examples.safetensors, report.png (with matplotlib) and meta.json into --out.

Several SAEs in one forward and backward per batch: repeat --sae (and --hook, one per --sae,
in the same order; without --hook each SAE's own hook_name):

    gradsae score --model gpt2 --sae ./sae3 --hook blocks.3.hook_resid_post \
                  --sae ./sae6 --hook blocks.6.hook_resid_post --data corpus.jsonl --out runs/l3-l6

Each hook's files go to --out/hooks/<hook>/, with one meta.json for the run in --out.

The sign: the default objective Y is the log-likelihood of the actual next token (loglik), so
a positive influence means the latent helps the model predict the text; --objective loss
flips it. meta.json says which.

Everything that can be checked is checked before the model loads or the first batch runs
(output directory writable, device, model and data paths, sequence length, hook). Checkpoints
go to --out/checkpoint; after Ctrl-C, a crash, a kill or a full disk, run the same command
with --resume (the settings and the documents read so far must be the same). On several
processes or nodes:

    torchrun --nproc-per-node 4 -m gradsae score ...   (same arguments)
"""

from __future__ import annotations

from ._model import add_objective_arguments

HELP = "score a corpus: per-latent influence statistics and top examples"


def add_arguments(p) -> None:
    g = p.add_argument_group("model and SAE")
    g.add_argument("--model", required=True, help="transformers model directory or hub id")
    g.add_argument("--tokenizer", default=None, help="tokenizer directory or hub id (default: --model)")
    g.add_argument("--sae", required=True, action="append",
                   help="SAE directory or file (any format gradsae.load_sae reads); repeat it to score several "
                        "SAEs in one pass")
    g.add_argument("--hook", default=None, action="append",
                   help="hook name or module path (default: the SAE's hook_name; another hook gives a warning); "
                        "with several --sae, one --hook per --sae in the same order")
    g.add_argument("--mode", choices=("splice", "error"), default="splice",
                   help="splice: the model runs on the SAE's reconstruction (default, the paper); "
                        "error: the reconstruction error is added back, so the model's output is unchanged")
    add_objective_arguments(g, default="loglik")
    g.add_argument("--backend", default="auto", help="influence backend (see `gradsae info`)")
    g.add_argument("--method", choices=("grad", "ig"), default="grad",
                   help="grad: the first-order score z * dY/dz (default, the paper); ig: integrated gradients "
                        "from zero at the SAE's latents, --steps forward/backward passes per batch (one SAE)")
    g.add_argument("--steps", type=int, default=16, help="--method ig: steps of the path (default 16)")
    d = p.add_argument_group("data")
    d.add_argument("--data", required=True, help="text file (one document per line), .jsonl, .parquet, "
                                                "or a datasets directory (save_to_disk)")
    d.add_argument("--format", choices=("text", "jsonl", "parquet", "datasets"), default=None,
                   help="data format (default: from the path)")
    d.add_argument("--field", default="text", help="JSONL field / column holding the text (default: text)")
    d.add_argument("--split", default=None, help="split of a DatasetDict directory")
    d.add_argument("--encoding-errors", choices=("strict", "replace", "ignore", "skip"), default="strict",
                   help="lines that are not UTF-8: fail (default), replace/ignore bad bytes, or skip the line")
    d.add_argument("--max-length", type=int, default=None,
                   help="tokens per sequence (default: the model's positions, at most 1024; more is refused)")
    d.add_argument("--long", choices=("window", "truncate"), default="window",
                   help="long documents: cut into consecutive windows (default) or truncate")
    d.add_argument("--batch-tokens", type=int, default=8192, help="padded tokens per batch (default 8192)")
    r = p.add_argument_group("run")
    r.add_argument("--out", required=True, help="output directory")
    r.add_argument("--top-n", type=int, default=10, help="top examples kept per latent (default 10)")
    r.add_argument("--context", type=int, default=8, help="tokens of context either side of an example (default 8)")
    r.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    r.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="dtype the model is loaded in (default float32)")
    r.add_argument("--bf16", action="store_true", help="run the model under bf16 autocast")
    r.add_argument("--checkpoint-every", type=int, default=None, metavar="BATCHES",
                   help="checkpoint after this many batches")
    r.add_argument("--checkpoint-interval", type=float, default=600.0, metavar="SECONDS",
                   help="checkpoint after this many seconds (default 600); Ctrl-C and I/O errors also write one")
    r.add_argument("--resume", action="store_true", help="continue the unfinished run in --out")
    r.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    r.add_argument("--no-progress", action="store_true",
                   help="no progress bars (model loading included) and no summary line")


def config_from_args(args, objective_kwargs: dict | None = None, device: str | None = None):
    """The :class:`gradsae.corpus.RunConfig` of the command's options."""
    from ..corpus import RunConfig

    return RunConfig(
        hook=hooks_of(args), objective=args.objective, objective_kwargs=objective_kwargs or {}, mode=args.mode,
        max_length=args.max_length, long=args.long, batch_tokens=args.batch_tokens, top_n=args.top_n,
        context=args.context, autocast="bf16" if args.bf16 else None, backend=args.backend, method=args.method,
        steps=args.steps, field=args.field,
        format=args.format, split=args.split, encoding_errors=args.encoding_errors, out=args.out, device=device,
        checkpoint_every=args.checkpoint_every, checkpoint_interval=args.checkpoint_interval, resume=args.resume,
        overwrite=args.overwrite, progress=not args.no_progress)


def hooks_of(args):
    """``--hook`` as :class:`RunConfig` takes it: one hook or None for one ``--sae``, a list
    (one per ``--sae``) or None for several."""
    from ..errors import InputError

    saes = args.sae if isinstance(args.sae, list) else [args.sae]
    hooks = args.hook if isinstance(args.hook, list) or args.hook is None else [args.hook]
    if hooks is not None and len(hooks) != len(saes):
        raise InputError(f"{len(saes)} --sae need one --hook each (or no --hook: each SAE's own hook_name); "
                         f"got {len(hooks)} --hook")
    if len(saes) == 1:
        return hooks[0] if hooks else None
    return hooks


def run(args) -> int:
    import os

    from ..corpus import open_corpus, run_corpus
    from ..corpus.preflight import sae_hook
    from ..corpus.resume import check_out_dir, probe_writable
    from ._model import check_source, load_model, load_sae_arg, load_tokenizer, objective_kwargs, quiet_loading
    from ._model import resolve_device

    # Everything that needs no model first, cheapest first: settings, device, data, output
    # directory, model and tokenizer names, then the SAE; the model loads last.
    cfg = config_from_args(args, objective_kwargs(args, None))
    device = resolve_device(args.device)
    corpus = open_corpus(args.data, format=args.format, field=args.field, split=args.split,
                         encoding_errors=args.encoding_errors)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    check_out_dir(cfg.out, rank, world, cfg.resume, cfg.overwrite)
    if rank == 0:
        probe_writable(cfg.out)
    check_source(args.model, "--model")
    if args.tokenizer:
        check_source(args.tokenizer, "--tokenizer", "tokenizer")
    paths = args.sae if isinstance(args.sae, list) else [args.sae]
    hooks = hooks_of(args)
    saes = [load_sae_arg(p, device) for p in paths]
    for sv, h in zip(saes, hooks if isinstance(hooks, list) else [hooks] * len(saes)):
        sae_hook(sv, h)
    sae = saes[0] if len(saes) == 1 else saes
    with quiet_loading(args.no_progress):
        tok = load_tokenizer(args.tokenizer or args.model, "--tokenizer" if args.tokenizer else "--model")
        cfg = config_from_args(args, objective_kwargs(args, tok), device)
        model = load_model(args.model, args.dtype, device)
    run_corpus(model, sae, corpus, cfg, tokenizer=tok)
    return 0
