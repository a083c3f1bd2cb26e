"""The backends of the influence op, one module each, implementing
:class:`gradsae.op.Backend`:

- :mod:`.reference`: PyTorch, any device, memory-bounded; the correctness oracle and the CPU
  path;
- :mod:`.triton_backend`: the Triton kernels of :mod:`gradsae.kernels`;
- :mod:`.cuda_backend`: the CUDA C++ kernels of ``csrc/`` (the compiled ``gradsae._C``).

Each module exposes its backend object as ``BACKEND``; the op's dispatcher
(:mod:`gradsae.op.dispatch`) imports them by name, in its ``PRIORITY`` order, on first use.
This package imports no backend module itself. The dispatch functions callers have imported
from ``gradsae.backends`` are re-exported here; :mod:`gradsae.op` has them all.
"""

from ..op.contract import Request
from ..op.dispatch import available_backends, explain, get_backend, register_backend

__all__ = ["Request", "available_backends", "explain", "get_backend", "register_backend"]
