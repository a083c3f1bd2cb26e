"""The CUDA extension's streaming selection kernels (``csrc/stream.cu``) behind the chunked
strategy's interface (:mod:`gradsae.backends.chunked`): ``StreamTopK`` / ``StreamThreshold`` with
``fold(chunk, c0)`` once per chunk of latents and ``result()``.

The top-k state is ``[n, kp]`` packed 64-bit keys in the extension's layout (order-preserving
float bits high, ``~index`` low, 0 = empty), decoded here once at the end.
"""

from __future__ import annotations

import functools
import types

import torch

_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _lib():
    from .. import _C

    return _C


def folds(lib=None) -> types.SimpleNamespace:
    """``StreamTopK`` and ``StreamThreshold`` launching through ``lib`` (the compiled module
    the backend loaded and checked; default ``gradsae._C``), for :func:`.chunked.select`."""
    return types.SimpleNamespace(StreamTopK=functools.partial(StreamTopK, lib=lib),
                                 StreamThreshold=functools.partial(StreamThreshold, lib=lib))


def _launch(device: torch.device):
    """Device index and current stream handle for launches on ``device``."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return types.SimpleNamespace(index=index, stream=torch.cuda.current_stream(index).cuda_stream)


def _device_ctx(device: torch.device):
    return torch.cuda.device(device)


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _f32(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.to(torch.float32).contiguous()


def _vec_ok(chunk: torch.Tensor, c0: int, *tables) -> bool:
    """16-byte loads are legal: aligned rows and tables, and c0 a multiple of 8."""
    elem = chunk.element_size()
    return (chunk.data_ptr() % 16 == 0 and (chunk.stride(0) * elem) % 16 == 0 and c0 % 8 == 0
            and all(t is None or t.data_ptr() % 16 == 0 for t in tables))


def decode_keys(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 values, int64 indices) of the extension's keys; empty keys give 0, -1."""
    o = (keys >> 32) & 0xFFFFFFFF
    bits = torch.where((o & 0x80000000) != 0, o & 0x7FFFFFFF, (~o) & 0xFFFFFFFF)
    vals = bits.to(torch.int32).view(torch.float32) if bits.numel() else bits.to(torch.float32)
    idx = (~keys) & 0xFFFFFFFF
    empty = keys == 0
    return torch.where(empty, torch.zeros_like(vals), vals), torch.where(empty, torch.full_like(idx, -1), idx)


class _Fold:
    def __init__(self, n: int, device, bias, scale, lib=None):
        self.lib = lib if lib is not None else _lib()
        self.n = int(n)
        self.device = torch.device(device)
        self.bias, self.scale = _f32(bias), _f32(scale)
        self.next_col = 0

    def _check(self, chunk: torch.Tensor, c0: int) -> torch.Tensor:
        if chunk.shape[0] != self.n:
            raise ValueError(f"chunk has {chunk.shape[0]} rows, the selection {self.n}")
        if c0 < self.next_col:
            raise ValueError(f"chunks must come in ascending latent order (c0={c0} < {self.next_col})")
        if chunk.dtype not in _CODES:
            raise TypeError(f"chunk dtype {chunk.dtype} is not supported (float32, float16, bfloat16)")
        self.next_col = c0 + chunk.shape[1]
        return chunk if chunk.stride(1) == 1 else chunk.contiguous()


class StreamTopK(_Fold):
    """Running per-row top-``k`` (see :class:`gradsae.kernels.stream_select.StreamTopK`)."""

    def __init__(self, n: int, k: int, device, bias=None, scale=None, lib=None):
        super().__init__(n, device, bias, scale, lib)
        lib = self.lib
        if not 1 <= k <= lib.MAX_K:
            raise ValueError(f"k={k} is outside 1..{lib.MAX_K}")
        self.k, self.kp = int(k), lib.topk_pad(k)
        self.best = torch.zeros((self.n, self.kp), dtype=torch.int64, device=self.device)

    def fold(self, chunk: torch.Tensor, c0: int) -> None:
        chunk = self._check(chunk, c0)
        if chunk.numel() == 0:
            return
        with _device_ctx(chunk.device):
            run = _launch(chunk.device)
            self.lib.stream_topk(
                device=run.index, stream=run.stream, p=chunk.data_ptr(), p_stride=chunk.stride(0),
                dtype=_CODES[chunk.dtype], n=self.n, ncols=chunk.shape[1], c0=int(c0), bias=_ptr(self.bias),
                scale=_ptr(self.scale), k=self.k, kp=self.kp, best=self.best.data_ptr(),
                vec=_vec_ok(chunk, c0, self.bias, self.scale),
            )

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        return decode_keys(self.best[:, : self.k])


class StreamThreshold(_Fold):
    """Per-row compaction of ``v > thr`` with exact counts (see
    :class:`gradsae.kernels.stream_select.StreamThreshold`)."""

    def __init__(self, n: int, cap: int, thr: torch.Tensor, device, bias=None, scale=None, lib=None):
        super().__init__(n, device, bias, scale, lib)
        self.cap = max(1, int(cap))
        self.thr = _f32(thr)
        self.idx = torch.full((self.n, self.cap), -1, dtype=torch.int64, device=self.device)
        self.val = torch.zeros((self.n, self.cap), dtype=torch.float32, device=self.device)
        self.count = torch.zeros(self.n, dtype=torch.int32, device=self.device)

    def fold(self, chunk: torch.Tensor, c0: int) -> None:
        chunk = self._check(chunk, c0)
        if chunk.numel() == 0:
            return
        with _device_ctx(chunk.device):
            run = _launch(chunk.device)
            self.lib.stream_threshold(
                device=run.index, stream=run.stream, p=chunk.data_ptr(), p_stride=chunk.stride(0),
                dtype=_CODES[chunk.dtype], n=self.n, ncols=chunk.shape[1], c0=int(c0), bias=_ptr(self.bias),
                scale=_ptr(self.scale), thr=self.thr.data_ptr(), cap=self.cap, idx=self.idx.data_ptr(),
                val=self.val.data_ptr(), counts=self.count.data_ptr(),
                vec=_vec_ok(chunk, c0, self.bias, self.scale, self.thr),
            )

    def result(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.val, self.idx, self.count.to(torch.int64)
