"""Helpers shared by the commands: loading a model, tokenizer and SAE from command-line names
(checked before anything heavy loads), the options common to the commands that run GradSAE on
one prompt (select, ablate, steer, experiment), and small parsers.

Every error here is a :class:`gradsae.InputError` with a message naming the option.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path

from ..errors import InputError

# a Hugging Face Hub repository id: "name" or "namespace/name"
_HUB_ID = re.compile(r"^[A-Za-z0-9](?:[\w.-]{0,94}[A-Za-z0-9_])?(?:/[A-Za-z0-9](?:[\w.-]{0,94}[A-Za-z0-9_])?)?$")

OBJECTIVE_CHOICES = ("predicted_prob", "logprob", "logit_diff", "loglik", "loss")


# ---------------------------------------------------------------------------- checks
def check_source(name: str, option: str, what: str = "model") -> None:
    """``name`` is a local directory holding a transformers ``what`` (config.json /
    tokenizer files), or could be a hub id; otherwise an :class:`InputError` naming
    ``option``. A path that does not exist is reported as such, not as a bad hub id."""
    p = Path(os.path.expanduser(name))
    if p.exists():
        if not p.is_dir():
            raise InputError(f"{option} {name}: not a directory (a transformers {what} directory or a hub id)")
        need = ("config.json",) if what == "model" else (
            "tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "vocab.txt")
        if not any((p / f).is_file() for f in need):
            raise InputError(f"{option} {name}: not a transformers {what} directory (no {' or '.join(need[:2])})")
        return
    looks_local = name.startswith(("/", "./", "../", "~", ".\\")) or name.count("/") > 1 or "\\" in name
    if looks_local:
        raise InputError(f"{option} {name}: no such directory")
    if not _HUB_ID.match(name) or "--" in name or ".." in name:
        raise InputError(f"{option} {name!r}: no such directory, and not a hub id (name or namespace/name)")


def resolve_device(device: str | None) -> str:
    """The device to run on: ``device`` checked to exist, or CUDA (the local rank's GPU
    under torchrun) when there is one, else cpu."""
    import torch

    from ..corpus.preflight import check_device

    if device is None:
        if torch.cuda.is_available():
            return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        return "cpu"
    check_device(device)
    return device


@contextlib.contextmanager
def quiet_loading(quiet: bool):
    """Hide transformers' weight-loading progress bars inside the block (``--no-progress``)."""
    if not quiet:
        yield
        return
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def load_model(name: str, dtype: str = "float32", device: str | None = None):
    """A transformers causal LM (eval mode) from a directory or hub id, on ``device``."""
    import torch
    import transformers as tf

    check_source(name, "--model")
    try:
        # transformers 5 names the argument dtype; 4.x takes torch_dtype
        key = "dtype" if int(tf.__version__.split(".")[0]) >= 5 else "torch_dtype"
        model = tf.AutoModelForCausalLM.from_pretrained(name, **{key: getattr(torch, dtype)})
    except (OSError, ValueError) as e:
        raise InputError(f"cannot load model {name!r}: {e}") from e
    model.eval()
    if device is not None:
        model.to(device)
    return model


def load_tokenizer(name: str, option: str = "--tokenizer"):
    """A transformers tokenizer from a directory or hub id."""
    import transformers as tf

    check_source(name, option, "tokenizer")
    try:
        return tf.AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise InputError(f"cannot load tokenizer {name!r}: {e}") from e


def load_sae_arg(path: str, device: str):
    """The SAE named by ``--sae``: a local path (any format :func:`gradsae.load_sae` reads), or
    ``repo_id:folder`` on the Hugging Face Hub, or ``release:sae_id`` of SAELens' registry."""
    import os

    from .. import load_sae

    if ":" in path and not os.path.exists(os.path.expanduser(path)):
        source, sae_id = path.split(":", 1)
        return load_sae(source, sae_id, device=device)
    return load_sae(path, device=device)


