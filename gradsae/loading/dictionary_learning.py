"""dictionary_learning (saprmarks) checkpoints: a directory with ``ae.pt`` (a state dict saved
with ``torch.save``) and ``config.json`` (``{"trainer": {"dict_class": ..., "activation_dim",
"dict_size", "k", "layer", "lm_name", "submodule_name", ...}, "buffer": {...}}``).

The state dict is read with ``torch.load(weights_only=True)``; a file that needs arbitrary
unpickling is refused. Dictionaries, by ``dict_class``:

- ``AutoEncoder``: ``encoder.weight [F, D]``, ``encoder.bias [F]``, ``decoder.weight [D, F]``,
  ``bias [D]``; ``relu(encoder(x - bias))``, decoded ``decoder(f) + bias``. Like the library's
  own loader (``AutoEncoder.from_pretrained``, used by ``utils.load_dictionary``), the decoder
  columns are normalised to unit norm and the norms folded into the encoder: reconstructions
  are unchanged, latents are scaled by the decoder norms, and GradSAE influence
  ``z * dY/dz`` is unchanged.
- ``AutoEncoderNew``: ``encoder.weight``, ``encoder.bias``, ``decoder.weight``, ``decoder.bias``;
  ``relu(encoder(x))`` (no input bias subtraction), decoded ``decoder(f)``.
- ``AutoEncoderTopK``: ``encoder.*``, ``decoder.weight``, ``b_dec``, ``k``, ``threshold``;
  ``topk(relu(encoder(x - b_dec)))`` (its default encode: per-token top-k).
- ``BatchTopKSAE``: the same tensors; inference uses the learned scalar ``threshold``:
  ``f * (f > threshold)`` with ``f = relu(encoder(x - b_dec))`` (a gradsae ``jumprelu`` with a
  scalar threshold; an unset threshold of -1 keeps every positive latent).
- ``MatryoshkaBatchTopKSAE``: ``W_enc [D, F]``, ``b_enc``, ``W_dec [F, D]``, ``b_dec``, ``k``,
  ``threshold``, ``group_sizes``; evaluated like ``BatchTopKSAE`` with all groups active.
- ``JumpReluAutoEncoder``: ``W_enc``, ``b_enc``, ``W_dec``, ``b_dec``, ``threshold [F]``;
  ``relu(pre * (pre > threshold))`` without subtracting ``b_dec`` (the class's default).
- ``GatedAutoEncoder``: ``encoder.weight [F, D]`` (no bias), ``gate_bias``, ``r_mag``,
  ``mag_bias``, ``decoder.weight``, ``decoder_bias``; evaluated in its exact JumpReLU form
  (:func:`gradsae.loading.objects.gated_as_jumprelu`).

Metadata: ``lm_name`` -> ``model_name``, ``layer`` -> ``hook_layer``, ``submodule_name`` ->
``hook_name``; the whole config is kept in ``metadata["config"]``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..sae import SAE
from .readers import build_sae, check_config_dims, fail, get_tensor, read_json, read_torch_state_dict

WEIGHTS_FILENAME = "ae.pt"
CFG_FILENAME = "config.json"
SUPPORTED = (
    "AutoEncoder", "AutoEncoderNew", "AutoEncoderTopK", "BatchTopKSAE",
    "MatryoshkaBatchTopKSAE", "JumpReluAutoEncoder", "GatedAutoEncoder",
)


def find_files(path: Path) -> tuple[Path, Path]:
    """``(config.json, weights)`` for a directory or a ``.pt`` file in it (intermediate
    checkpoints ``checkpoints/ae_<step>.pt`` find the run's ``config.json`` one level up)."""
    if path.is_file() and path.suffix == ".pt":
        weights = path
        cfg = path.parent / CFG_FILENAME
        if not cfg.is_file() and (path.parent.parent / CFG_FILENAME).is_file():
            cfg = path.parent.parent / CFG_FILENAME
        return cfg, weights
    folder = path.parent if path.is_file() else path
    return folder / CFG_FILENAME, folder / WEIGHTS_FILENAME


def _scalar(state: dict, name: str, file: Path) -> float | None:
    if name not in state:
        return None
    t = get_tensor(state, name, file)
    if t.numel() != 1:
        raise fail(file, f"tensor {name!r} has shape {list(t.shape)}, expected a scalar")
    return t.reshape(()).item()


def load_dictionary_learning(path: Path, device: Any = "cpu", dtype: Any = None) -> SAE:
    """Load a dictionary_learning ``ae.pt`` + ``config.json`` (directory or the ``.pt`` file)."""
    cfg_file, weights_file = find_files(path)
    config = read_json(cfg_file, "dictionary_learning config naming the dictionary class")
    trainer = config.get("trainer")
    if not isinstance(trainer, dict) or "dict_class" not in trainer:
        raise fail(cfg_file, "missing trainer.dict_class (which dictionary class the checkpoint holds)")
    dict_class = trainer["dict_class"]
    if dict_class not in SUPPORTED:
        raise fail(
            cfg_file,
            f"unsupported dictionary class {dict_class!r}; gradsae loads {', '.join(SUPPORTED)}",
        )
    state = read_torch_state_dict(weights_file)
    if "ae" in state and isinstance(state.get("ae"), dict) and "optimizer" in state:
        raise fail(
            weights_file,
            "is a training backup (step/ae/optimizer), not a final state dict; load the ae.pt "
            "written at the end of training",
        )

    def T(name: str) -> torch.Tensor:
        return get_tensor(state, name, weights_file)

    kw: dict[str, Any] = {}
    threshold = None
    if dict_class in ("AutoEncoder", "AutoEncoderNew", "AutoEncoderTopK", "BatchTopKSAE"):
        enc_w, enc_b, dec_w = T("encoder.weight"), T("encoder.bias"), T("decoder.weight")
        if enc_w.dim() != 2:
            raise fail(weights_file, f"tensor 'encoder.weight' has shape {list(enc_w.shape)}, expected [dict_size, activation_dim]")
        F, D = enc_w.shape
        if tuple(dec_w.shape) != (D, F):
            raise fail(weights_file, f"tensor 'decoder.weight' has shape {list(dec_w.shape)}, expected [{D}, {F}] (from encoder.weight)")
        W_enc, b_enc, W_dec = enc_w.T, enc_b, dec_w.T
        if dict_class == "AutoEncoder":
            b_dec = T("bias")
            norms = dec_w.norm(dim=0)
            norms = torch.where(norms > 0, norms, torch.ones_like(norms))
            if not torch.allclose(norms, torch.ones_like(norms)):
                W_enc, b_enc, W_dec = W_enc * norms, b_enc * norms, W_dec / norms.unsqueeze(-1)
            kw.update(activation="relu", apply_b_dec_to_input=True)
        elif dict_class == "AutoEncoderNew":
            b_dec = T("decoder.bias")
            kw.update(activation="relu", apply_b_dec_to_input=False)
        else:
            b_dec = T("b_dec")
            k_state = _scalar(state, "k", weights_file)
            k = trainer.get("k", k_state)
            if k is None:
                raise fail(weights_file, "missing k (neither the state dict nor config.json has it)")
            if k_state is not None and int(k_state) != int(k):
                raise fail(weights_file, f"state dict has k={int(k_state)} but {cfg_file.name} says k={k}")
            if dict_class == "AutoEncoderTopK":
                kw.update(activation="topk", k=int(k), apply_b_dec_to_input=True)
            else:
                thr = _scalar(state, "threshold", weights_file)
                if thr is None:
                    raise fail(weights_file, "missing tensor 'threshold' (BatchTopK inference threshold)")
                threshold = float(thr)
                kw.update(activation="jumprelu", apply_b_dec_to_input=True)
    elif dict_class == "GatedAutoEncoder":
        from .objects import gated_as_jumprelu

        enc_w, dec_w = T("encoder.weight"), T("decoder.weight")
        if enc_w.dim() != 2:
            raise fail(weights_file, f"tensor 'encoder.weight' has shape {list(enc_w.shape)}, expected [dict_size, activation_dim]")
        F, D = enc_w.shape
        if tuple(dec_w.shape) != (D, F):
            raise fail(weights_file, f"tensor 'decoder.weight' has shape {list(dec_w.shape)}, expected [{D}, {F}] (from encoder.weight)")
        W_enc, b_enc, threshold = gated_as_jumprelu(enc_w.T, T("gate_bias"), T("r_mag"), T("mag_bias"))
        W_dec, b_dec = dec_w.T, T("decoder_bias")
        kw.update(activation="jumprelu", apply_b_dec_to_input=True)
    else:
        W_enc, b_enc, W_dec, b_dec = T("W_enc"), T("b_enc"), T("W_dec"), T("b_dec")
        if W_enc.dim() != 2:
            raise fail(weights_file, f"tensor 'W_enc' has shape {list(W_enc.shape)}, expected [activation_dim, dict_size]")
        D, F = W_enc.shape
        if dict_class == "JumpReluAutoEncoder":
            threshold = T("threshold")
            kw.update(activation="jumprelu", apply_b_dec_to_input=False)
        else:  # MatryoshkaBatchTopKSAE
            thr = _scalar(state, "threshold", weights_file)
            if thr is None:
                raise fail(weights_file, "missing tensor 'threshold' (BatchTopK inference threshold)")
            if "group_sizes" in state:
                total = int(T("group_sizes").sum())
                if total != F:
                    raise fail(weights_file, f"group_sizes sum to {total} but dict_size is {F}")
            threshold = float(thr)
            kw.update(activation="jumprelu", apply_b_dec_to_input=True)

    check_config_dims(weights_file, cfg_file, D, F, trainer.get("activation_dim"), trainer.get("dict_size"))
    layer = trainer.get("layer")
    return build_sae(
        weights_file,
        W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, b_dec=b_dec, threshold=threshold,
        device=device, dtype=dtype,
        hook_name=trainer.get("submodule_name"), model_name=trainer.get("lm_name"),
        hook_layer=int(layer) if isinstance(layer, (int, float)) else None,
        metadata={"format": "dictionary_learning", "dict_class": dict_class, "config": config},
        **kw,
    )
