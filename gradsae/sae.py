"""The canonical in-memory SAE.

One class holds every SAE gradsae knows, whatever library wrote it:

    pre    = (norm(x) - b_dec * apply_b_dec_to_input) @ W_enc + b_enc        [.., d_sae]
    v      = pre * ||W_dec_j||   if rescale_acts_by_decoder_norm else pre
    z      = topk:     relu(v) at the k largest v of the row, else 0
             jumprelu: v where v > max(threshold_j, 0), else 0      (strict '>')
             relu:     v where v > 0, else 0
    x_hat  = denorm((z * col_scale) @ W_dec + b_dec)
             col_scale = 1/||W_dec_j|| if rescale_acts_by_decoder_norm else 1

``norm`` is one of ``none``, ``constant_norm_rescale`` (x * sqrt(d_in)/||x||) or ``layer_norm``
((x - mean)/(std + 1e-5), decoded as x_hat * std + mean), with SAELens' exact conventions. The
statistics of ``norm`` are taken from the (detached) input, so the decode is affine in z with a
per-row slope ``row_scale`` (1/coefficient, std, or 1): this is what lets gradsae form
dY/dz = row_scale * col_scale * (W_dec_j . dY/dx_hat) for the active latents only.

A **transcoder** reads one hook (the MLP's input) and its decode stands for another (the MLP's
output): the same maths, plus an optional linear skip term ``x @ W_skip.T`` (``W_skip
[d_out, d_in]``, SAELens' and sparsify's layout) added to the output, which does not depend on
z. ``meta.hook_name`` is the input hook, ``meta.hook_name_out`` the output hook. gradsae's
transcoders have ``d_out == d_in`` (the MLP of a transformer) and no input normalisation.

BatchTopK SAEs are evaluated with their learned inference threshold, i.e. as ``jumprelu``
(``activation="batchtopk"`` is accepted as an alias that requires ``threshold``).

This module is the bottom layer of gradsae: it imports nothing of gradsae but the errors.
Four methods of :class:`SAE` are served by the layers above, which install them here when
they are imported (see :func:`provide`): ``encode_sparse`` and ``decode_sparse`` by the op
(:mod:`gradsae.op`, which picks a backend), ``save`` and ``from_object`` by the loaders
(:mod:`gradsae.loading`). ``import gradsae`` imports all of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .errors import GradSAEError, InputError

ACTIVATIONS = ("topk", "jumprelu", "relu")
NORMALIZATIONS = ("none", "constant_norm_rescale", "layer_norm")
LAYER_NORM_EPS = 1e-5
# Elements checked for finiteness at once (bounds the temporary boolean tensor).
FINITE_CHUNK = 1 << 24

# ---------------------------------------------------------------------- served from above
# The SAE methods whose machinery lives in higher layers, and who provides each.
SERVICES = {
    "encode_sparse": "gradsae.op",
    "decode_sparse": "gradsae.op",
    "save": "gradsae.loading",
    "from_object": "gradsae.loading",
}
_services: dict[str, Callable] = {}


def provide(service: str, fn: Callable) -> None:
    """Install ``fn`` as the implementation of the SAE method ``service`` (one of
    :data:`SERVICES`). Called by the layer that owns it when it is imported; the SAE maths
    never imports upward."""
    if service not in SERVICES:
        raise ValueError(f"unknown SAE service {service!r}; expected one of {sorted(SERVICES)}")
    _services[service] = fn


def _service(name: str) -> Callable:
    fn = _services.get(name)
    if fn is None:  # only while gradsae is half imported
        raise GradSAEError(f"SAE.{name} is served by {SERVICES[name]}, which is not imported; import gradsae")
    return fn


def non_finite_count(t: torch.Tensor, chunk: int = FINITE_CHUNK) -> int:
    """How many entries of ``t`` are NaN or infinite (0 for a finite tensor).

    A finite tensor costs one ``aminmax`` pass and no temporary (NaN and inf propagate to the
    min or the max); only a tensor that has some is counted, ``chunk`` elements at a time."""
    flat = t.detach().reshape(-1)
    if flat.numel() == 0:
        return 0
    lo, hi = torch.aminmax(flat)
    if bool(torch.isfinite(lo)) and bool(torch.isfinite(hi)):
        return 0
    bad = 0
    for i in range(0, flat.numel(), chunk):
        bad += int((~torch.isfinite(flat[i : i + chunk])).sum())
    return bad


@dataclass
class NormState:
    """Per-row statistics of the input normalisation, needed to invert it on decode.

    ``row_scale`` multiplies the decoded vector and ``row_shift`` is added after, so
    ``x_out = x_hat * row_scale + row_shift``; both are ``None`` when the SAE has no
    normalisation.
    """

    row_scale: torch.Tensor | None = None
    row_shift: torch.Tensor | None = None

    def apply(self, x_hat: torch.Tensor) -> torch.Tensor:
        if self.row_scale is not None:
            x_hat = x_hat * self.row_scale.unsqueeze(-1)
        if self.row_shift is not None:
            x_hat = x_hat + self.row_shift.unsqueeze(-1)
        return x_hat


@dataclass
class SAEMeta:
    """Where an SAE belongs: the hook it was trained on, the model, and anything else the
    checkpoint said (kept verbatim in ``extra``)."""

    hook_name: str | None = None
    model_name: str | None = None
    hook_layer: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    hook_name_out: str | None = None  # a transcoder's output hook


class SAE:
    """A sparse autoencoder with the semantics described in this module's docstring.

    Args:
        W_enc: encoder weight, ``[d_in, d_sae]``.
        b_enc: encoder bias, ``[d_sae]``.
        W_dec: decoder weight, ``[d_sae, d_in]``.
        b_dec: decoder bias, ``[d_in]``.
        activation: ``"topk"``, ``"jumprelu"``, ``"relu"`` (or ``"batchtopk"``, evaluated as
            ``jumprelu`` with its inference threshold).
        k: number of latents kept per row (``topk`` only).
        threshold: per-latent threshold ``[d_sae]`` or a scalar (``jumprelu`` only).
        apply_b_dec_to_input: subtract ``b_dec`` from the (normalised) input before encoding.
        normalize_activations: ``"none"``, ``"constant_norm_rescale"`` or ``"layer_norm"``.
        rescale_acts_by_decoder_norm: rank and report latents as ``pre * ||W_dec_j||``
            (SAELens' TopK option); decode divides by the norm again.
        hook_name, model_name, hook_layer, metadata: where the SAE belongs (kept, not used
            by the maths).
        transcoder: the SAE is a transcoder (see the module docstring); implied by ``W_skip``
            or ``hook_name_out``.
        W_skip: a transcoder's skip connection ``[d_out, d_in]`` (output ``+= x @ W_skip.T``).
        hook_name_out: a transcoder's output hook (``hook_name`` is its input hook).
        check_finite: refuse weights (and thresholds) with NaN or infinite entries, which
            would give NaN scores and empty selections. One pass over the weights; pass
            False to skip it for an SAE whose weights are known to be finite (the loaders
            check their files themselves and skip it).

    All weights end up on one device with one dtype (that of ``W_enc``).

    Raises:
        InputError: weights of the wrong type, dtype or shape; an unknown activation or
            normalisation; a topk ``k`` outside ``1..d_sae``; a jumprelu SAE without
            ``threshold``; non-finite weights.
    """

    def __init__(
        self,
        W_enc: torch.Tensor,
        b_enc: torch.Tensor,
        W_dec: torch.Tensor,
        b_dec: torch.Tensor,
        activation: str = "topk",
        k: int | None = None,
        threshold: torch.Tensor | float | None = None,
        *,
        apply_b_dec_to_input: bool = True,
        normalize_activations: str = "none",
        rescale_acts_by_decoder_norm: bool = False,
        hook_name: str | None = None,
        model_name: str | None = None,
        hook_layer: int | None = None,
        metadata: dict[str, Any] | None = None,
        check_finite: bool = True,
        transcoder: bool = False,
        W_skip: torch.Tensor | None = None,
        hook_name_out: str | None = None,
    ):
        activation = str(activation).lower()
        if activation == "batchtopk":
            if threshold is None:
                raise InputError(
                    "activation='batchtopk' is evaluated with its inference threshold; "
                    "pass threshold=..."
                )
            activation = "jumprelu"
        if activation not in ACTIVATIONS:
            raise InputError(
                f"unknown activation {activation!r}; expected one of {ACTIVATIONS + ('batchtopk',)}"
            )
        if normalize_activations not in NORMALIZATIONS:
            raise InputError(
                f"unknown normalize_activations {normalize_activations!r}; "
                f"expected one of {NORMALIZATIONS}"
            )
        for name, t in (("W_enc", W_enc), ("b_enc", b_enc), ("W_dec", W_dec), ("b_dec", b_dec)):
            if not isinstance(t, torch.Tensor):
                raise InputError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if not t.is_floating_point():
                raise InputError(f"{name} must be floating point, got {t.dtype}")
        if W_enc.dim() != 2 or W_dec.dim() != 2:
            raise InputError(
                f"W_enc and W_dec must be 2-D, got shapes {tuple(W_enc.shape)} and {tuple(W_dec.shape)}"
            )
        d_in, d_sae = W_enc.shape
        if tuple(W_dec.shape) != (d_sae, d_in):
            raise InputError(
                f"W_dec has shape {tuple(W_dec.shape)} but W_enc {tuple(W_enc.shape)} implies "
                f"[d_sae, d_in] = [{d_sae}, {d_in}]"
            )
        if tuple(b_enc.shape) != (d_sae,):
            raise InputError(f"b_enc has shape {tuple(b_enc.shape)}, expected [{d_sae}]")
        if tuple(b_dec.shape) != (d_in,):
            raise InputError(f"b_dec has shape {tuple(b_dec.shape)}, expected [{d_in}]")

        dtype, device = W_enc.dtype, W_enc.device
        self.W_enc = W_enc.detach()
        self.b_enc = b_enc.detach().to(device=device, dtype=dtype)
        self.W_dec = W_dec.detach().to(device=device, dtype=dtype)
        self.b_dec = b_dec.detach().to(device=device, dtype=dtype)
        self.activation = activation

        if activation == "topk":
            if k is None:
                raise InputError("a topk SAE needs k")
            k = int(k)
            if k < 1:
                raise InputError(f"k must be >= 1, got {k}")
            if k > d_sae:
                raise InputError(
                    f"k={k} is more than the SAE's d_sae={d_sae} latents; a topk SAE keeps at most all of "
                    f"its latents per row: pass k <= {d_sae}"
                )
            self.k: int | None = k
        else:
            self.k = None
        if activation == "jumprelu":
            if threshold is None:
                raise InputError("a jumprelu SAE needs threshold")
            thr = torch.as_tensor(threshold).detach().to(device=device, dtype=dtype)
            if thr.dim() == 0:
                thr = thr.expand(d_sae).clone()
            if tuple(thr.shape) != (d_sae,):
                raise InputError(f"threshold has shape {tuple(thr.shape)}, expected [{d_sae}] or a scalar")
            self.threshold: torch.Tensor | None = thr
        else:
            self.threshold = None

        self.apply_b_dec_to_input = bool(apply_b_dec_to_input)
        self.normalize_activations = normalize_activations
        self.rescale_acts_by_decoder_norm = bool(rescale_acts_by_decoder_norm)
        self.meta = SAEMeta(hook_name, model_name, hook_layer, dict(metadata or {}), hook_name_out)
        self.transcoder = bool(transcoder or W_skip is not None or hook_name_out is not None)
        self.W_skip: torch.Tensor | None = None
        if W_skip is not None:
            if not isinstance(W_skip, torch.Tensor) or not W_skip.is_floating_point():
                raise InputError("W_skip must be a floating-point torch.Tensor")
            if tuple(W_skip.shape) != (d_in, d_in):
                raise InputError(f"W_skip has shape {tuple(W_skip.shape)}, expected [d_out, d_in] = [{d_in}, {d_in}]")
            self.W_skip = W_skip.detach().to(device=device, dtype=dtype)
        if self.transcoder and normalize_activations != "none":
            raise InputError(
                f"a transcoder with normalize_activations={normalize_activations!r}: gradsae's transcoders "
                "read their input as it is (normalize_activations='none')"
            )
        self._cache: dict[str, tuple] = {}
        if check_finite:
            self._check_finite()

    def _check_finite(self) -> None:
        named = {"W_enc": self.W_enc, "b_enc": self.b_enc, "W_dec": self.W_dec, "b_dec": self.b_dec}
        if self.threshold is not None:
            named["threshold"] = self.threshold
        if self.W_skip is not None:
            named["W_skip"] = self.W_skip
        for name, t in named.items():
            bad = non_finite_count(t)
            if bad:
                raise InputError(
                    f"{name} has {bad} NaN or infinite entries (of {t.numel()}); an SAE needs finite "
                    "weights (check_finite=False skips this check)"
                )

    # ------------------------------------------------------------------ basic properties
    @property
    def d_in(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.W_enc.dtype

    @property
    def device(self) -> torch.device:
        return self.W_enc.device

    @property
    def hook_name(self) -> str | None:
        return self.meta.hook_name

    def __repr__(self) -> str:
        extra = f", k={self.k}" if self.k is not None else ""
        if self.normalize_activations != "none":
            extra += f", normalize={self.normalize_activations}"
        if self.rescale_acts_by_decoder_norm:
            extra += ", rescale_acts_by_decoder_norm=True"
        hook = f", hook={self.meta.hook_name!r}" if self.meta.hook_name else ""
        if self.transcoder:
            hook += f", transcoder -> {self.meta.hook_name_out!r}" + (", skip" if self.W_skip is not None else "")
        return (
            f"SAE(d_in={self.d_in}, d_sae={self.d_sae}, activation={self.activation!r}{extra}"
            f"{hook}, dtype={self.dtype}, device={self.device})"
        )

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "SAE":
        """A copy of this SAE on ``device`` and/or with weights in ``dtype`` (a narrower dtype
        whose range the weights exceed raises :class:`InputError`)."""
        def mv(t):
            return None if t is None else t.to(device=device or self.device, dtype=dtype or self.dtype)

        out = SAE(
            mv(self.W_enc), mv(self.b_enc), mv(self.W_dec), mv(self.b_dec),
            activation=self.activation, k=self.k, threshold=mv(self.threshold),
            apply_b_dec_to_input=self.apply_b_dec_to_input,
            normalize_activations=self.normalize_activations,
            rescale_acts_by_decoder_norm=self.rescale_acts_by_decoder_norm,
            hook_name=self.meta.hook_name, model_name=self.meta.model_name,
            hook_layer=self.meta.hook_layer, metadata=self.meta.extra,
            check_finite=dtype is not None and dtype != self.dtype,  # a cast can overflow
            transcoder=self.transcoder, W_skip=mv(self.W_skip), hook_name_out=self.meta.hook_name_out,
        )
        return out

    # ------------------------------------------------------------------ derived tensors
    def cached(self, key: str, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        """``fn()``, a tensor derived from the weights, computed once and kept under ``key``
        until a weight changes (backends keep folded biases or casts here).

        The entry is tagged with every weight's identity and version, so an in-place edit
        (e.g. a steering experiment scaling ``W_dec``) or a replaced tensor recomputes it."""
        tag = tuple((t.data_ptr(), t._version) for t in (self.W_enc, self.b_enc, self.W_dec, self.b_dec,
                                                          self.threshold) if t is not None)
        hit = self._cache.get(key)
        if hit is not None and hit[0] == tag:
            return hit[1]
        val = fn()
        self._cache[key] = (tag, val)
        return val

    def decoder_norm(self) -> torch.Tensor:
        """``||W_dec_j||`` for every latent, ``[d_sae]`` (computed in float32 or better)."""
        acc = torch.promote_types(self.dtype, torch.float32)
        return self.cached("dec_norm", lambda: self.W_dec.to(acc).norm(dim=-1))

    def col_scale(self) -> torch.Tensor | None:
        """Per-latent factor of dY/dz: ``1/||W_dec_j||`` with decoder-norm rescaling, else None."""
        if not self.rescale_acts_by_decoder_norm:
            return None
        return self.cached("col_scale", lambda: 1.0 / self.decoder_norm())

    def selection_threshold(self) -> torch.Tensor | None:
        """Effective strict threshold ``max(threshold_j, 0)`` for jumprelu/relu SAEs
        (``relu(v) * (v > t)`` equals ``v * (v > max(t, 0))``); None for topk."""
        if self.activation == "topk":
            return None
        if self.activation == "relu":
            return self.cached("thr", lambda: torch.zeros(self.d_sae, device=self.device, dtype=self.dtype))
        return self.cached("thr", lambda: self.threshold.clamp(min=0))

    # ------------------------------------------------------------------ maths
    def preprocess(self, x: torch.Tensor) -> tuple[torch.Tensor, NormState]:
        """Normalise ``x`` and subtract ``b_dec`` (when configured): the encoder's input.

        Returns ``(sae_in, norm_state)``; ``norm_state.row_scale`` is the per-row slope of the
        decode (``None`` when there is no normalisation). Statistics are computed on a detached
        copy, as in the paper's splice (the SAE sees ``x.detach()``).
        """
        x = x.to(self.dtype)
        state = NormState()
        if self.normalize_activations == "constant_norm_rescale":
            xd = x.detach()
            # A zero row (e.g. a masked pad position) keeps a finite coefficient: its latents
            # are those of a zero input instead of NaN that would leak into attention sums.
            coeff = math.sqrt(self.d_in) / xd.norm(dim=-1).clamp_min(torch.finfo(xd.dtype).tiny)
            x = x * coeff.unsqueeze(-1)
            state = NormState(row_scale=1.0 / coeff)
        elif self.normalize_activations == "layer_norm":
            xd = x.detach()
            mu = xd.mean(dim=-1)
            std = (xd - mu.unsqueeze(-1)).std(dim=-1)
            x = (x - mu.unsqueeze(-1)) / (std + LAYER_NORM_EPS).unsqueeze(-1)
            state = NormState(row_scale=std, row_shift=mu)
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        return x, state

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """Dense selection values ``v`` (pre-activations, decoder-norm rescaled if configured)."""
        sae_in, _ = self.preprocess(x)
        v = sae_in @ self.W_enc + self.b_enc
        if self.rescale_acts_by_decoder_norm:
            v = v * self.decoder_norm().to(v.dtype)
        return v

    def activate(self, v: torch.Tensor) -> torch.Tensor:
        """Apply the activation to dense selection values ``v`` ``[..., d_sae]``.

        A NaN value is never selected (gradsae's rule on every backend): it counts as an
        inactive latent, as if it were -inf, so it gives a 0 latent and never takes a top-k
        slot from a real value (``torch.topk`` alone ranks NaN first); -inf gives 0 too."""
        if self.activation == "topk":
            kk = min(self.k, v.shape[-1])
            ranked = v.masked_fill(torch.isnan(v), float("-inf"))
            top = ranked.topk(kk, dim=-1)
            return torch.zeros_like(v).scatter(-1, top.indices, top.values.relu())
        thr = self.selection_threshold().to(v.dtype)
        return torch.where(v > thr, v, torch.zeros((), dtype=v.dtype, device=v.device))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Dense latents ``z`` ``[..., d_sae]`` (reference semantics; builds the dense tensor)."""
        self._check_x(x)
        return self.activate(self.pre_acts(x))

    def decode(self, z: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """Reconstruction from dense latents ``z``. SAEs with input normalisation need the
        input ``x`` the latents came from, to undo the normalisation."""
        z = z.to(self.dtype)
        if self.rescale_acts_by_decoder_norm:
            z = z * self.col_scale().to(z.dtype)
        x_hat = z @ self.W_dec + self.b_dec
        return self.norm_state(x).apply(x_hat)

    def norm_state(self, x: torch.Tensor | None) -> NormState:
        """The normalisation statistics of input ``x`` (empty without normalisation)."""
        if self.normalize_activations == "none":
            return NormState()
        if x is None:
            raise InputError(
                f"this SAE normalises its input ({self.normalize_activations}); "
                "decode(z, x) needs the input x the latents came from"
            )
        return self.preprocess(x.detach())[1]

    def linear_decode_sparse(self, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """The linear part of the decode for sparse latents, embedding-bag style:
        ``sum_s values[.., s] * col_scale[j] * W_dec[j]`` over the slots ``j = indices[.., s]``
        (-1 = empty, skipped), ``[..., d_in]``; no bias, no de-normalisation. Since decode is
        affine in z, this is also the change of the output when latents change by ``values``.
        """
        valid = indices >= 0
        idx = indices.clamp(min=0)
        vals = values.to(self.dtype) * valid
        if self.rescale_acts_by_decoder_norm:
            vals = vals * self.col_scale().to(vals.dtype)[idx]
        K = idx.shape[-1]
        out = torch.nn.functional.embedding_bag(
            idx.reshape(-1, K), self.W_dec, per_sample_weights=vals.reshape(-1, K), mode="sum"
        )
        return out.reshape(*indices.shape[:-1], self.d_in)

    def encode_sparse(self, x: torch.Tensor, k: int | None = None, backend: str = "auto"):
        """Sparse latents without a dense ``[..., d_sae]`` tensor.

        Returns ``(indices, values)``, both ``[..., K]``: ``K = self.k`` for topk SAEs, else the
        capacity ``k`` (or, with ``k=None``, the largest number of active latents in a row).
        Empty slots have index -1 and value 0. Served by :func:`gradsae.encode_sparse`.
        """
        return _service("encode_sparse")(x, self, k=k, backend=backend)

    def decode_sparse(
        self, indices: torch.Tensor, values: torch.Tensor, x: torch.Tensor | None = None, backend: str = "auto"
    ) -> torch.Tensor:
        """Reconstruction from sparse latents (``indices`` -1 = empty), no dense latents.

        Runs on the first backend that serves these tensors and has a sparse decode kernel
        (embedding-bag style), else in PyTorch (:meth:`linear_decode_sparse`); ``backend``
        names one explicitly. Served by :func:`gradsae.op.decode_sparse`."""
        return _service("decode_sparse")(self, indices, values, x=x, backend=backend)

    def skip(self, x: torch.Tensor) -> torch.Tensor | None:
        """A transcoder's skip term ``x @ W_skip.T`` (None without ``W_skip``)."""
        if self.W_skip is None:
            return None
        return x.to(self.dtype) @ self.W_skip.T

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction ``decode(encode(x), x)`` (a transcoder's output, with its skip term)."""
        out = self.decode(self.encode(x), x)
        sk = self.skip(x)
        return out if sk is None else out + sk

    def _check_x(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise InputError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() == 0 or x.shape[-1] != self.d_in:
            raise InputError(f"x has shape {tuple(x.shape)}; its last dimension must be d_in={self.d_in}")

    # ------------------------------------------------------------------ I/O
    def save(self, path) -> None:
        """Write this SAE in SAELens layout (``cfg.json`` + ``sae_weights.safetensors``).
        Served by :func:`gradsae.loading.saelens.save_saelens`."""
        _service("save")(self, path)

    @classmethod
    def from_object(cls, obj) -> "SAE":
        """Wrap a live SAELens ``SAE``, sparsify ``SparseCoder`` or dictionary_learning
        dictionary as a gradsae ``SAE`` with identical encode/decode (a gradsae ``SAE`` is
        returned as is). Served by :func:`gradsae.loading.objects.sae_from_object`."""
        return _service("from_object")(obj)