# ---------------------------------------------------------------------------- objectives
def add_objective_arguments(g, default: str, position: bool = True) -> None:
    """``--objective`` with ``--target`` / ``--target-b`` (and ``--position``)."""
    g.add_argument("--objective", choices=OBJECTIVE_CHOICES, default=default,
                   help="the scalar Y whose gradient scores the latents; a positive score means the latent "
                        "raises Y. loglik: mean log-probability of each actual next token (positive = helps "
                        "the model predict the text); loss: mean next-token loss (positive = hurts it); "
                        "predicted_prob: probability of the model's own next token (the paper's); "
                        "logprob: log-probability of --target; logit_diff: logit of --target minus logit "
                        f"of --target-b (default {default})")
    g.add_argument("--target", default=None, metavar="TOKEN",
                   help="the token of logprob, or token a of logit_diff: a token id, or text that is one token")
    g.add_argument("--target-b", default=None, metavar="TOKEN",
                   help="token b of logit_diff: a token id, or text that is one token")
    if position:
        g.add_argument("--position", type=int, default=-1,
                       help="where predicted_prob, logprob and logit_diff read the logits, counted within "
                            "each sequence's tokens (default -1: its last token)")


def token_id(tok, text: str, option: str) -> int:
    """A token id from ``--target``-style text: an integer, or text that is exactly one token
    (``tok`` None: only the form is checked, and 0 stands for the id)."""
    s = str(text).strip()
    if re.fullmatch(r"\d+", s):
        return int(s)
    if tok is None:
        return 0
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise InputError(f"{option} {text!r} is {len(ids)} tokens for this tokenizer ({ids}); pass text that is "
                         "one token, or a token id")
    return int(ids[0])


def objective_kwargs(args, tok) -> dict:
    """The objective's keyword arguments from ``--target``, ``--target-b``, ``--position``
    (``tok`` None: checked without a tokenizer, token texts standing as 0)."""
    obj = args.objective
    kw: dict = {}
    if obj == "logprob":
        if args.target is None:
            raise InputError("--objective logprob needs --target TOKEN")
        if args.target_b is not None:
            raise InputError("--target-b is for --objective logit_diff")
        kw["target"] = token_id(tok, args.target, "--target")
    elif obj == "logit_diff":
        if args.target is None or args.target_b is None:
            raise InputError("--objective logit_diff needs --target TOKEN and --target-b TOKEN")
        kw["a"] = token_id(tok, args.target, "--target")
        kw["b"] = token_id(tok, args.target_b, "--target-b")
    elif args.target is not None or args.target_b is not None:
        raise InputError(f"--target and --target-b are for --objective logprob and logit_diff, not {obj}")
    pos = getattr(args, "position", -1)
    if obj not in ("loglik", "loss"):
        kw["position"] = pos
    elif pos != -1:
        raise InputError(f"--position is for predicted_prob, logprob and logit_diff; {obj} reads every position")
    return kw


# ---------------------------------------------------------------------------- one-prompt commands
def add_model_arguments(p, prompt: bool = True, required: bool = True, group=None) -> None:
    """The options that build a scorer (``--model``, ``--sae``, ``--hook``, ``--mode``,
    ``--device``, ``--dtype``, ``--backend``; ``prompt``: also ``--prompt``/``--prompt-file``,
    ``--max-new-tokens`` and ``--json``). ``required=False`` for a command with another source
    (``--demo``); ``group``: an argument group to add them to."""
    g = group if group is not None else p.add_argument_group("model and SAE")
    g.add_argument("--model", required=required, help="transformers model directory (or hub name)")
    g.add_argument("--tokenizer", default=None, help="tokenizer directory (default: --model)")
    g.add_argument("--sae", required=required,
                   help="SAE directory or file (any format gradsae.load_sae reads), repo_id:folder on the "
                        "Hugging Face Hub, or a SAELens release:sae_id")
    g.add_argument("--hook", default=None, help="hook name or module path (default: the SAE's hook_name)")
    g.add_argument("--mode", choices=("splice", "error"), default="splice",
                   help="splice: the model runs on the SAE reconstruction (default, the paper); "
                        "error: the reconstruction error is added back")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    g.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="dtype the model is loaded in (default float32)")
    g.add_argument("--backend", default="auto", help="influence backend (see `gradsae info`)")
    if prompt:
        q = p.add_argument_group("prompt")
        src = q.add_mutually_exclusive_group(required=True)
        src.add_argument("--prompt", help="the prompt text")
        src.add_argument("--prompt-file", help="a file holding the prompt text")
        q.add_argument("--max-new-tokens", type=int, default=50, help="greedy generation length (default 50)")
        q.add_argument("--json", action="store_true", help="print the result as JSON")


