"""A transcoder spliced into a model: it reads the MLP's input and stands for the MLP's output.

For a transcoder (``sae.transcoder``) with input ``x`` (at ``hook_in``, e.g.
``blocks.L.ln2.hook_normalized``) and the MLP's output ``y`` (at ``hook_out``,
``blocks.L.hook_mlp_out``):

    idx, acts = encode_sparse(x.detach(), sae)               # active set from the MLP input
    splice: out = decode_sparse(idx, acts) + x.detach() @ W_skip.T     # replaces the MLP output
    error:  out = y      (= transcoder(x) + (y - transcoder(x)).detach(): the forward is unchanged)

and the backward, given ``D = dY/d out`` at the MLP output, records

    influence[t, j] = z[t, j] * (W_dec[j] . D[t])

with the same gather-dot as an SAE at one hook (:mod:`gradsae.model.splice`): only ``z``
carries gradient (the skip term and the error are detached), so nothing flows below the MLP
output and the scores need no dense ``[tokens, d_sae]`` tensor. Interventions edit the active
set as for an SAE; their change of the decode is added to the MLP output in both modes.

:class:`TranscoderSplice` is a :class:`~gradsae.model.splice.Splice` whose replacement sits at
the output point and which captures the input point's tensor on the way (the input hook runs
first in every forward). :class:`gradsae.GradSAE` builds one when its SAE is a transcoder.
"""

from __future__ import annotations

import torch

from ..errors import InputError
from .hooks import HookPoint, resolve_transcoder
from .splice import Splice, _SpliceFn


class TranscoderSplice(Splice):
    """A transcoder between ``point_in`` (read) and ``point`` (the output it replaces).

    Used like a :class:`Splice` (``with splice:``, :meth:`recording`, :meth:`editing`); the
    input point is hooked (read only) while the splice is attached.
    """

    def __init__(self, point_in: HookPoint, point_out: HookPoint, sae, mode: str = "splice", backend: str = "auto"):
        if not getattr(sae, "transcoder", False):
            raise InputError("TranscoderSplice needs a transcoder (an SAE with sae.transcoder set)")
        super().__init__(point_out, sae, mode, backend)
        self.point_in = point_in
        self._x_in: torch.Tensor | None = None
        self._in_handle = None

    @classmethod
    def build(cls, model, sae, hook_in: str | None = None, hook_out: str | None = None, mode: str = "splice",
              backend: str = "auto") -> "TranscoderSplice":
        """Resolve the transcoder's points on ``model`` (defaults: ``sae.meta.hook_name`` and
        ``sae.meta.hook_name_out``, see :func:`gradsae.model.hooks.resolve_transcoder`) and check
        the widths the model's config states."""
        hook_in = hook_in or sae.meta.hook_name
        if not hook_in:
            raise InputError("the transcoder names no input hook in its metadata; pass hook=... (e.g. "
                             "'blocks.L.ln2.hook_normalized')")
        point_in, point_out = resolve_transcoder(model, hook_in, hook_out or sae.meta.hook_name_out)
        for p in (point_in, point_out):
            if p.d_model is not None and p.d_model != sae.d_in:
                raise InputError(
                    f"the transcoder's d_in={sae.d_in} does not match the width {p.d_model} of hook {p.name!r} "
                    "on this model; is this the transcoder for this model?"
                )
        return cls(point_in, point_out, sae, mode, backend)

    # -- installation: the input point is read while the output point is replaced
    def attach(self) -> None:
        if self._depth == 0:
            self._in_handle = self.point_in.attach(self._capture)
        super().attach()

    def detach(self) -> None:
        super().detach()
        if self._depth == 0 and self._in_handle is not None:
            self._in_handle.remove()
            self._in_handle = None
            self._x_in = None

    def _capture(self, x: torch.Tensor) -> torch.Tensor:
        self._x_in = x
        return x

    # -- the computation, at the output point
    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        x, self._x_in = self._x_in, None
        if x is None:
            raise InputError(
                f"the transcoder's input hook {self.point_in.name!r} did not run before its output hook "
                f"{self.point.name!r} in this forward"
            )
        for t, p in ((x, self.point_in), (h, self.point)):
            if t.shape[-1] != self.sae.d_in:
                raise InputError(
                    f"the transcoder's d_in={self.sae.d_in} does not match the width {t.shape[-1]} of the "
                    f"tensor at hook {p.name!r}; is this the transcoder for this hook and model?"
                )
        if tuple(x.shape[:-1]) != tuple(h.shape[:-1]):
            raise InputError(f"the transcoder's input {tuple(x.shape)} and output {tuple(h.shape)} differ in shape")
        if h.device != self.sae.device:
            self.sae = self.sae.to(device=h.device)
        self._pending = x
        try:
            if self._recorder is not None and torch.is_grad_enabled():
                return _SpliceFn.apply(self._recorder.anchor, h, self)
            if self.mode == "error" and not self._interventions:
                return h
            with torch.no_grad():
                return self._compute(h, clone=False)[0]
        finally:
            self._pending = None

    def _encode_input(self, h: torch.Tensor) -> torch.Tensor:
        """The MLP input captured at :attr:`point_in` in this forward, detached."""
        return self._pending.detach().to(h.device)


__all__ = ["TranscoderSplice"]
