"""The independent float64 dense-autograd oracle and the comparison rules (docs/design.md,
"How we test").

The oracle takes an SAE's raw weights and options, builds the dense latents z in float64 on the
CPU, decodes with the inverse normalisation, and lets autograd produce dY/dz for *every*
latent from Y = sum(output * grad) (so dY/d output = grad). It shares no code with gradsae.
"""

from __future__ import annotations

import math

import torch


def dense_oracle(sae, x: torch.Tensor, grad: torch.Tensor) -> dict:
    """Dense float64 oracle. Returns v (selection values), z (latents), g (dY/dz for every
    latent), thr (effective threshold or None), all [N, d_sae] with N = rows of x."""
    f = lambda t: None if t is None else t.detach().to("cpu", torch.float64)  # noqa: E731
    W_enc, b_enc, W_dec, b_dec = f(sae.W_enc), f(sae.b_enc), f(sae.W_dec), f(sae.b_dec)
    x = f(x).reshape(-1, W_enc.shape[0])
    D = f(grad).reshape(-1, W_enc.shape[0])
    d_in = x.shape[-1]

    # input normalisation (statistics of the detached input)
    scale = torch.ones(x.shape[0], 1, dtype=torch.float64)
    shift = torch.zeros(x.shape[0], 1, dtype=torch.float64)
    h = x
    if sae.normalize_activations == "constant_norm_rescale":
        c = math.sqrt(d_in) / x.norm(dim=-1, keepdim=True)
        h = x * c
        scale = 1 / c
    elif sae.normalize_activations == "layer_norm":
        mu = x.mean(-1, keepdim=True)
        sd = (x - mu).std(-1, keepdim=True)
        h = (x - mu) / (sd + 1e-5)
        scale, shift = sd, mu
    if sae.apply_b_dec_to_input:
        h = h - b_dec
    v = h @ W_enc + b_enc
    norms = W_dec.norm(dim=-1)
    if sae.rescale_acts_by_decoder_norm:
        v = v * norms

    thr = None
    if sae.activation == "topk":
        kk = min(sae.k, v.shape[-1])
        t = v.topk(kk, dim=-1)
        z = torch.zeros_like(v).scatter(-1, t.indices, torch.relu(t.values))
    else:
        thr = torch.zeros(v.shape[-1], dtype=torch.float64) if sae.activation == "relu" else f(sae.threshold)
        z = torch.relu(v) * (v > thr)

    z = z.clone().requires_grad_(True)
    zz = z / norms if sae.rescale_acts_by_decoder_norm else z
    out = (zz @ W_dec + b_dec) * scale + shift
    (out * D).sum().backward()
    return {"v": v, "z": z.detach(), "g": z.grad.detach(), "thr": thr}


def _ambiguous_rows_topk(v: torch.Tensor, k: int, tol: float) -> torch.Tensor:
    """Rows where the k-th and (k+1)-th largest values are within tol (the set is a tie),
    or where the k-th value is within tol of 0 (relu boundary)."""
    if k >= v.shape[-1]:
        kth = v.topk(k, dim=-1).values[:, -1]
        return kth.abs() <= tol
    top = v.topk(k + 1, dim=-1).values
    return ((top[:, k - 1] - top[:, k]) <= tol) | (top[:, k - 1].abs() <= tol)


def assert_matches_oracle(out, orc: dict, sae, *, atol: float, rtol: float = 0.0, set_tol: float | None = None):
    """Compare an Influence result to the dense oracle.

    - Index sets must equal the oracle's active sets, except on rows where selection is
      ambiguous within ``set_tol`` (top-k ties, values at the threshold).
    - For every selected latent (always), acts / grads / scores must equal the oracle's
      values *for that latent* within atol + rtol * |ref|.
    """
    set_tol = atol if set_tol is None else set_tol
    d_sae = sae.d_sae
    idx = out.indices.reshape(-1, out.indices.shape[-1]).cpu()
    acts = out.acts.reshape(idx.shape).cpu().double()
    grads = out.grads.reshape(idx.shape).cpu().double()
    scores = out.scores.reshape(idx.shape).cpu().double()
    v, z, g = orc["v"], orc["z"], orc["g"]
    assert idx.shape[0] == v.shape[0], (idx.shape, v.shape)
    assert idx.dtype == torch.int64
    assert bool(((idx >= -1) & (idx < d_sae)).all()), "index out of range"

    if sae.activation == "topk":
        amb = _ambiguous_rows_topk(v, min(sae.k, d_sae), set_tol)
    else:
        amb = ((v - orc["thr"]).abs() <= set_tol).any(-1) | ((v.abs() <= set_tol) & (v > orc["thr"])).any(-1)

    for r in range(idx.shape[0]):
        sel = idx[r][idx[r] >= 0]
        assert sel.unique().numel() == sel.numel(), f"row {r}: duplicate indices {sel.tolist()}"
        if not bool(amb[r]):
            want = set(torch.nonzero(z[r]).flatten().tolist())
            got = set(sel.tolist())
            assert got == want, f"row {r}: selected {sorted(got ^ want)} differ (got-only/want-only)"
    valid = idx >= 0
    safe = idx.clamp(min=0)
    ref_act = torch.relu(v.gather(-1, safe))
    ref_g = g.gather(-1, safe)
    ref_s = ref_act * ref_g

    def close(name, got, ref):
        err = (got - ref).abs()[valid]
        bound = (atol + rtol * ref.abs())[valid]
        if err.numel():
            worst = int((err - bound).argmax())
            assert bool((err <= bound).all()), (
                f"{name}: max excess error {float((err - bound)[worst]):.3e} "
                f"(err {float(err[worst]):.3e}, ref {float(ref[valid][worst]):.3e})"
            )

    close("acts", acts, ref_act)
    close("grads", grads, ref_g)
    close("scores", scores, ref_s)
    # empty slots carry zeros
    assert bool((acts[~valid] == 0).all()) and bool((scores[~valid] == 0).all())