def read_prompt(args) -> str:
    if args.prompt is not None:
        return args.prompt
    try:
        with open(args.prompt_file, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise InputError(f"--prompt-file {args.prompt_file}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise InputError(f"--prompt-file {args.prompt_file}: not UTF-8 text ({e.reason})") from None


def check_common(args) -> str:
    """Checks of the model options that need nothing loaded; returns the device."""
    if getattr(args, "max_new_tokens", 1) is not None and getattr(args, "max_new_tokens", 1) < 1:
        raise InputError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    device = resolve_device(args.device)
    check_source(args.model, "--model")
    if args.tokenizer:
        check_source(args.tokenizer, "--tokenizer", "tokenizer")
    return device


def build_scorer(args, quiet: bool = False):
    """Load model, tokenizer and SAE (cheapest checks first) and splice them into a
    :class:`gradsae.GradSAE`; warn when ``--hook`` is not the SAE's own."""
    from .. import GradSAE
    from ..corpus.preflight import check_hook, sae_hook

    device = check_common(args)
    sae = load_sae_arg(args.sae, device)  # fail on a bad SAE before the model loads
    hook = sae_hook(sae, args.hook)
    with quiet_loading(quiet):
        tok = load_tokenizer(args.tokenizer or args.model, "--tokenizer" if args.tokenizer else "--model")
        model = load_model(args.model, args.dtype, device)
    scorer = GradSAE(model, sae, hook=hook, mode=args.mode, tokenizer=tok, backend=args.backend)
    check_hook(scorer, sae)
    return scorer


def check_writable_file(path: str, option: str) -> None:
    """``path`` can be written (its directory exists and takes a file): checked by writing
    and removing a probe file beside it, before any work."""
    from ..corpus.resume import probe_writable

    p = Path(path)
    if p.is_dir():
        raise InputError(f"{option} {path} is a directory; give a file name")
    if not p.parent.is_dir():
        raise InputError(f"{option} {path}: the directory {p.parent} does not exist")
    try:
        probe_writable(p.parent)
    except InputError as e:
        raise InputError(f"{option} {path}: {e}") from None


# ---------------------------------------------------------------------------- parsers
def parse_k(text: str, option: str = "--k"):
    """One K (of ``option``): ``"10"`` -> 10, ``"50%"`` -> 0.5, ``"0.5"`` -> 0.5."""
    s = str(text).strip()
    try:
        if s.endswith("%"):
            k = float(s[:-1]) / 100.0
        elif re.fullmatch(r"\d+", s):
            return int(s)
        else:
            k = float(s)
    except ValueError:
        raise InputError(f"{option}: K must be an int, a fraction or a percentage (10, 0.5, 50%), "
                         f"got {text!r}") from None
    if not 0.0 < k <= 1.0:
        raise InputError(f"{option}: a fractional K must be in (0, 1] (or a percentage up to 100%), got {text!r}")
    return k


def parse_latents(text: str | None) -> list[int]:
    if not text:
        return []
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError as e:
        raise InputError(f"latents must be comma-separated integers, got {text!r}") from e


def check_latents(ids, d_sae: int, option: str) -> None:
    """Latent ids given with ``option`` are in ``[0, d_sae)``."""
    bad = [j for j in ids if not 0 <= int(j) < d_sae]
    if bad:
        raise InputError(f"{option}: latent ids must be in [0, {d_sae}) for this SAE, got {bad[:10]}")


def parse_pairs(items, what: str) -> dict[int, float]:
    """``["12=3.5", "7=-1"]`` -> ``{12: 3.5, 7: -1.0}``."""
    out = {}
    for item in items or []:
        for part in item.split(","):
            if not part.strip():
                continue
            try:
                j, v = part.split("=")
                out[int(j)] = float(v)
            except ValueError as e:
                raise InputError(f"{what} takes LATENT=VALUE pairs, got {part!r}") from e
    return out


def emit(args, payload: dict, text: str) -> None:
    print(json.dumps(payload, indent=2) if getattr(args, "json", False) else text)
