"""SAE.save writes SAELens layout: a round trip through load_sae keeps the maths and the
metadata, replaces files atomically, and leaves nothing half-written."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

import gradsae
from gradsae import SAE, load_sae
from gradsae.errors import InputError

import sae_files as sf
from loading_helpers import D_IN, D_SAE, F64, check_meta, close, relu, topk_dense, xs


def _random_sae(activation, rescale=False, normalize="none"):
    kw = {}
    if activation == "topk":
        kw["k"] = 5
    if activation == "jumprelu":
        kw["threshold"] = torch.rand(D_SAE, dtype=F64) * 0.3
    return SAE(sf.rand(D_IN, D_SAE, dtype=F64), sf.rand(D_SAE, scale=0.1, dtype=F64),
               sf.rand(D_SAE, D_IN, scale=0.3, dtype=F64), sf.rand(D_IN, scale=0.1, dtype=F64),
               activation=activation, rescale_acts_by_decoder_norm=rescale, normalize_activations=normalize,
               hook_name="blocks.5.hook_resid_post", model_name="gpt2", hook_layer=5,
               metadata={"note": "kept", "nested": {"a": [1, 2]}}, **kw)


@pytest.mark.parametrize("activation,rescale,normalize", [
    ("relu", False, "none"), ("relu", True, "layer_norm"), ("topk", True, "none"),
    ("topk", False, "constant_norm_rescale"), ("jumprelu", False, "none"), ("jumprelu", True, "none"),
])
def test_save_roundtrip(tmp_path, activation, rescale, normalize):
    sae = _random_sae(activation, rescale, normalize)
    sae.save(tmp_path / "out")
    assert sorted(os.listdir(tmp_path / "out")) == ["cfg.json", "sae_weights.safetensors"]
    assert not [p for p in os.listdir(tmp_path) if p != "out"]  # no temp leftovers
    cfg = json.loads((tmp_path / "out" / "cfg.json").read_text())
    raw = {k: v.to(F64) for k, v in load_file(str(tmp_path / "out" / "sae_weights.safetensors")).items()}
    assert cfg["architecture"] == {"relu": "standard", "topk": "topk", "jumprelu": "jumprelu"}[activation]
    assert cfg["d_in"] == D_IN and cfg["d_sae"] == D_SAE and cfg["normalize_activations"] == normalize
    assert cfg["metadata"]["hook_name"] == "blocks.5.hook_resid_post" and cfg["metadata"]["note"] == "kept"
    assert int(cfg["metadata"]["sae_lens_version"].split(".")[0]) >= 6  # parsed as a >= 6.0 config
    assert raw["W_enc"].shape == (D_IN, D_SAE) and raw["W_dec"].shape == (D_SAE, D_IN)

    # the files, read as SAELens reads them, give the original SAE's latents and reconstruction
    x = xs() * 2 + 0.5
    h, _ = sae.preprocess(x)
    pre = h @ raw["W_enc"] + raw["b_enc"]
    if cfg.get("rescale_acts_by_decoder_norm"):
        pre = pre * raw["W_dec"].norm(dim=-1)
    if activation == "relu":
        z = relu(pre)
    elif activation == "topk":
        z = topk_dense(pre, cfg["k"])
    else:
        z = relu(pre) * (pre > raw["threshold"])
    close(z, sae.encode(x))
    zz = z / raw["W_dec"].norm(dim=-1) if cfg.get("rescale_acts_by_decoder_norm") else z
    close(sae.norm_state(x).apply(zz @ raw["W_dec"] + raw["b_dec"]), sae(x))

    back = load_sae(tmp_path / "out")
    assert back.dtype == F64 and back.activation == activation
    close(back.encode(x), sae.encode(x))
    close(back(x), sae(x))
    check_meta(back, "blocks.5.hook_resid_post", "gpt2", 5)
    assert back.meta.extra["nested"] == {"a": [1, 2]}


def test_save_roundtrip_of_loaded_sparsify(tmp_path):
    sf.write_sparsify(tmp_path / "run", "layers.3", D_IN, D_SAE, k=4)
    sae = load_sae(tmp_path / "run" / "layers.3")
    sae.save(tmp_path / "as_saelens")
    back = load_sae(tmp_path / "as_saelens")
    x = xs().float()
    close(back.encode(x), sae.encode(x), 0)
    check_meta(back, "layers.3", "EleutherAI/pythia-70m", 3)


def test_save_replaces_existing_directory_and_keeps_other_files(tmp_path):
    out = tmp_path / "out"
    _random_sae("topk").save(out)
    (out / "sparsity.safetensors").write_bytes(b"user file")
    new = _random_sae("jumprelu")
    new.save(out)
    assert sorted(os.listdir(out)) == ["cfg.json", "sae_weights.safetensors", "sparsity.safetensors"]
    x = xs()
    close(load_sae(out).encode(x), new.encode(x))


def test_save_failure_leaves_nothing(tmp_path, monkeypatch):
    import safetensors.torch as st

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(st, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        _random_sae("relu").save(tmp_path / "out")
    assert os.listdir(tmp_path) == []
    # into an existing directory: the old files stay intact, no temporaries remain
    monkeypatch.undo()
    old = _random_sae("relu")
    old.save(tmp_path / "out")
    before = {p: (tmp_path / "out" / p).read_bytes() for p in os.listdir(tmp_path / "out")}
    monkeypatch.setattr(st, "save_file", boom)
    with pytest.raises(OSError):
        _random_sae("topk").save(tmp_path / "out")
    after = {p: (tmp_path / "out" / p).read_bytes() for p in os.listdir(tmp_path / "out")}
    assert after == before


def test_save_onto_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(InputError, match="not a directory"):
        _random_sae("relu").save(tmp_path / "f")


def test_saved_files_get_normal_permissions(tmp_path):
    """Atomic writes go through temporary files, which default to owner-only; the saved
    directory and files must have the modes a normal mkdir/open gives under the umask."""
    import os
    import stat

    from oracle import random_sae

    import gradsae

    old = os.umask(0o022)
    try:
        sae = random_sae(8, 16, "topk", k=2)
        sae.save(tmp_path / "new")
        modes_first = {f: stat.S_IMODE((tmp_path / "new" / f).stat().st_mode)
                       for f in ("cfg.json", "sae_weights.safetensors")}
        sae.save(tmp_path / "new")  # into the existing directory: per-file replacement
        stats = gradsae.LatentStats(16)
        stats.save(tmp_path / "stats.safetensors")
    finally:
        os.umask(old)
    assert modes_first == {"cfg.json": 0o644, "sae_weights.safetensors": 0o644}
    assert stat.S_IMODE((tmp_path / "new").stat().st_mode) == 0o755
    for f in ["new/cfg.json", "new/sae_weights.safetensors", "stats.safetensors"]:
        assert stat.S_IMODE((tmp_path / f).stat().st_mode) == 0o644, f
