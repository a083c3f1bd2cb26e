"""How many slots a row gets: the op's one policy for sizing the output of threshold SAEs.

A topk SAE fills ``k`` slots per row, always. A threshold SAE (JumpReLU, ReLU) activates a
number of latents per row known only once encoded, so:

- with a capacity ``k`` the backend fills ``k`` slots per row and reports each row's count;
  a row with more active latents raises :class:`~gradsae.errors.CapacityError` naming the
  fullest row and the ``k`` that would fit;
- with ``k=None`` the output is sized to the fullest row: a first pass with
  :data:`INITIAL_CAPACITY` slots counts every row, and if a row did not fit, one more pass at
  the exact size now known (which cannot overflow); the slots are then cut to the fullest
  row (at least 1).

Backends never decide this: they fill what they are given and count (see
:class:`~gradsae.op.contract.Backend`).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

from ..errors import CapacityError
from .contract import Request, Selection

# Slots of the first pass of an exactly sized threshold output. Most JumpReLU SAEs activate
# tens to a hundred-odd latents per token, so one pass usually suffices; a fuller row costs
# a second pass.
INITIAL_CAPACITY = 128


def capacity_error(row: int, fullest: int, k: int) -> CapacityError:
    return CapacityError(
        f"token {row} has {fullest} active latents but the capacity is k={k}; "
        f"pass k>={fullest} (or k=None to size the output to the fullest row)"
    )


def first_slots(req: Request) -> int:
    """The slots of the first (often only) backend call for ``req``: the top-k, the
    capacity given, or :data:`INITIAL_CAPACITY` (at most ``d_sae``) for ``k=None``."""
    return req.k if req.k is not None else min(req.sae.d_sae, INITIAL_CAPACITY)


def run_sized(run: Callable[[Request], Selection], req: Request) -> Selection:
    """``run(req)`` (a backend's ``select`` or ``influence``) with the slots sized by the
    policy above. ``req.k`` is the user's: the top-k, a capacity, or None."""
    sae = req.sae
    if sae.activation == "topk":
        return run(req)
    cap = first_slots(req)
    sel = run(replace(req, k=cap))
    fullest = int(sel.counts.max()) if sel.counts.numel() else 0
    if fullest > cap:
        if req.k is not None:
            raise capacity_error(int(sel.counts.argmax()), fullest, req.k)
        sel = run(replace(req, k=fullest))
    if req.k is None:
        sel = sel.narrow(max(fullest, 1))
    return sel
