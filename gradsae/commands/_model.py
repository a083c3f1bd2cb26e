"""Arguments and setup shared by the commands that run GradSAE on one model
(select, ablate, steer, experiment)."""

from __future__ import annotations

import json


def add_model_arguments(p, prompt: bool = True) -> None:
    g = p.add_argument_group("model and SAE")
    g.add_argument("--model", required=True, help="transformers model directory (or hub name)")
    g.add_argument("--tokenizer", default=None, help="tokenizer directory (default: --model)")
    g.add_argument("--sae", required=True, help="SAE directory or file (any format gradsae.load_sae reads)")
    g.add_argument("--hook", default=None, help="hook name or module path (default: the SAE's hook_name)")
    g.add_argument("--mode", choices=("splice", "error"), default="splice",
                   help="splice: the model runs on the SAE reconstruction (default, the paper); "
                        "error: the reconstruction error is added back")
    g.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    g.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
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
    with open(args.prompt_file, encoding="utf-8") as f:
        return f.read()


def build_scorer(args):
    """Load model, tokenizer and SAE and splice them into a :class:`gradsae.GradSAE`."""
    import torch

    from .. import GradSAE, load_sae
    from .score import load_model, load_tokenizer

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    sae = load_sae(args.sae, device=device)  # fail on a bad SAE before the model loads
    model = load_model(args.model, args.dtype, device)
    tok = load_tokenizer(args.tokenizer or args.model)
    return GradSAE(model, sae, hook=args.hook, mode=args.mode, tokenizer=tok, backend=args.backend)


def parse_k(text: str):
    """``"10"`` -> 10, ``"50%"`` -> 0.5, ``"0.5"`` -> 0.5."""
    from ..experiments import parse_ks

    (k,) = parse_ks(text) if "," not in str(text) else (None,)
    return k


def parse_latents(text: str | None) -> list[int]:
    from ..errors import InputError

    if not text:
        return []
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError as e:
        raise InputError(f"latents must be comma-separated integers, got {text!r}") from e


def parse_pairs(items, what: str) -> dict[int, float]:
    """``["12=3.5", "7=-1"]`` -> ``{12: 3.5, 7: -1.0}``."""
    from ..errors import InputError

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
