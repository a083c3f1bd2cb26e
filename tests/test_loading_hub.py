"""SAEs from the Hugging Face Hub, read offline from a cache laid out as huggingface_hub writes it
(tests/hub_cache.py), through the real huggingface_hub code path (snapshot_download)."""

from __future__ import annotations

import sys

import pytest
import torch

from gradsae import InputError, SAEFormatError, load_sae
from gradsae.commands._model import load_sae_arg
from hub_cache import add_to_cache, blob_of
from loading_helpers import D_IN, D_SAE, F64, close, relu, topk_dense, xs
from sae_files import write_gemmascope_npz, write_saelens, write_sparsify

GEMMA_REPO = "google/gemma-scope-2b-pt-res"
GEMMA_FOLDER = "layer_12/width_16k/average_l0_82"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    c = tmp_path / "hf" / "hub"
    c.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return c


def gemma_formula(a, x):
    pre = x @ a["W_enc"] + a["b_enc"]
    return pre * (pre > a["threshold"])


def put_gemma(cache, tmp_path, repo=GEMMA_REPO, folder=GEMMA_FOLDER):
    a = write_gemmascope_npz(tmp_path / "src", D_IN, D_SAE)
    add_to_cache(cache, repo, tmp_path / "src", prefix=folder)
    return a


def test_repo_and_folder_offline(cache, tmp_path):
    a = put_gemma(cache, tmp_path)
    sae = load_sae(GEMMA_REPO, GEMMA_FOLDER, dtype=F64)
    x = xs()
    close(sae.encode(x), gemma_formula(a, x))
    assert sae.meta.hook_name == "blocks.12.hook_resid_post" and sae.meta.hook_layer == 12
    assert sae.meta.model_name == "gemma-2-2b"
    assert sae.meta.extra["hub"]["repo_id"] == GEMMA_REPO
    # the weights file named directly, and HF_HUB_CACHE instead of HF_HOME
    close(load_sae(GEMMA_REPO, GEMMA_FOLDER + "/params.npz", dtype=F64).encode(x), gemma_formula(a, x))


def test_revision(cache, tmp_path):
    old = write_gemmascope_npz(tmp_path / "a", D_IN, D_SAE)
    first = add_to_cache(cache, GEMMA_REPO, tmp_path / "a", prefix=GEMMA_FOLDER).name
    new = write_gemmascope_npz(tmp_path / "b", D_IN, D_SAE)
    add_to_cache(cache, GEMMA_REPO, tmp_path / "b", prefix=GEMMA_FOLDER, commit="f" * 40)  # main moves on
    x = xs()
    close(load_sae(GEMMA_REPO, GEMMA_FOLDER, dtype=F64).encode(x), gemma_formula(new, x))
    close(load_sae(GEMMA_REPO, GEMMA_FOLDER, dtype=F64, revision=first).encode(x), gemma_formula(old, x))
    with pytest.raises(SAEFormatError, match="not in the Hugging Face cache"):
        load_sae(GEMMA_REPO, GEMMA_FOLDER, revision="e" * 40)


def test_hf_hub_cache_variable(tmp_path, monkeypatch):
    c = tmp_path / "elsewhere"
    monkeypatch.setenv("HF_HUB_CACHE", str(c))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    a = put_gemma(c, tmp_path)
    x = xs()
    close(load_sae(GEMMA_REPO, GEMMA_FOLDER, dtype=F64).encode(x), gemma_formula(a, x))


def test_sparsify_repo(cache, tmp_path):
    w = write_sparsify(tmp_path / "run", "layers.12", D_IN, D_SAE, k=5, model=None)
    add_to_cache(cache, "EleutherAI/sae-llama-3-8b-32x", tmp_path / "run")
    sae = load_sae("EleutherAI/sae-llama-3-8b-32x", "layers.12", dtype=F64)
    x = xs()
    expect = topk_dense((x - w["b_dec"]) @ w["encoder.weight"].T + w["encoder.bias"], 5)
    close(sae.encode(x), expect)
    assert sae.meta.hook_name == "layers.12" and sae.meta.hook_layer == 12


