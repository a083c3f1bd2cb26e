"""Writers of SAE checkpoints laid out exactly as the original libraries write them.

Written from those libraries' save code, independently of gradsae (never with gradsae's own
save): the file names, tensor names, orientations, dtypes and config keys below are what
SAELens, sparsify, Gemma Scope and dictionary_learning put on disk. Each writer returns the raw
arrays it wrote (float64 copies) so tests can evaluate the library's own formula from them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file


def rand(*shape, scale=1.0, dtype=torch.float32):
    return (torch.randn(*shape, dtype=torch.float64) * scale).to(dtype)


def _f64(d: dict) -> dict:
    return {k: (v.to(torch.float64) if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in d.items()}


# ------------------------------------------------------------------------------------ SAELens
def write_saelens(
    folder: Path,
    arch: str,
    d_in: int,
    d_sae: int,
    *,
    k: int = 4,
    hook_name: str = "blocks.3.hook_resid_post",
    model_name: str = "gpt2",
    normalize_activations: str = "none",
    rescale_acts_by_decoder_norm: bool = False,
    apply_b_dec_to_input: bool = True,
    dtype: torch.dtype = torch.float32,
    threshold_key: str = "threshold",
    version: str = "6.5.1",
) -> dict:
    """An SAELens >= 6 ``SAE.save_model`` directory: cfg.json = ``cfg.to_dict()`` (fields,
    ``metadata`` dict, ``architecture``) and sae_weights.safetensors = the state dict."""
    folder.mkdir(parents=True, exist_ok=True)
    w = {
        "W_enc": rand(d_in, d_sae, scale=0.3, dtype=dtype),
        "b_enc": rand(d_sae, scale=0.1, dtype=dtype),
        "W_dec": rand(d_sae, d_in, scale=0.3, dtype=dtype),
        "b_dec": rand(d_in, scale=0.1, dtype=dtype),
    }
    if arch == "jumprelu":
        thr = (torch.rand(d_sae, dtype=torch.float64) * 0.3 + 0.05).to(dtype)
        w[threshold_key] = thr.log() if threshold_key == "log_threshold" else thr
    save_file(w, str(folder / "sae_weights.safetensors"))
    cfg = {
        "d_in": d_in,
        "d_sae": d_sae,
        "dtype": str(dtype).removeprefix("torch."),
        "device": "cpu",
        "apply_b_dec_to_input": apply_b_dec_to_input,
        "normalize_activations": normalize_activations,
        "reshape_activations": "none",
        "metadata": {
            "sae_lens_version": version,
            "sae_lens_training_version": version,
            "model_name": model_name,
            "hook_name": hook_name,
            "hook_head_index": None,
            "prepend_bos": True,
            "context_size": 128,
            "dataset_path": "monology/pile-uncopyrighted",
        },
        "architecture": arch,
    }
    if arch == "topk":
        cfg["k"] = k
        cfg["rescale_acts_by_decoder_norm"] = rescale_acts_by_decoder_norm
    (folder / "cfg.json").write_text(json.dumps(cfg))
    out = _f64(w)
    if threshold_key == "log_threshold":
        out["threshold"] = out.pop("log_threshold").exp()
    return out


def write_saelens_pre6(
    folder: Path,
    d_in: int,
    d_sae: int,
    *,
    activation_fn_str: str = "relu",
    k: int | None = None,
    scaling_factor: torch.Tensor | None = None,
    normalize_activations=False,
    hook_point: str = "blocks.2.hook_resid_pre",
    hook_point_layer: int = 2,
    model_name: str = "gpt2-small",
) -> dict:
    """An SAELens 3.x-5.x directory: top-level hook/model keys (``hook_point``,
    ``hook_point_layer`` in the oldest releases), ``activation_fn_str`` (+ kwargs for topk), a
    boolean or string ``normalize_activations``, ``finetuning_scaling_factor`` and an optional
    ``scaling_factor`` tensor."""
    folder.mkdir(parents=True, exist_ok=True)
    w = {
        "W_enc": rand(d_in, d_sae, scale=0.3),
        "b_enc": rand(d_sae, scale=0.1),
        "W_dec": rand(d_sae, d_in, scale=0.3),
        "b_dec": rand(d_in, scale=0.1),
    }
    if scaling_factor is not None:
        w["scaling_factor"] = scaling_factor.to(torch.float32)
    save_file(w, str(folder / "sae_weights.safetensors"))
    cfg = {
        "model_name": model_name,
        "hook_point": hook_point,
        "hook_point_layer": hook_point_layer,
        "hook_point_head_index": None,
        "d_in": d_in,
        "d_sae": d_sae,
        "dtype": "torch.float32",
        "device": "cuda",
        "activation_fn_str": activation_fn_str,
        "apply_b_dec_to_input": True,
        "finetuning_scaling_factor": scaling_factor is not None,
        "sae_lens_training_version": "3.12.1",
        "prepend_bos": True,
        "dataset_path": "Skylion007/openwebtext",
        "context_size": 128,
        "normalize_activations": normalize_activations,
    }
    if k is not None:
        cfg["activation_fn_kwargs"] = {"k": k}
    (folder / "cfg.json").write_text(json.dumps(cfg))
    out = _f64(w)
    return out


# ----------------------------------------------------------------------------------- sparsify
def write_sparsify(
    run: Path,
    hookpoint: str,
    d_in: int,
    d_sae: int,
    k: int,
    *,
    model: str | None = "EleutherAI/pythia-70m",
    dtype: torch.dtype = torch.float32,
    cfg_overrides: dict | None = None,
    extra_tensors: dict | None = None,
) -> dict:
    """``SparseCoder.save_to_disk(run / hookpoint)``: safetensors ``save_model`` of the module
    (``encoder.weight [d_sae, d_in]``, ``encoder.bias``, ``W_dec [d_sae, d_in]``, ``b_dec``)
    and cfg.json = ``{**cfg.to_dict(), "d_in": d_in}``; the trainer writes the run's
    config.json (with ``model``) one level up."""
    folder = run / hookpoint
    folder.mkdir(parents=True, exist_ok=True)
    w = {
        "encoder.weight": rand(d_sae, d_in, scale=0.3, dtype=dtype),
        "encoder.bias": rand(d_sae, scale=0.1, dtype=dtype),
        "W_dec": rand(d_sae, d_in, scale=0.3, dtype=dtype),
        "b_dec": rand(d_in, scale=0.1, dtype=dtype),
    }
    w.update(extra_tensors or {})
    save_file(w, str(folder / "sae.safetensors"))
    cfg = {
        "activation": "topk",
        "expansion_factor": d_sae // d_in,
        "normalize_decoder": True,
        # sparsify writes 0 ("use expansion_factor") unless num_latents was set explicitly
        "num_latents": 0 if d_sae == d_in * (d_sae // d_in) else d_sae,
        "k": k,
        "multi_topk": False,
        "skip_connection": False,
        "transcode": False,
        "d_in": d_in,
    }
    cfg.update(cfg_overrides or {})
    (folder / "cfg.json").write_text(json.dumps(cfg))
    if model is not None:
        run_cfg = {"sae": {k2: v for k2, v in cfg.items() if k2 != "d_in"}, "batch_size": 8,
                   "hookpoints": [hookpoint], "model": model, "dataset": "EleutherAI/SmolLM2-135M-10B"}
        (run / "config.json").write_text(json.dumps(run_cfg))
    return _f64(w)


# --------------------------------------------------------------------------------- Gemma Scope
def _gemma_arrays(d_in: int, d_sae: int) -> dict:
    return {
        "W_enc": np.random.randn(d_in, d_sae).astype(np.float32) * 0.3,
        "W_dec": np.random.randn(d_sae, d_in).astype(np.float32) * 0.3,
        "b_enc": np.random.randn(d_sae).astype(np.float32) * 0.1,
        "b_dec": np.random.randn(d_in).astype(np.float32) * 0.1,
        "threshold": (np.random.rand(d_sae) * 0.3 + 0.05).astype(np.float32),
    }


def write_gemmascope_npz(folder: Path, d_in: int, d_sae: int) -> dict:
    """Gemma Scope's ``params.npz`` (``np.savez``; float32 ``W_enc [d_in, d_sae]``,
    ``W_dec [d_sae, d_in]``, ``b_enc``, ``b_dec``, ``threshold``)."""
    folder.mkdir(parents=True, exist_ok=True)
    a = _gemma_arrays(d_in, d_sae)
    np.savez(folder / "params.npz", **a)
    return {k: torch.from_numpy(v).to(torch.float64) for k, v in a.items()}


def write_gemmascope2(folder: Path, d_in: int, d_sae: int) -> dict:
    """Gemma Scope 2: ``params.safetensors`` with lowercase keys (``w_enc``, ``w_dec``,
    ``b_enc``, ``b_dec``, ``threshold``) beside a ``config.json``."""
    folder.mkdir(parents=True, exist_ok=True)
    a = _gemma_arrays(d_in, d_sae)
    save_file({k.lower(): torch.from_numpy(v) for k, v in a.items()}, str(folder / "params.safetensors"))
    (folder / "config.json").write_text(json.dumps({"width": d_sae, "l0": "big", "type": "jumprelu"}))
    return {k: torch.from_numpy(v).to(torch.float64) for k, v in a.items()}


# --------------------------------------------------------------------------- dictionary_learning
def write_dictionary_learning(
    folder: Path,
    dict_class: str,
    d_in: int,
    d_sae: int,
    *,
    k: int = 4,
    threshold: float = 0.2,
    layer: int = 3,
    lm_name: str = "EleutherAI/pythia-70m-deduped",
    submodule_name: str | None = "resid_post_layer_3",
) -> dict:
    """``training.trainSAE``'s output directory: ``config.json`` = ``{"trainer": trainer.config,
    "buffer": data.config}`` and ``ae.pt`` = ``torch.save`` of the module's state dict (CPU
    tensors; nn.Linear weights ``[out, in]``; TopK/BatchTopK buffers ``k`` int32 and
    ``threshold`` float32 scalars)."""
    folder.mkdir(parents=True, exist_ok=True)
    if dict_class in ("AutoEncoder", "AutoEncoderNew", "AutoEncoderTopK", "BatchTopKSAE"):
        sd = {"encoder.weight": rand(d_sae, d_in, scale=0.3), "encoder.bias": rand(d_sae, scale=0.1)}
        if dict_class == "AutoEncoder":
            sd["bias"] = rand(d_in, scale=0.1)
            sd["decoder.weight"] = rand(d_in, d_sae, scale=0.3)
        elif dict_class == "AutoEncoderNew":
            sd["decoder.weight"] = rand(d_in, d_sae, scale=0.3)
            sd["decoder.bias"] = rand(d_in, scale=0.1)
        else:
            sd["k"] = torch.tensor(k, dtype=torch.int)
            sd["threshold"] = torch.tensor(threshold, dtype=torch.float32)
            sd["decoder.weight"] = rand(d_in, d_sae, scale=0.3)
            sd["b_dec"] = rand(d_in, scale=0.1)
    elif dict_class == "JumpReluAutoEncoder":
        sd = {
            "W_enc": rand(d_in, d_sae, scale=0.3), "b_enc": rand(d_sae, scale=0.1),
            "W_dec": rand(d_sae, d_in, scale=0.3), "b_dec": rand(d_in, scale=0.1),
            "threshold": (torch.rand(d_sae) * 0.3 + 0.05),
        }
    elif dict_class == "MatryoshkaBatchTopKSAE":
        sd = {
            "k": torch.tensor(k, dtype=torch.int), "threshold": torch.tensor(threshold, dtype=torch.float32),
            "group_sizes": torch.tensor([d_sae // 2, d_sae - d_sae // 2]),
            "W_enc": rand(d_in, d_sae, scale=0.3), "b_enc": rand(d_sae, scale=0.1),
            "W_dec": rand(d_sae, d_in, scale=0.3), "b_dec": rand(d_in, scale=0.1),
        }
    else:
        raise ValueError(dict_class)
    torch.save(sd, folder / "ae.pt")
    trainer = {
        "dict_class": dict_class,
        "trainer_class": {"AutoEncoderTopK": "TopKTrainer", "BatchTopKSAE": "BatchTopKTrainer",
                          "MatryoshkaBatchTopKSAE": "MatryoshkaBatchTopKTrainer",
                          "JumpReluAutoEncoder": "JumpReluTrainer"}.get(dict_class, "StandardTrainer"),
        "activation_dim": d_in,
        "dict_size": d_sae,
        "lr": 0.0003,
        "steps": 1000,
        "seed": 0,
        "device": "cuda:0",
        "layer": layer,
        "lm_name": lm_name,
        "wandb_name": dict_class,
        "submodule_name": submodule_name,
    }
    if "TopK" in dict_class:
        trainer["k"] = k
    config = {"trainer": trainer, "buffer": {"d_submodule": d_in, "io": "out", "n_ctxs": 3000,
                                             "ctx_len": 128, "refresh_batch_size": 512,
                                             "out_batch_size": 8192, "device": "cuda:0"}}
    (folder / "config.json").write_text(json.dumps(config, indent=4))
    return _f64(sd)
