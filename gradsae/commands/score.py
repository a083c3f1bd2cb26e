"""Score a whole corpus with GradSAE: per-latent influence statistics and top examples.

    gradsae score --model gpt2 --sae ./sae --hook blocks.6.hook_resid_post \\
                  --data corpus.jsonl --field text --out runs/l6

Writes stats.safetensors, examples.safetensors, latents.parquet (one row per latent),
report.png and meta.json into --out. Checkpoints go to --out/checkpoint; after a crash or a
kill, run the same command with --resume. On several processes or nodes:

    torchrun --nproc-per-node 4 -m gradsae score ...   (same arguments)
"""

from __future__ import annotations

HELP = "score a corpus: per-latent influence statistics and top examples"


def add_arguments(p) -> None:
    g = p.add_argument_group("model and SAE")
    g.add_argument("--model", required=True, help="transformers model name or local directory")
    g.add_argument("--tokenizer", default=None, help="tokenizer name or directory (default: --model)")
    g.add_argument("--sae", required=True, help="SAE directory or file (any format gradsae.load_sae reads)")
    g.add_argument("--hook", default=None, help="hook name or module path (default: the SAE's hook_name)")
    g.add_argument("--mode", choices=("splice", "error"), default="splice")
    g.add_argument("--objective", default="loss", help="loss (default), predicted_prob, ...")
    g.add_argument("--backend", default="auto", help="influence backend (see `gradsae info`)")
    d = p.add_argument_group("data")
    d.add_argument("--data", required=True, help="text file (one document per line), .jsonl, .parquet, "
                                                "or a datasets directory (save_to_disk)")
    d.add_argument("--format", choices=("text", "jsonl", "parquet", "datasets"), default=None,
                   help="data format (default: from the path)")
    d.add_argument("--field", default="text", help="JSONL field / column holding the text (default: text)")
    d.add_argument("--split", default=None, help="split of a DatasetDict directory")
    d.add_argument("--encoding-errors", choices=("strict", "replace", "ignore", "skip"), default="strict",
                   help="lines that are not UTF-8: fail (default), replace/ignore bad bytes, or skip the line")
    d.add_argument("--max-length", type=int, default=None, help="tokens per sequence (default: model context, <=1024)")
    d.add_argument("--long", choices=("window", "truncate"), default="window",
                   help="long documents: cut into consecutive windows (default) or truncate")
    d.add_argument("--batch-tokens", type=int, default=8192, help="padded tokens per batch (default 8192)")
    r = p.add_argument_group("run")
    r.add_argument("--out", required=True, help="output directory")
    r.add_argument("--top-n", type=int, default=10, help="top examples kept per latent (default 10)")
    r.add_argument("--context", type=int, default=8, help="tokens of context either side of an example")
    r.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    r.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="dtype the model is loaded in")
    r.add_argument("--bf16", action="store_true", help="run the model under bf16 autocast")
    r.add_argument("--checkpoint-every", type=int, default=None, metavar="BATCHES",
                   help="checkpoint after this many batches")
    r.add_argument("--checkpoint-interval", type=float, default=600.0, metavar="SECONDS",
                   help="checkpoint after this many seconds (default 600)")
    r.add_argument("--resume", action="store_true", help="continue the unfinished run in --out")
    r.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    r.add_argument("--no-progress", action="store_true", help="no progress bar or summary line")


def load_model(name: str, dtype: str = "float32", device: str | None = None):
    """A transformers causal LM (eval mode) and its tokenizer."""
    import torch
    import transformers as tf

    from ..errors import InputError

    try:
        # transformers 5 names the argument dtype; 4.x takes torch_dtype
        key = "dtype" if int(tf.__version__.split(".")[0]) >= 5 else "torch_dtype"
        model = tf.AutoModelForCausalLM.from_pretrained(name, **{key: getattr(torch, dtype)})
    except OSError as e:
        raise InputError(f"cannot load model {name!r}: {e}") from e
    model.eval()
    if device is not None:
        model.to(device)
    return model


def load_tokenizer(name: str):
    import transformers as tf

    from ..errors import InputError

    try:
        return tf.AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise InputError(f"cannot load tokenizer {name!r}: {e}") from e


def run(args) -> int:
    import os

    import torch

    from .. import load_sae
    from ..corpus import open_corpus, score_corpus

    # Open the data first: a bad path or format fails before the model loads.
    corpus = open_corpus(args.data, format=args.format, field=args.field, split=args.split,
                         encoding_errors=args.encoding_errors)
    device = args.device
    if device is None:
        if torch.cuda.is_available():
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        else:
            device = "cpu"
    model = load_model(args.model, args.dtype, device)
    tok = load_tokenizer(args.tokenizer or args.model)
    sae = load_sae(args.sae, device=device)
    score_corpus(
        model, sae, corpus, hook=args.hook, objective=args.objective, mode=args.mode, tokenizer=tok, out=args.out,
        max_length=args.max_length, long=args.long, batch_tokens=args.batch_tokens, top_n=args.top_n,
        context=args.context, autocast="bf16" if args.bf16 else None, device=device,
        checkpoint_every=args.checkpoint_every, checkpoint_interval=args.checkpoint_interval, resume=args.resume,
        overwrite=args.overwrite, progress=not args.no_progress, backend=args.backend,
    )
    return 0
