"""The influence op: its API, its contract with the backends, and its policies.

- :mod:`.api`: :func:`influence`, :func:`encode_sparse`, :func:`influence_at`,
  :func:`decode_sparse`, the :class:`Influence` result, and the input checks;
- :mod:`.accumulate`: :func:`accumulate_influence` and :func:`accumulate_at` (influence
  straight into LatentStats; the second for a spliced model's backward);
- :mod:`.contract`: :class:`Request`, :class:`Selection`, the :class:`Backend` protocol and
  its optional parts;
- :mod:`.dispatch`: the :data:`PRIORITY` list and the choice of a backend per call;
- :mod:`.capacity`: how many slots a row of a threshold SAE gets;
- :mod:`.strategy`: which encode strategy (``fused`` / ``chunked``) a backend that offers
  several runs, by measurement cached on disk or ``GRADSAE_STRATEGY``.

The backends (:mod:`gradsae.backends`) sit above this package and implement the contract;
the dispatcher loads them by name. Importing this package also serves
:meth:`gradsae.SAE.encode_sparse` and :meth:`gradsae.SAE.decode_sparse`.
"""

from .. import sae as _sae
from .accumulate import accumulate_at, accumulate_influence, fused_backend
from .capacity import INITIAL_CAPACITY
from .contract import (
    MAX_K,
    STRATEGIES,
    Accumulate,
    Backend,
    Describe,
    GatherDot,
    Request,
    Selection,
    SparseDecode,
    Strategies,
    acc_dtype,
)
from .dispatch import (
    PRIORITY,
    available_backends,
    choose_backend,
    choose_optional,
    explain,
    get_backend,
    register_backend,
    unregister_backend,
)
from .api import Influence, as_sae, decode_sparse, encode_sparse, influence, influence_at

_sae.provide("encode_sparse", encode_sparse)
_sae.provide("decode_sparse", decode_sparse)

__all__ = [
    "Accumulate",
    "Backend",
    "Describe",
    "GatherDot",
    "SparseDecode",
    "STRATEGIES",
    "Strategies",
    "INITIAL_CAPACITY",
    "Influence",
    "MAX_K",
    "PRIORITY",
    "Request",
    "Selection",
    "acc_dtype",
    "accumulate_at",
    "accumulate_influence",
    "as_sae",
    "available_backends",
    "choose_backend",
    "choose_optional",
    "decode_sparse",
    "encode_sparse",
    "explain",
    "fused_backend",
    "get_backend",
    "influence",
    "influence_at",
    "register_backend",
    "unregister_backend",
]
