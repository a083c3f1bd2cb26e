"""The model's output head, split off so that an objective never builds ``[B, T, vocab]`` logits.

A transformers causal LM is a body (``model.base_model``: embeddings, blocks, final norm) and a
linear head (``lm_head``, tied or not), sometimes followed by a logit soft-cap. GradSAE's
objectives need the logits at one position per example (``predicted_prob``, ``logprob``,
``logit_diff``) or a next-token loss over all of them (``loss``, and ``loglik``, its negative). Running the body and then
the head only where the objective looks saves the full logits tensor, its ``log_softmax`` copy
and their gradients: for GPT-2 and 1024 tokens that is four ``1024 x 50257`` float32 tensors
(~800 MB) and most of the time spent outside the matrix products.

- :func:`split_head` returns the :class:`Head` of a model whose head it knows to be plain
  (listed architectures, the transformers class itself, no hooks on the head), else None: the
  caller then uses the model's own logits.
- :func:`chunked_nll` is the weighted next-token NLL over selected positions, computed a chunk of
  positions at a time (negative weights give the log-likelihood: ``loglik`` is the ``loss``
  with weights ``-1/n``); the gradient with respect to the hidden states is formed in the same
  pass (``(softmax - onehot) @ W``), so at most one chunk of logits exists at any moment and
  the backward is a scaling.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Architectures whose causal-LM class computes ``lm_head(last_hidden_state)`` and then, at most,
# the soft-cap ``c * tanh(logits / c)`` of ``config.final_logit_softcapping``.
PLAIN_HEADS = frozenset({"gpt2", "gpt_neox", "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text"})

# Logits per chunk of :func:`chunked_nll` (2^24 float32 = 64 MiB; 333 positions of GPT-2).
CHUNK_ELEMENTS = 1 << 24


@dataclass
class Head:
    """A causal LM split at its output head: ``body`` gives ``last_hidden_state``; the logits
    are ``softcap(h @ weight.T + bias)``."""

    body: torch.nn.Module
    weight: torch.Tensor
    bias: torch.Tensor | None
    softcap: float | None

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Logits of hidden states ``[..., d]`` (differentiable with respect to ``h``)."""
        lg = F.linear(h.to(self.weight.device), self.weight, self.bias)
        if self.softcap:
            lg = torch.tanh(lg / self.softcap) * self.softcap
        return lg


def split_head(model) -> Head | None:
    """The :class:`Head` of ``model`` if its logits are known to be ``softcap(lm_head(h))``
    with ``h`` the base model's last hidden state, else None."""
    cfg = getattr(model, "config", None)
    cls = type(model)
    if getattr(cfg, "model_type", None) not in PLAIN_HEADS or not cls.__module__.startswith("transformers."):
        return None
    if not (cls.__name__.endswith("ForCausalLM") or cls.__name__.endswith("LMHeadModel")):
        return None
    body = getattr(model, "base_model", None)
    get = getattr(model, "get_output_embeddings", None)
    lin = get() if callable(get) else None
    if body is None or body is model or type(lin) is not torch.nn.Linear:
        return None
    # hooks on the head or the model (a user's, or accelerate's device placement) may change
    # what the logits are: use the model's own forward then
    for m in (model, lin):
        if m._forward_hooks or m._forward_pre_hooks or hasattr(m, "_hf_hook"):
            return None
    cap = getattr(cfg, "final_logit_softcapping", None)
    return Head(body, lin.weight, lin.bias, float(cap) if cap else None)


class _ChunkedNLL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, head, targets, weights, rows, n_out):
        N = h.shape[0]
        V = head.weight.shape[0]
        step = max(1, CHUNK_ELEMENTS // max(V, 1))
        acc = torch.float32 if h.dtype in (torch.float16, torch.bfloat16) else h.dtype
        y = torch.zeros(n_out, dtype=acc, device=h.device)
        grad = torch.empty(h.shape, dtype=acc, device=h.device) if ctx.needs_input_grad[0] else None
        W = head.weight
        for s in range(0, N, step):
            e = min(N, s + step)
            raw = F.linear(h[s:e].to(W.device), W, head.bias)
            lg = raw.to(acc)
            if head.softcap:
                t = torch.tanh(lg / head.softcap)
                lg = t * head.softcap
            tgt = targets[s:e, None].to(lg.device)
            w = weights[s:e].to(lg.device, acc)
            picked = lg.gather(-1, tgt).squeeze(-1)
            top = lg.amax(-1, keepdim=True)
            p = lg.sub_(top).exp_()  # unnormalised softmax, in place of the logits
            tot = p.sum(-1)
            nll = top.squeeze(-1) + tot.log() - picked
            y.index_add_(0, rows[s:e].to(y.device), (nll * w).to(y.device))
            if grad is None:
                continue
            p.mul_((w / tot).unsqueeze(-1))  # w * softmax
            p.scatter_add_(-1, tgt, -w.unsqueeze(-1))  # w * (softmax - onehot)
            if head.softcap:
                p.mul_(1 - t * t)
            grad[s:e] = (p.to(raw.dtype) @ W).to(grad.device)
            del raw, lg, p
        ctx.save_for_backward(grad, rows)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):
        grad, rows = ctx.saved_tensors
        return grad * gy.to(grad.dtype)[rows].unsqueeze(-1), None, None, None, None, None


def chunked_nll(head: Head, h: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, rows: torch.Tensor,
                n_out: int) -> torch.Tensor:
    """``y[b] = sum_{i: rows[i] = b} weights[i] * NLL(softcap(h[i] @ W.T + bias), targets[i])``,
    ``[n_out]``, differentiable with respect to ``h`` ``[N, d]`` (not the head's parameters).
    Weights may be negative (``-1/n`` gives the mean log-likelihood)."""
    return _ChunkedNLL.apply(h, head, targets, weights, rows, n_out)
