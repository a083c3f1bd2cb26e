"""Transcoders: SAELens (plain, skip, JumpReLU, JumpReLU skip) and sparsify (transcode=True, with
and without skip) from live objects and from their own save formats, Gemma Scope transcoders from
disk, from the Hub form and from a SAELens release; each agrees with the library's own
encode/decode (or the published formula) in float64."""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")

import gradsae  # noqa: E402
from gradsae import InputError, SAEFormatError, load_sae  # noqa: E402
from hub_cache import add_to_cache  # noqa: E402
from interop_helpers import randomize  # noqa: E402

D, D_SAE = 16, 64
F64 = torch.float64
SAELENS = {"transcoder": "Transcoder", "skip_transcoder": "SkipTranscoder",
           "jumprelu_transcoder": "JumpReLUTranscoder", "jumprelu_skip_transcoder": "JumpReLUSkipTranscoder"}


def close(a, b, tol=1e-10):
    torch.testing.assert_close(a.to(F64), b.to(F64), atol=tol, rtol=0)


def saelens_tc(arch):
    sae_lens = pytest.importorskip("sae_lens")
    from sae_lens.saes.sae import SAEMetadata

    cls = getattr(sae_lens, SAELENS[arch])
    cfg_cls = getattr(sae_lens, SAELENS[arch] + "Config")
    cfg = cfg_cls(d_in=D, d_sae=D_SAE, d_out=D, dtype="float64", apply_b_dec_to_input=False,
                  metadata=SAEMetadata(hook_name="blocks.1.ln2.hook_normalized", model_name="tiny"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lib = randomize(cls(cfg))
    if "jumprelu" in arch:
        with torch.no_grad():
            lib.threshold.copy_(torch.rand(D_SAE, dtype=F64) * 0.5)
    return lib.eval()


def check_saelens(sae, lib, x):
    assert sae.transcoder and sae.meta.hook_name_out == "blocks.1.hook_mlp_out"
    assert (sae.W_skip is not None) == ("skip" in lib.cfg.architecture())
    with torch.no_grad():
        z = lib.encode(x)
        close(sae.encode(x), z)
        assert 0 < int((z != 0).sum()) < z.numel()
        close(sae.decode(sae.encode(x)), lib.decode(z))
        close(sae(x), lib(x))  # with the skip term


@pytest.mark.parametrize("arch", list(SAELENS))
def test_saelens_transcoders(arch, tmp_path):
    lib = saelens_tc(arch)
    x = torch.randn(9, D, dtype=F64)
    check_saelens(gradsae.SAE.from_object(lib), lib, x)
    lib.save_model(str(tmp_path / "tc"))  # SAELens' own layout
    sae = load_sae(tmp_path / "tc")
    check_saelens(sae, lib, x)
    assert sae.meta.extra["architecture"] == arch
    # gradsae's save is read back by SAELens as the same transcoder
    sae.save(tmp_path / "back")
    from sae_lens import SAE as LibSAE

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = LibSAE.load_from_disk(str(tmp_path / "back"))
    assert type(again).__name__ == SAELENS[arch]
    check_saelens(load_sae(tmp_path / "back"), again, x)
    with torch.no_grad():
        close(again(x), lib(x))


def test_saelens_transcoder_refusals(tmp_path):
    lib = saelens_tc("transcoder")
    lib.save_model(str(tmp_path / "tc"))
    cfg = json.loads((tmp_path / "tc" / "cfg.json").read_text())
    cfg["d_out"] = D + 1
    (tmp_path / "tc" / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(SAEFormatError, match="d_out"):
        load_sae(tmp_path / "tc")
    with pytest.raises(InputError, match="W_skip has shape"):
        gradsae.SAE(torch.zeros(D, 4), torch.zeros(4), torch.zeros(4, D), torch.zeros(D), "relu",
                    W_skip=torch.zeros(D, D + 1))


def sparsify_tc(skip):
    sparsify = pytest.importorskip("sparsify")
    cfg = sparsify.SparseCoderConfig(num_latents=D_SAE, k=6, transcode=True, skip_connection=skip)
    return randomize(sparsify.SparseCoder(D, cfg, dtype=F64))


def check_sparsify(sae, lib, x):
    assert sae.transcoder and not sae.apply_b_dec_to_input
    with torch.no_grad():
        out = lib.encode(x)
        z = torch.zeros(x.shape[0], D_SAE, dtype=F64).scatter(-1, out.top_indices, out.top_acts)
        close(sae.encode(x), z)
        close(sae.decode(z), lib.decode(out.top_acts, out.top_indices))
        close(sae(x), lib(x).sae_out)  # sparsify's forward adds the skip term


@pytest.mark.parametrize("skip", [False, True])
def test_sparsify_transcoders(skip, tmp_path):
    lib = sparsify_tc(skip)
    x = torch.randn(9, D, dtype=F64)
    check_sparsify(gradsae.SAE.from_object(lib), lib, x)
    lib.save_to_disk(tmp_path / "run" / "layers.1.mlp")  # sparsify's own layout
    sae = load_sae(tmp_path / "run" / "layers.1.mlp")
    check_sparsify(sae, lib, x)
    assert sae.meta.hook_name == sae.meta.hook_name_out == "layers.1.mlp"
    assert (sae.W_skip is not None) == skip


def gemma_arrays(skip=False):
    a = {
        "W_enc": np.random.randn(D, D_SAE).astype(np.float32) * 0.3,
        "W_dec": np.random.randn(D_SAE, D).astype(np.float32) * 0.3,
        "b_enc": np.random.randn(D_SAE).astype(np.float32) * 0.1,
        "b_dec": np.random.randn(D).astype(np.float32) * 0.1,
        "threshold": (np.random.rand(D_SAE) * 0.3 + 0.05).astype(np.float32),
    }
    if skip:
        a["affine_skip_connection"] = np.random.randn(D, D).astype(np.float32) * 0.3  # [d_in, d_out]
    return a


def gemma_out(a, x):
    t = {k: torch.from_numpy(v).to(F64) for k, v in a.items()}
    pre = x @ t["W_enc"] + t["b_enc"]
    z = pre * (pre > t["threshold"])
    out = z @ t["W_dec"] + t["b_dec"]
    if "affine_skip_connection" in t:
        out = out + x @ t["affine_skip_connection"]
    return z, out


def test_gemmascope_transcoder_npz(tmp_path):
    folder = tmp_path / "gemma-scope-2b-pt-transcoders" / "layer_3" / "width_16k" / "average_l0_76"
    folder.mkdir(parents=True)
    a = gemma_arrays()
    np.savez(folder / "params.npz", **a)
    sae = load_sae(folder, dtype=F64)
    x = torch.randn(9, D, dtype=F64)
    z, out = gemma_out(a, x)
    close(sae.encode(x), z)
    close(sae(x), out)
    assert sae.transcoder and sae.W_skip is None
    assert (sae.meta.hook_name, sae.meta.hook_name_out) == ("blocks.3.ln2.hook_normalized", "blocks.3.hook_mlp_out")
    assert sae.meta.model_name == "gemma-2-2b"


def test_gemmascope2_affine_transcoder(tmp_path):
    folder = tmp_path / "transcoder_all" / "layer_5_width_16k_l0_big_affine"
    folder.mkdir(parents=True)
    a = gemma_arrays(skip=True)
    save_file({k.lower(): torch.from_numpy(v) for k, v in a.items()}, str(folder / "params.safetensors"))
    sae = load_sae(folder, dtype=F64)
    x = torch.randn(9, D, dtype=F64)
    z, out = gemma_out(a, x)
    close(sae.encode(x), z)
    close(sae(x), out)
    assert sae.W_skip is not None and sae.meta.hook_name_out == "blocks.5.hook_mlp_out"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    c = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(c))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return c


def test_transcoders_from_the_hub(cache, tmp_path):
    from sae_lens.loading.pretrained_saes_directory import get_repo_id_and_folder_name

    release = "gemma-scope-2b-pt-transcoders"
    sae_id = "layer_1/width_16k/average_l0_65"
    repo, folder = get_repo_id_and_folder_name(release, sae_id)
    a = gemma_arrays()
    (tmp_path / "src").mkdir()
    np.savez(tmp_path / "src" / "params.npz", **a)
    add_to_cache(cache, repo, tmp_path / "src", prefix=folder)
    x = torch.randn(9, D, dtype=F64)
    z, out = gemma_out(a, x)
    for sae in (load_sae(repo, folder, dtype=F64), load_sae(release, sae_id, dtype=F64)):
        assert sae.transcoder and sae.meta.hook_name_out == "blocks.1.hook_mlp_out"
        close(sae.encode(x), z)
        close(sae(x), out)
    # a SAELens skip transcoder in a Hub repository
    lib = saelens_tc("jumprelu_skip_transcoder")
    lib.save_model(str(tmp_path / "src2"))
    add_to_cache(cache, "org/skip-transcoders", tmp_path / "src2", prefix="layer_1")
    check_saelens(load_sae("org/skip-transcoders", "layer_1"), lib, x)