def selection_tol(sae, x: torch.Tensor, orc: dict, factor: float = 2.0) -> float:
    """Tolerance for comparing selected sets at the SAE's precision: ``factor`` times the
    largest error of the selection values ``v`` that the PyTorch reference makes in the SAE's
    own dtype (inputs, GEMM and output rounded to it), against the float64 oracle.

    A kernel that rounds only its inputs and accumulates in float32 errs less than that, so a
    row whose k-th and (k+1)-th values (or a value and its threshold) lie further apart than
    this cannot be ordered differently by a correct kernel. A fixed absolute tolerance is not
    enough: with decoder-norm rescaling, ``v`` and its rounding error grow with ||W_dec_j||.
    """
    v = sae.pre_acts(x.reshape(-1, sae.d_in)).to("cpu", torch.float64)
    return factor * float((v - orc["v"]).abs().max()) + 1e-6


def max_errors(out, orc: dict) -> dict:
    """Max abs error of acts/grads/scores of the selected latents vs the oracle (for the
    low-precision 2x rule)."""
    idx = out.indices.reshape(-1, out.indices.shape[-1]).cpu()
    valid = idx >= 0
    safe = idx.clamp(min=0)
    ref_act = torch.relu(orc["v"].gather(-1, safe))
    ref_g = orc["g"].gather(-1, safe)
    res = {}
    for name, got, ref in (
        ("acts", out.acts, ref_act), ("grads", out.grads, ref_g), ("scores", out.scores, ref_act * ref_g)
    ):
        e = (got.reshape(idx.shape).cpu().double() - ref).abs()[valid]
        res[name] = float(e.max()) if e.numel() else 0.0
    return res


def random_sae(
    d_in: int,
    d_sae: int,
    activation: str = "topk",
    k: int = 8,
    *,
    normalize: str = "none",
    rescale: bool = False,
    apply_b_dec: bool = True,
    dtype=torch.float32,
    device="cpu",
    seed: int | None = None,
    scalar_threshold: bool = False,
):
    """A random SAE whose latents are reasonably sparse for random Gaussian inputs."""
    import gradsae

    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    W_enc = r(d_in, d_sae) / math.sqrt(d_in)
    W_dec = r(d_sae, d_in) * (0.5 + torch.rand(d_sae, 1, generator=gen, dtype=torch.float64))
    b_enc = r(d_sae) * 0.1
    b_dec = r(d_in) * 0.1
    thr = None
    if activation in ("jumprelu", "batchtopk"):
        thr = (torch.rand((), generator=gen) if scalar_threshold else torch.rand(d_sae, generator=gen, dtype=torch.float64)) + 0.6
    c = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    return gradsae.SAE(
        c(W_enc), c(b_enc), c(W_dec), c(b_dec), activation=activation,
        k=k if activation == "topk" else None, threshold=c(thr) if thr is not None else None,
        normalize_activations=normalize, rescale_acts_by_decoder_norm=rescale,
        apply_b_dec_to_input=apply_b_dec,
    )


# SAE options every backend is checked on: activation, rescale_acts_by_decoder_norm,
# normalize_activations, apply_b_dec_to_input. TopK rows take their k from the caller (small
# under the Triton interpreter, realistic on a GPU).
OPTIONS = [
    ("topk", False, "none", True),
    ("topk", True, "none", True),
    ("topk", False, "constant_norm_rescale", True),
    ("topk", True, "layer_norm", False),
    ("topk", False, "none", False),
    ("jumprelu", False, "none", False),
    ("jumprelu", False, "layer_norm", True),
    ("jumprelu", True, "constant_norm_rescale", True),
    ("relu", False, "none", True),
    ("batchtopk", False, "none", True),
]


def option_cases(topk_ks):
    """``(activation, rescale, normalize, apply_b_dec, k)`` for every entry of OPTIONS, the
    TopK entries taking their k from ``topk_ks`` in order (None for threshold SAEs)."""
    ks = iter(topk_ks)
    cases = [(*o, next(ks) if o[0] == "topk" else None) for o in OPTIONS]
    assert next(ks, None) is None, "one k per topk option"
    return cases


def random_inputs(lead, d_in, device="cpu", dtype=torch.float32, scale=2.0):
    """Fresh Gaussian ``x`` (times ``scale``) and ``grad`` of shape ``[*lead, d_in]``, drawn in
    float64 and rounded once to ``dtype``."""
    x = torch.randn(*lead, d_in, dtype=torch.float64) * scale
    g = torch.randn(*lead, d_in, dtype=torch.float64)
    return x.to(device, dtype), g.to(device, dtype)