def test_saelens_repo_and_cli_form(cache, tmp_path):
    w = write_saelens(tmp_path / "src", "standard", D_IN, D_SAE)
    add_to_cache(cache, "org/my-saes", tmp_path / "src", prefix="blocks.3.hook_resid_post")
    x = xs()
    expect = relu((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"])
    close(load_sae("org/my-saes", "blocks.3.hook_resid_post", dtype=F64).encode(x), expect)
    # the CLI's --sae repo_id:folder
    close(load_sae_arg("org/my-saes:blocks.3.hook_resid_post", "cpu").to(dtype=F64).encode(x), expect, tol=1e-5)


def test_local_path_still_wins(tmp_path):
    w = write_saelens(tmp_path / "org" / "x", "standard", D_IN, D_SAE)
    x = xs()
    close(load_sae(tmp_path / "org", "x", dtype=F64).encode(x), relu((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]))
    close(load_sae(tmp_path / "org" / "x", format="saelens", dtype=F64).encode(x),
          relu((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]))


def saelens_from_pretrained(monkeypatch, cache, release, sae_id):
    """SAELens' own SAE.from_pretrained on the same offline cache (huggingface_hub's constants
    pointed at it: SAELens passes no cache_dir)."""
    import warnings

    from huggingface_hub import constants
    from sae_lens import SAE as LibSAE

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return LibSAE.from_pretrained(release, sae_id, device="cpu", dtype="float64").eval()


def agrees_with_saelens(sae, lib, x):
    with torch.no_grad():
        z = lib.encode(x)
        close(sae.encode(x), z, tol=1e-9)
        close(sae.decode(z), lib.decode(z), tol=1e-9)
        assert int((z != 0).sum()) > 0


def test_saelens_release_canonical(cache, tmp_path):
    from sae_lens.loading.pretrained_saes_directory import get_repo_id_and_folder_name

    release, sae_id = "gemma-scope-2b-pt-res-canonical", "layer_12/width_16k/canonical"
    repo, folder = get_repo_id_and_folder_name(release, sae_id)
    assert folder != sae_id
    a = put_gemma(cache, tmp_path, repo, folder)
    sae = load_sae(release, sae_id, dtype=F64)
    x = xs()
    close(sae.encode(x), gemma_formula(a, x))
    assert sae.meta.extra["hub"]["release"] == release and sae.meta.extra["hub"]["folder"] == folder
    # (SAELens' own loader of this release sizes the SAE from its name, 2304 x 16384: not built here)
    with pytest.raises(InputError, match="has no SAE id"):
        load_sae(release, "layer_12/width_16k/nope")


def test_saelens_release_norm_scaling_factor(cache, tmp_path, monkeypatch):
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    release, sae_id, s = next(
        (r, i, f) for r, look in get_pretrained_saes_directory().items()
        if look.conversion_func is None for i, f in look.norm_scaling_factor.items()
    )
    look = get_pretrained_saes_directory()[release]
    w = write_saelens(tmp_path / "src", "standard", D_IN, D_SAE, normalize_activations="expected_average_only_in")
    add_to_cache(cache, look.repo_id, tmp_path / "src", prefix=look.saes_map[sae_id])
    sae = load_sae(release, sae_id, dtype=F64)
    x = xs()
    z = relu((x * s - w["b_dec"]) @ w["W_enc"] + w["b_enc"])  # the SAE on inputs scaled by s
    close(sae.encode(x), z, tol=1e-9)
    close(sae.decode(z), (z @ w["W_dec"] + w["b_dec"]) / s, tol=1e-9)
    assert sae.meta.extra["folded_scaling_factor"] == pytest.approx(s)
    agrees_with_saelens(sae, saelens_from_pretrained(monkeypatch, cache, release, sae_id), x)


def test_release_without_sae_lens(cache, monkeypatch):
    for mod in [m for m in sys.modules if m == "sae_lens" or m.startswith("sae_lens.")]:
        monkeypatch.setitem(sys.modules, mod, None)
    monkeypatch.setitem(sys.modules, "sae_lens", None)
    with pytest.raises(InputError, match="pip install sae-lens"):
        load_sae("gemma-scope-2b-pt-res-canonical", "layer_12/width_16k/canonical")


def test_missing_offline_names_repo_and_file(cache, tmp_path):
    put_gemma(cache, tmp_path)
    with pytest.raises(SAEFormatError) as e:  # the repository is cached, this folder is not
        load_sae(GEMMA_REPO, "layer_3/width_16k/average_l0_10")
    msg = str(e.value)
    assert GEMMA_REPO in msg and "layer_3/width_16k/average_l0_10" in msg and "HF_HUB_OFFLINE" in msg
    assert "hf download" in msg and "\n" not in msg
    with pytest.raises(SAEFormatError, match="other/repo.*layers.1.*HF_HUB_OFFLINE"):  # nothing cached
        load_sae("other/repo", "layers.1")
    # a config whose weights are not cached
    w_src = tmp_path / "cfgonly"
    write_saelens(w_src, "standard", D_IN, D_SAE)
    (w_src / "sae_weights.safetensors").unlink()
    add_to_cache(cache, "org/partial", w_src, prefix="l1")
    with pytest.raises(SAEFormatError, match=r"org/partial: l1/sae_weights\.safetensors is not in the Hugging Face"):
        load_sae("org/partial", "l1")


def test_corrupt_cached_file(cache, tmp_path):
    write_saelens(tmp_path / "src", "standard", D_IN, D_SAE)
    add_to_cache(cache, "org/bad", tmp_path / "src", prefix="l0")
    blob = blob_of(cache, "org/bad", "l0/sae_weights.safetensors")
    data = blob.read_bytes()
    blob.write_bytes(data[: len(data) // 2])
    with pytest.raises(SAEFormatError, match="sae_weights.safetensors: truncated"):
        load_sae("org/bad", "l0")
    put_gemma(cache, tmp_path)
    blob = blob_of(cache, GEMMA_REPO, GEMMA_FOLDER + "/params.npz")
    blob.write_bytes(b"not a zip archive")
    with pytest.raises(SAEFormatError, match="params.npz"):
        load_sae(GEMMA_REPO, GEMMA_FOLDER)


def test_repo_without_folder(cache):
    with pytest.raises(SAEFormatError, match="pass the SAE's folder"):
        load_sae("org/some-saes")
    assert torch.__version__  # the module under test imported torch-only paths


def test_incomplete_snapshot_by_the_cached_listing(cache, tmp_path):
    """huggingface_hub also caches the repository's file listing; offline, a folder it lists but
    the snapshot lacks is named with its repository."""
    from huggingface_hub._tree_cache import TreeCacheEntry, write_tree_cache

    from hub_cache import repo_folder

    a = put_gemma(cache, tmp_path)
    root = repo_folder(cache, GEMMA_REPO)
    commit = (root / "refs" / "main").read_text()
    listing = {f"{GEMMA_FOLDER}/params.npz": TreeCacheEntry(size=1, blob_id="0" * 40),
               "layer_3/width_16k/average_l0_10/params.npz": TreeCacheEntry(size=1, blob_id="1" * 40)}
    write_tree_cache(str(root), commit, listing)
    x = xs()
    close(load_sae(GEMMA_REPO, GEMMA_FOLDER, dtype=F64).encode(x), gemma_formula(a, x))
    with pytest.raises(SAEFormatError, match=r"google/gemma-scope-2b-pt-res: layer_3/width_16k/average_l0_10/ "
                                             r"\(an SAE: .*params.npz.*\) is not in the .*HF_HUB_OFFLINE"):
        load_sae(GEMMA_REPO, "layer_3/width_16k/average_l0_10")
