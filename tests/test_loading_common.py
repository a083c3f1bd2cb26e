"""What every format shares: dtype and device placement, format detection, and every kind of
bad file raising SAEFormatError naming the file and the problem."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import gradsae
from gradsae import SAEFormatError, load_sae
from gradsae.errors import InputError

import sae_files as sf
from loading_helpers import D_IN, D_SAE, F64


# ---------------------------------------------------------------------- dtype / device
def test_dtype_and_device_placement(tmp_path):
    w = sf.write_saelens(tmp_path / "sae", "standard", D_IN, D_SAE)
    for dt, want in ((torch.float16, torch.float16), ("bfloat16", torch.bfloat16), ("torch.float64", F64)):
        sae = load_sae(tmp_path / "sae", dtype=dt, device="cpu")
        assert sae.dtype == want and sae.device.type == "cpu"
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            t = getattr(sae, name)
            assert t.dtype == want
            assert torch.equal(t, w[name].to(torch.float32).to(want))
    with pytest.raises(InputError, match="dtype"):
        load_sae(tmp_path / "sae", dtype="int8")
    with pytest.raises(InputError, match="device"):
        load_sae(tmp_path / "sae", device="gpu0")


def test_dtype_overflow_is_reported(tmp_path):
    folder = tmp_path / "layer_1"
    w = sf.write_gemmascope_npz(folder, D_IN, D_SAE)
    a = {k: v.numpy().astype(np.float32) for k, v in w.items()}
    a["W_dec"][0, 0] = 1e6
    np.savez(folder / "params.npz", **a)
    with pytest.raises(SAEFormatError, match="W_dec.*overflows"):
        load_sae(folder, dtype=torch.float16)


@pytest.mark.gpu
def test_load_to_cuda(tmp_path):
    sf.write_sparsify(tmp_path / "run", "layers.0", D_IN, D_SAE, k=4)
    sae = load_sae(tmp_path / "run" / "layers.0", device="cuda", dtype=torch.bfloat16)
    assert sae.device.type == "cuda" and sae.W_dec.device.type == "cuda" and sae.dtype == torch.bfloat16


# ---------------------------------------------------------------------- bad input
def _saelens(tmp_path):
    sf.write_saelens(tmp_path / "sae", "topk", D_IN, D_SAE)
    return tmp_path / "sae", tmp_path / "sae" / "sae_weights.safetensors"


def _rewrite_weights(path, **changes):
    t = load_file(str(path))
    for k, v in changes.items():
        if v is None:
            t.pop(k)
        else:
            t[k] = v
    save_file(t, str(path))


def test_missing_path_and_unknown_format(tmp_path):
    with pytest.raises(SAEFormatError, match="no such file or directory") as e:
        load_sae(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(e.value)
    folder, _ = _saelens(tmp_path)
    with pytest.raises(InputError, match="unknown format"):
        load_sae(folder, format="pickle")


def test_nothing_matches_lists_files_found(tmp_path):
    (tmp_path / "model.bin").write_bytes(b"\0")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(SAEFormatError) as e:
        load_sae(tmp_path)
    msg = str(e.value)
    assert str(tmp_path) in msg and "model.bin" in msg and "notes.txt" in msg and "sae_weights.safetensors" in msg
    with pytest.raises(SAEFormatError, match="cannot tell the SAE format"):
        load_sae(tmp_path / "model.bin")


def test_parent_of_hookpoint_directories_points_at_them(tmp_path):
    sf.write_sparsify(tmp_path / "run", "layers.0", D_IN, D_SAE, k=4)
    sf.write_sparsify(tmp_path / "run", "layers.1", D_IN, D_SAE, k=4)
    with pytest.raises(SAEFormatError, match=r"layers\.0.*layers\.1"):
        load_sae(tmp_path / "run")


@pytest.mark.parametrize("missing", ["cfg.json", "sae_weights.safetensors"])
def test_missing_file(tmp_path, missing):
    folder, _ = _saelens(tmp_path)
    (folder / missing).unlink()
    with pytest.raises(SAEFormatError, match="missing file") as e:
        load_sae(folder, format="saelens")
    assert missing in str(e.value)
    if missing == "sae_weights.safetensors":  # detected from cfg.json alone
        with pytest.raises(SAEFormatError, match="sae_weights.safetensors: missing file"):
            load_sae(folder)


def test_missing_weights_detected_from_config(tmp_path):
    sf.write_sparsify(tmp_path / "run", "layers.0", D_IN, D_SAE, k=4)
    (tmp_path / "run" / "layers.0" / "sae.safetensors").unlink()
    with pytest.raises(SAEFormatError, match="sae.safetensors: missing file"):
        load_sae(tmp_path / "run" / "layers.0")
    sf.write_dictionary_learning(tmp_path / "t", "AutoEncoder", D_IN, D_SAE)
    (tmp_path / "t" / "ae.pt").unlink()
    with pytest.raises(SAEFormatError, match="ae.pt: missing file"):
        load_sae(tmp_path / "t")


def test_missing_config_dictionary_learning(tmp_path):
    sf.write_dictionary_learning(tmp_path / "t", "AutoEncoder", D_IN, D_SAE)
    (tmp_path / "t" / "config.json").unlink()
    with pytest.raises(SAEFormatError, match="config.json.*missing file"):
        load_sae(tmp_path / "t")


def test_missing_tensor(tmp_path):
    folder, weights = _saelens(tmp_path)
    _rewrite_weights(weights, b_enc=None)
    with pytest.raises(SAEFormatError, match="missing tensor 'b_enc'") as e:
        load_sae(folder)
    assert "sae_weights.safetensors" in str(e.value)
    sf.write_saelens(tmp_path / "j", "jumprelu", D_IN, D_SAE)
    _rewrite_weights(tmp_path / "j" / "sae_weights.safetensors", threshold=None)
    with pytest.raises(SAEFormatError, match="threshold"):
        load_sae(tmp_path / "j")
    sf.write_sparsify(tmp_path / "run", "layers.0", D_IN, D_SAE, k=4)
    _rewrite_weights(tmp_path / "run" / "layers.0" / "sae.safetensors", W_dec=None)
    with pytest.raises(SAEFormatError, match="sae.safetensors: missing tensor 'W_dec'"):
        load_sae(tmp_path / "run" / "layers.0")


def test_shapes_disagreeing_with_each_other(tmp_path):
    folder, weights = _saelens(tmp_path)
    _rewrite_weights(weights, W_dec=torch.randn(D_SAE, D_IN + 1))
    with pytest.raises(SAEFormatError, match=r"'W_dec' has shape \[48, 13\], expected \[48, 12\]") as e:
        load_sae(folder)
    assert "sae_weights.safetensors" in str(e.value)
    sf.write_dictionary_learning(tmp_path / "t", "AutoEncoderTopK", D_IN, D_SAE)
    sd = torch.load(tmp_path / "t" / "ae.pt", weights_only=True)
    sd["b_dec"] = torch.zeros(D_IN - 2)
    torch.save(sd, tmp_path / "t" / "ae.pt")
    with pytest.raises(SAEFormatError, match="ae.pt.*'b_dec' has shape"):
        load_sae(tmp_path / "t")


def test_shapes_disagreeing_with_config(tmp_path):
    folder, _ = _saelens(tmp_path)
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg["d_sae"] = D_SAE * 2
    (folder / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(SAEFormatError, match=r"d_sae=48 but cfg.json says d_sae=96"):
        load_sae(folder)
    sf.write_sparsify(tmp_path / "run", "layers.0", D_IN, D_SAE, k=4, cfg_overrides={"d_in": D_IN + 4})
    with pytest.raises(SAEFormatError, match=r"d_in=12 but cfg.json says d_in=16"):
        load_sae(tmp_path / "run" / "layers.0")
    sf.write_sparsify(tmp_path / "run", "layers.1", D_IN, D_SAE, k=4, cfg_overrides={"num_latents": 40})
    with pytest.raises(SAEFormatError, match=r"d_sae=48 but cfg.json says d_sae=40"):
        load_sae(tmp_path / "run" / "layers.1")
    sf.write_dictionary_learning(tmp_path / "t", "JumpReluAutoEncoder", D_IN, D_SAE)
    cfg = json.loads((tmp_path / "t" / "config.json").read_text())
    cfg["trainer"]["dict_size"] = 7
    (tmp_path / "t" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SAEFormatError, match="ae.pt: weights have d_sae=48 but config.json says d_sae=7"):
        load_sae(tmp_path / "t")


@pytest.mark.parametrize("arch", ["made_up", "temporal"])  # gated (test_interop_loaders) and transcoders (test_loading_transcoders) load
def test_unknown_architecture(tmp_path, arch):
    folder, _ = _saelens(tmp_path)
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg["architecture"] = arch
    (folder / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(SAEFormatError, match=f"unsupported SAE architecture '{arch}'") as e:
        load_sae(folder)
    assert "cfg.json" in str(e.value)


def test_truncated_safetensors(tmp_path):
    folder, weights = _saelens(tmp_path)
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(SAEFormatError, match="truncated") as e:
        load_sae(folder)
    assert "sae_weights.safetensors" in str(e.value)
    weights.write_bytes(data[:5])
    with pytest.raises(SAEFormatError, match="truncated"):
        load_sae(folder)


def test_corrupt_safetensors(tmp_path):
    folder, weights = _saelens(tmp_path)
    data = bytearray(weights.read_bytes())
    data[8:20] = b"\xff" * 12  # garbage in the JSON header
    weights.write_bytes(bytes(data))
    with pytest.raises(SAEFormatError, match="corrupt") as e:
        load_sae(folder)
    assert "sae_weights.safetensors" in str(e.value)
    weights.write_bytes(b"\xff" * 64)  # header length field far beyond the file
    with pytest.raises(SAEFormatError, match="truncated or corrupt"):
        load_sae(folder)


def test_truncated_npz_and_pt(tmp_path):
    sf.write_gemmascope_npz(tmp_path / "g", D_IN, D_SAE)
    p = tmp_path / "g" / "params.npz"
    p.write_bytes(p.read_bytes()[:300])
    with pytest.raises(SAEFormatError, match="params.npz: truncated or corrupt"):
        load_sae(tmp_path / "g")
    sf.write_dictionary_learning(tmp_path / "t", "AutoEncoder", D_IN, D_SAE)
    p = tmp_path / "t" / "ae.pt"
    p.write_bytes(p.read_bytes()[:200])
    with pytest.raises(SAEFormatError, match="ae.pt: truncated or corrupt"):
        load_sae(tmp_path / "t")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights(tmp_path, bad):
    folder, weights = _saelens(tmp_path)
    W = load_file(str(weights))["W_enc"].clone()
    W[3, 5] = bad
    _rewrite_weights(weights, W_enc=W)
    with pytest.raises(SAEFormatError, match="'W_enc' has non-finite values") as e:
        load_sae(folder)
    assert "sae_weights.safetensors" in str(e.value)
    folder = tmp_path / "layer_0"
    a = {k: v.numpy().astype(np.float32) for k, v in sf.write_gemmascope_npz(folder, D_IN, D_SAE).items()}
    a["threshold"][2] = bad
    np.savez(folder / "params.npz", **a)
    with pytest.raises(SAEFormatError, match="params.npz: tensor 'threshold' has non-finite"):
        load_sae(folder)


def test_unreadable_json(tmp_path):
    folder, _ = _saelens(tmp_path)
    (folder / "cfg.json").write_text('{"d_in": 12, "architecture": ')
    with pytest.raises(SAEFormatError, match="cfg.json: unreadable JSON"):
        load_sae(folder)
    sf.write_dictionary_learning(tmp_path / "t", "AutoEncoder", D_IN, D_SAE)
    (tmp_path / "t" / "config.json").write_text("[1, 2]")
    with pytest.raises(SAEFormatError, match="config.json: expected a JSON object"):
        load_sae(tmp_path / "t")


class _Payload:
    """Unpickling this runs a side effect; weights_only loading must never do it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_pt_with_arbitrary_objects_is_refused(tmp_path):
    sf.write_dictionary_learning(tmp_path / "t", "AutoEncoder", D_IN, D_SAE)
    sd = torch.load(tmp_path / "t" / "ae.pt", weights_only=True)
    marker = tmp_path / "unpickled"
    sd["payload"] = _Payload(str(marker))
    torch.save(sd, tmp_path / "t" / "ae.pt")
    with pytest.raises(SAEFormatError, match="ae.pt: refused to unpickle.*weights_only=True"):
        load_sae(tmp_path / "t")
    assert not marker.exists()


def test_pt_training_backup_is_explained(tmp_path):
    sf.write_dictionary_learning(tmp_path / "t", "AutoEncoder", D_IN, D_SAE)
    sd = torch.load(tmp_path / "t" / "ae.pt", weights_only=True)
    torch.save({"step": 10, "ae": sd, "optimizer": {"state": {}}, "config": {}, "norm_factor": None},
               tmp_path / "t" / "ae.pt")
    with pytest.raises(SAEFormatError, match="training backup"):
        load_sae(tmp_path / "t")


def test_errors_are_value_errors():
    # SAEFormatError is part of the public API and catchable as ValueError
    assert issubclass(gradsae.SAEFormatError, ValueError)
