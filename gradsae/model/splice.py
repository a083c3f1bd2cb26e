"""The SAE spliced into a model: a forward that encodes and decodes sparsely, and an autograd
backward that yields GradSAE's activation x gradient for the active latents only.

Forward, for the hook's tensor ``h`` ``[B, T, d_in]``:

    idx, acts = encode_sparse(h.detach(), sae)          # active set, [B, T, K]
    splice: out = decode_sparse(idx, acts)              # the paper: no error term
    error:  out = h                                     # = x_hat + (h - x_hat).detach(): the
                                                        #   model's forward is unchanged

Backward, given ``D = dY/d out``: ``influence_at(idx, acts, D, sae)`` (the gather-dot
``W_dec[idx] . D``, no second encode, no dense ``[tokens, d_sae]`` gradient) is recorded
(with a statistics sink, ``accumulate_at``: the same gather-dot also adds into the sink's
per-latent tables, in one pass where a kernel backend serves), and
nothing flows below the hook: the function's only differentiable input is a scalar *anchor*
that requires grad, so the graph starts at the hook. In error mode the same holds: the
(detached) error term carries no gradient, the h path is cut, and dY/dz is the same
``W_dec[j] . D`` as in splice mode.

Interventions (:mod:`gradsae.model.interventions`) edit the active set before decoding.

Several splices in one model (a :class:`~gradsae.model.scorer.GradSAE` with many SAEs): the
hook tensor of a later splice depends on the output of an earlier one, so the backward of a
splice also hands a gradient to ``h`` whenever ``h`` requires one (it never does for a single
splice: the model's parameters are frozen). In error mode the output equals ``h``, so ``h``
gets ``D`` itself and every hook sees the model's own gradient. In splice mode the output is
``decode(encode(h))`` and ``h`` gets the gradient through the encoder at the active latents
only (:func:`encoder_backward`: ``sum_j dY/dz_j * dz_j/dh``, ``[T, k]`` work per token, no
``[tokens, d_sae]`` tensor), which is what a dense autograd of the same spliced model gives.

The splice's ``backend`` serves all three steps: the encode, the gather-dot of the backward,
and the sparse decode (a backend without a sparse-decode kernel decodes in PyTorch). Callers
drive a splice through its context managers: ``with splice:`` (attached), ``with
splice.recording(...) as rec:`` (attached, forwards recorded for attribution) and ``with
splice.editing(iv):`` (attached, with an intervention).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch

from ..errors import InputError
from ..op import Influence, accumulate_at, decode_sparse, encode_sparse, influence_at
from ..sae import LAYER_NORM_EPS
from ..stats import LatentStats

MODES = ("splice", "error")


@dataclass
class _Entry:
    idx: torch.Tensor
    acts: torch.Tensor
    x: torch.Tensor
    influence: Influence | None = None


@dataclass
class Recorder:
    """Collects, per forward through the hook, the active set and (after backward) its
    :class:`Influence`. ``anchor`` is the scalar leaf the spliced output hangs from. With
    ``stats``, every backward also adds its influence (rows of ``mask``) into it."""

    anchor: torch.Tensor = field(default_factory=lambda: torch.zeros((), requires_grad=True))
    entries: list = field(default_factory=list)
    stats: LatentStats | None = None
    mask: torch.Tensor | None = None
    deterministic: bool = False

    @property
    def influences(self) -> list[Influence]:
        """The :class:`Influence` of every recorded forward that has been through backward."""
        return [e.influence for e in self.entries if e.influence is not None]


class _SpliceFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, anchor, h, splice):
        out, idx, acts, hd = splice._compute(h, clone=True)
        entry = _Entry(idx, acts, hd)
        splice._recorder.entries.append(entry)
        ctx.entry = entry
        ctx.splice = splice
        ctx.rec = splice._recorder
        return out

    @staticmethod
    def backward(ctx, D):
        sp, e, rec = ctx.splice, ctx.entry, ctx.rec
        sae = sp.sae
        if rec.stats is None:
            e.influence = influence_at(e.idx, e.acts, D.to(sae.dtype), sae, x=e.x, backend=sp.backend)
        else:
            mask = rec.mask if rec.mask is not None and rec.mask.shape == e.idx.shape[:-1] else None
            e.influence = accumulate_at(e.idx, e.acts, D.to(sae.dtype), sae, rec.stats, mask, x=e.x,
                                        backend=sp.backend, deterministic=rec.deterministic)
        dh = None
        if ctx.needs_input_grad[1]:  # an earlier splice waits for the gradient at this hook
            if sp.mode == "error":
                dh = D
            else:
                dh = encoder_backward(sae, e.idx, e.acts, e.influence.grads, e.x).to(D.dtype)
        return None, dh, None


# Elements of W_enc gathered at once by encoder_backward (bounds its temporary).
GATHER_CHUNK = 1 << 22


def encoder_backward(sae, idx: torch.Tensor, acts: torch.Tensor, grads: torch.Tensor,
                     x: torch.Tensor) -> torch.Tensor:
    """The gradient at the SAE's input ``x`` ``[..., d_in]`` given ``grads = dY/dz`` at the
    active slots ``idx`` ``[..., K]``: ``slope[t] * sum_s grads[t, s] * dn[j] * W_enc[:, j]``
    over the slots ``j = idx[t, s]`` whose activation is positive (the derivative of a
    selected ``relu``/threshold latent is that of its pre-activation; an inactive or zeroed
    slot has none). ``dn``: the decoder norm where activations are rescaled by it, else 1;
    ``slope``: the input normalisation's per-row factor (its statistics are taken from the
    detached input, :meth:`gradsae.SAE.preprocess`), else 1. The columns of ``W_enc`` are
    gathered a chunk of rows at a time, so memory stays ``O(chunk)``, never ``[T, d_sae]``."""
    lead = idx.shape[:-1]
    K = idx.shape[-1]
    idx2 = idx.reshape(-1, K)
    w = (grads.reshape(-1, K).to(sae.dtype) * (acts.reshape(-1, K) > 0)).to(sae.dtype)
    j = idx2.clamp(min=0)
    if sae.rescale_acts_by_decoder_norm:
        w = w * sae.decoder_norm().to(w.dtype)[j]
    out = torch.zeros(idx2.shape[0], sae.d_in, dtype=sae.dtype, device=idx.device)
    rows = max(1, GATHER_CHUNK // max(1, K * sae.d_in))
    for a in range(0, idx2.shape[0], rows):
        jj = j[a:a + rows]
        cols = sae.W_enc.index_select(1, jj.reshape(-1)).view(sae.d_in, jj.shape[0], K)
        out[a:a + rows] = (cols * w[a:a + rows]).sum(-1).T
    xd = x.reshape(-1, sae.d_in).detach().to(sae.dtype)
    if sae.normalize_activations == "constant_norm_rescale":
        # a zero row (a pad position, never encoded) has no latents and gets no gradient; its
        # coefficient would overflow, and inf * 0 would leak NaN into the model's backward
        n = xd.norm(dim=-1)
        coeff = torch.where(n > 0, math.sqrt(sae.d_in) / n.clamp_min(torch.finfo(xd.dtype).tiny), torch.zeros_like(n))
        out = out * coeff.unsqueeze(-1)
    elif sae.normalize_activations == "layer_norm":
        std = (xd - xd.mean(dim=-1, keepdim=True)).std(dim=-1)
        out = out / (std + LAYER_NORM_EPS).unsqueeze(-1)
    return out.reshape(*lead, sae.d_in)


def delta_decode(sae, idx: torch.Tensor, dvals: torch.Tensor, x: torch.Tensor | None) -> torch.Tensor:
    """``row_scale * sum_s dvals[s] * col_scale[idx[s]] * W_dec[idx[s]]``: the change of the
    decode when the latents ``idx`` change by ``dvals`` (decode is affine in z). ``[..., d_in]``."""
    out = sae.linear_decode_sparse(idx, dvals)
    rs = sae.norm_state(x).row_scale if sae.normalize_activations != "none" else None
    if rs is not None:
        out = out * rs.unsqueeze(-1).to(out.dtype)
    return out


def _encode_rows(x: torch.Tensor, keep: torch.Tensor, sae, backend: str):
    """:func:`encode_sparse` of the positions ``keep`` (``[B, T]`` bool) of ``x`` only; the
    other positions get empty slots (index -1, value 0). Padding costs no encode."""
    sel = keep.reshape(-1).nonzero().squeeze(-1)
    i, a = encode_sparse(x.reshape(-1, x.shape[-1])[sel], sae, backend=backend)
    idx = torch.full((keep.numel(), i.shape[-1]), -1, dtype=i.dtype, device=i.device)
    acts = torch.zeros((keep.numel(), a.shape[-1]), dtype=a.dtype, device=a.device)
    idx[sel], acts[sel] = i, a
    return idx.reshape(*keep.shape, -1), acts.reshape(*keep.shape, -1)


class Splice:
    """The SAE at a hook point. Callable on the hook's tensor; attached to the model while one
    of its context managers runs (``with splice:``, :meth:`recording`, :meth:`editing`; they
    nest).

    Outside :meth:`recording` (or with grad disabled) the splice runs as a plain no-grad
    computation. Pad positions (``mask`` of :meth:`recording`) are zeroed before encoding:
    they never count, and some attention implementations leave non-finite values there.

    ``out_dtype``: the dtype of what the splice returns; None (default) casts back to the hook
    tensor's dtype. The authors' released hook returns the SAE's decode as is, so with a
    float16 model and a float32 SAE the residual stream after the hook is float32: pass
    ``out_dtype=sae.dtype`` to reproduce that (on models whose next layers accept it, such as
    TransformerLens' HookedTransformer, whose norms cast their inputs to the model's dtype).
    """

    def __init__(self, point, sae, mode: str = "splice", backend: str = "auto", out_dtype=None):
        if mode not in MODES:
            raise InputError(f"mode must be one of {MODES}, got {mode!r}")
        if out_dtype is not None and not (isinstance(out_dtype, torch.dtype) and out_dtype.is_floating_point):
            raise InputError(f"out_dtype must be None or a floating torch dtype, got {out_dtype!r}")
        self.out_dtype = out_dtype
        self.point = point
        self.sae = sae
        self.mode = mode
        self.backend = backend
        self._recorder: Recorder | None = None
        self._interventions: list = []
        self._last_index: torch.Tensor | None = None
        self._mask: torch.Tensor | None = None
        self._handle = None
        self._depth = 0

    # -- installation (re-entrant)
    def attach(self) -> None:
        if self._depth == 0:
            self._handle = self.point.attach(self)
        self._depth += 1

    def detach(self) -> None:
        self._depth -= 1
        if self._depth == 0 and self._handle is not None:
            self._handle.remove()
            self._handle = None

    def __enter__(self):
        self.attach()
        return self

    def __exit__(self, *exc):
        self.detach()

    @contextmanager
    def recording(self, mask: torch.Tensor | None = None, last_index: torch.Tensor | None = None,
                  device=None, stats: LatentStats | None = None, deterministic: bool = False) -> Iterator[Recorder]:
        """Attach the splice and record every forward through it (with grad enabled) for
        attribution: the yielded :class:`Recorder` collects each forward's active set and,
        after backward, its :class:`Influence`.

        ``mask`` (``[B, T]`` bool or None) marks the real tokens of the batch; ``last_index``
        (``[B]`` or None = T-1) the last real position of each row, where interventions limited
        to the last position apply; ``device`` that of the anchor (the model's). ``stats``: a
        :class:`LatentStats` sink that every backward adds its influence into (the rows of
        ``mask``), fused into the gather-dot where a kernel backend serves
        (:func:`gradsae.op.accumulate_at`); ``deterministic``: bitwise repeatable sums there."""
        rec = Recorder(anchor=torch.zeros((), device=device, requires_grad=True), stats=stats, mask=mask,
                       deterministic=deterministic)
        saved = (self._recorder, self._mask, self._last_index)
        self._recorder, self._mask, self._last_index = rec, mask, last_index
        self.attach()
        try:
            yield rec
        finally:
            self.detach()
            self._recorder, self._mask, self._last_index = saved

    @contextmanager
    def editing(self, intervention) -> Iterator:
        """Attach the splice with ``intervention`` (an
        :class:`~gradsae.model.interventions.Intervention`) editing the active set of every
        forward until the block ends; blocks nest and their edits combine."""
        self._interventions.append(intervention)
        self.attach()
        try:
            yield intervention
        finally:
            self.detach()
            self._interventions.remove(intervention)

    @property
    def interventions(self) -> list:
        """The interventions in force, outermost first (a copy: edit through :meth:`editing`)."""
        return list(self._interventions)

    @property
    def edits_last_position(self) -> bool:
        """An active intervention edits only the last position of each forward."""
        return any(iv.positions == "last" for iv in self._interventions)

    # -- the computation
    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        if h.dim() >= 4 and h.shape[-1] != self.sae.d_in and h.shape[-2] * h.shape[-1] == self.sae.d_in:
            # per-head activations [B, T, heads, d_head] (TransformerLens hook_z): the SAE reads
            # the heads flattened
            return self(h.flatten(-2)).unflatten(-1, h.shape[-2:])
        if h.shape[-1] != self.sae.d_in:
            raise InputError(
                f"the SAE's d_in={self.sae.d_in} does not match the width {h.shape[-1]} of the "
                f"tensor at hook {self.point.name!r}; is this the SAE for this hook and model?"
            )
        if h.device != self.sae.device:  # e.g. a model spread over devices: follow the hook
            self.sae = self.sae.to(device=h.device)
        if self._recorder is not None and torch.is_grad_enabled():
            return _SpliceFn.apply(self._recorder.anchor, h, self)
        if self.mode == "error" and not self._interventions:
            return h if self.out_dtype is None else h.to(self.out_dtype)
        with torch.no_grad():
            return self._compute(h, clone=False)[0]

    def _positions(self, shape) -> torch.Tensor | None:
        """Boolean ``[B, T]`` of the last position of each row (for position-limited edits)."""
        B, T = shape[0], shape[1]
        last = self._last_index
        if last is None or last.shape[0] != B:
            last = torch.full((B,), T - 1, dtype=torch.long)
        last = last.to(self.sae.device).clamp(max=T - 1)
        return torch.arange(T, device=self.sae.device).unsqueeze(0) == last.unsqueeze(1)

    def _encode_input(self, h: torch.Tensor) -> torch.Tensor:
        """What the SAE encodes for the hook output ``h``: ``h`` itself, detached (a transcoder
        encodes the input it captured at another point)."""
        return h.detach()

    def _compute(self, h: torch.Tensor, clone: bool):
        """``(out, idx, acts, x)``: the hook's new output for ``h`` (the SAE's reconstruction in
        splice mode, ``h`` plus the interventions' changes in error mode), the active set of
        ``x = self._encode_input(h)`` after the interventions, and ``x``."""
        sae = self.sae
        x = self._encode_input(h)
        mask = self._mask
        if mask is not None and tuple(mask.shape) == tuple(x.shape[:2]) and not bool(mask.all()):
            keep = mask.to(x.device)
            x = torch.where(keep.unsqueeze(-1), x, torch.zeros((), dtype=x.dtype, device=x.device))
            idx, acts = _encode_rows(x, keep, sae, self.backend)  # pads: no latents
        else:
            idx, acts = encode_sparse(x, sae, backend=self.backend)
        new_acts = acts
        extra = torch.zeros(x.shape, dtype=sae.dtype, device=x.device) if self._interventions else None
        for iv in self._interventions:
            pos = None if iv.positions == "all" else self._positions(x.shape)
            new_acts, d = iv.apply(sae, idx, new_acts, x, pos)
            extra = extra + d
        if self.mode == "splice":
            out = decode_sparse(sae, idx, new_acts, x=x, backend=self.backend, strict=False)
            skip = sae.skip(x)  # a transcoder's skip connection
            if skip is not None:
                out = out + skip
        else:
            hd = h.detach()
            out = hd.to(sae.dtype) if (clone or extra is not None) else hd
            if new_acts is not acts:
                out = out + delta_decode(sae, idx, new_acts - acts, x)
        if extra is not None:
            out = out + extra
        out = out.to(self.out_dtype or h.dtype)
        if clone and out.data_ptr() == h.data_ptr():  # never hand autograd its input back
            out = out.clone()
        return out, idx, new_acts, x


class SpliceGroup:
    """Several :class:`Splice` driven as one (a :class:`~gradsae.model.scorer.GradSAE` with
    several SAEs exposes its splices this way as ``scorer.splice``): ``with group:`` attaches
    them all; :attr:`edits_last_position` and :attr:`interventions` cover every member."""

    def __init__(self, splices):
        self.splices = list(splices)

    def attach(self) -> None:
        for sp in self.splices:
            sp.attach()

    def detach(self) -> None:
        for sp in reversed(self.splices):
            sp.detach()

    def __enter__(self):
        self.attach()
        return self

    def __exit__(self, *exc):
        self.detach()

    @property
    def interventions(self) -> list:
        """The interventions in force at every member, member by member."""
        return [iv for sp in self.splices for iv in sp.interventions]

    @property
    def edits_last_position(self) -> bool:
        """An active intervention at some member edits only the last position."""
        return any(sp.edits_last_position for sp in self.splices)
