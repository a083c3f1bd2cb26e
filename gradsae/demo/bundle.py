"""The demo weights shipped inside the package (``gradsae/data/demo/``): a tiny Llama-style model trained
on key-value lookup (:mod:`gradsae.demo.task`) and two SAEs on its residual stream.

    model, tok = load_model()
    sae = load_demo_sae("topk")            # or "jumprelu"; a gradsae.SAE with its hook_name

They are written by ``scripts/train_demo.py``; nothing is downloaded.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from ..errors import InputError, SAEFormatError

SAE_KINDS = ("topk", "jumprelu")
MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
RETRAIN = "python scripts/train_demo.py (from a clone of the repository)"


def data_dir() -> Path:
    """Where the bundled demo lives (inside the installed package)."""
    return Path(str(resources.files("gradsae"))) / "data" / "demo"


def model_dir(root: Path | None = None) -> Path:
    """The bundled model directory, checked to hold every file ``from_pretrained`` needs."""
    d = (root or data_dir()) / "model"
    missing = [f for f in MODEL_FILES if not (d / f).is_file()]
    if missing:
        raise SAEFormatError(
            f"the bundled demo model is incomplete: {d} lacks {', '.join(missing)}; reinstall gradsae "
            f"or retrain it with {RETRAIN}"
        )
    return d


def sae_dir(kind: str, root: Path | None = None) -> Path:
    """The bundled SAE directory of ``kind`` (``topk`` or ``jumprelu``), SAELens layout."""
    if kind not in SAE_KINDS:
        raise InputError(f"unknown demo SAE {kind!r}; expected one of {SAE_KINDS}")
    d = (root or data_dir()) / f"sae_{kind}"
    if not (d / "cfg.json").is_file() or not (d / "sae_weights.safetensors").is_file():
        raise SAEFormatError(
            f"the bundled demo SAE is missing: {d} needs cfg.json and sae_weights.safetensors; "
            f"reinstall gradsae or retrain it with {RETRAIN}"
        )
    return d


def load_model(root: Path | None = None):
    """``(model, tokenizer)``: the bundled model (eval mode, float32, CPU) and its word-level
    tokenizer, loaded with transformers' ``from_pretrained``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = model_dir(root)
    tok = AutoTokenizer.from_pretrained(str(d))
    model = AutoModelForCausalLM.from_pretrained(str(d))
    model.eval()
    return model, tok


def load_demo_sae(kind: str = "topk", root: Path | None = None):
    """The bundled SAE of ``kind`` through :func:`gradsae.load_sae`."""
    from ..loading import load_sae

    sae = load_sae(sae_dir(kind, root))
    if not sae.hook_name:
        raise SAEFormatError(f"the bundled demo SAE {kind!r} names no hook in its cfg.json")
    return sae
