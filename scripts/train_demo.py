"""Train the demo bundled with gradsae: a tiny Llama-style model on key-value lookup, and a TopK and a
JumpReLU SAE on its residual stream at a middle layer.

    python scripts/train_demo.py                 # writes gradsae/data/demo/ (4-8 minutes)
    python scripts/train_demo.py --out /tmp/demo  # somewhere else

Everything is seeded (examples, initialisation, batches) and runs on the CPU with one thread by
default, so a rerun with the same torch version writes the same weights. The task
is :mod:`gradsae.demo.task`; the output directory holds

    model/          config.json, model.safetensors, tokenizer files (AutoModelForCausalLM /
                    AutoTokenizer.from_pretrained load it offline)
    sae_topk/       SAELens layout (cfg.json + sae_weights.safetensors), read by gradsae.load_sae
    sae_jumprelu/   the same for the JumpReLU SAE
    training.json   the settings and the measured quality (accuracy, FVE, spliced loss)

The output is built in a temporary directory beside the target and renamed into place at the
end, so an interrupted run leaves nothing half-written.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from gradsae import GradSAE, SAE, load_sae
from gradsae.demo import task
from gradsae.model.hooks import resolve_hook

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "gradsae" / "data" / "demo"

MODEL = dict(num_hidden_layers=4, hidden_size=64, num_attention_heads=4, num_key_value_heads=4,
             intermediate_size=128, max_position_embeddings=96)
LAYER = 1  # blocks.1.hook_resid_post: the residual stream after 2 of the 4 blocks
HOOK = f"blocks.{LAYER}.hook_resid_post"


def log(msg: str) -> None:
    print(msg, flush=True)


# ---------------------------------------------------------------------------------- data
def training_text(e: task.Example, rng, questions: int) -> str:
    """The example followed by more questions about the same context, up to ``questions`` in
    all, each key asked once (dense supervision, as in multi-query associative recall; the
    first question is exactly the demo's format)."""
    others = [p for p in e.pairs if p[0] != e.key]
    rng.shuffle(others)
    qs = [f"Q : {k} -> Result = [[ {v} ]]" for k, v in others[: max(0, questions - 1)]]
    return " ".join([e.text] + qs)


def encode(tok, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(ids, attention_mask, loss_mask)`` ``[N, T]``, right-padded; the loss counts the tokens
    of each answer (``Result = [[ value ]]`` after ``->``) and the end-of-sequence token."""
    enc = tok([t + " <eos>" for t in texts], return_tensors="pt", padding=True)
    ids, att = enc["input_ids"], enc["attention_mask"].bool()
    arrow, close, eos = (tok.convert_tokens_to_ids(t) for t in ("->", "]]", "<eos>"))
    # inside an answer: after "->" up to and including "]]"
    opened = (ids == arrow).long().cumsum(-1)
    closed = (ids == close).long().cumsum(-1)
    inside = (opened > closed) & (ids != arrow)
    target = (inside | (ids == close) | (ids == eos)) & att
    return ids, att, target


def answer_positions(tok, ids: torch.Tensor) -> torch.Tensor:
    """Index of the answer token in each row (the token after ``[[``)."""
    br = tok.convert_tokens_to_ids("[[")
    return (ids == br).long().argmax(-1) + 1


# ---------------------------------------------------------------------------------- model
def train_model(tok, args):
    import random

    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, tie_word_embeddings=True, **MODEL)
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps)))
    g = torch.Generator().manual_seed(args.seed)
    rng = random.Random(args.seed + 5)
    train = [training_text(e, rng, args.questions) for e in task.examples(args.train_examples, seed=args.seed + 1)]
    ids, att, tgt = encode(tok, train)
    val_ids, val_att, _ = encode(tok, [e.text for e in task.examples(500, seed=args.seed + 2)])
    from tqdm.auto import tqdm

    model.train()
    bar = tqdm(range(args.steps), desc="model", mininterval=2.0, file=sys.stdout)
    for step in bar:
        b = torch.randint(0, ids.shape[0], (args.batch,), generator=g)
        x, a, t = ids[b], att[b], tgt[b]
        logits = model(input_ids=x, attention_mask=a.long()).logits[:, :-1]
        m = t[:, 1:]
        loss = F.cross_entropy(logits[m], x[:, 1:][m])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 250 == 0 or step == args.steps - 1:
            acc = answer_accuracy(model, tok, val_ids, val_att)[0]
            bar.set_postfix(loss=f"{loss.item():.3f}", val_acc=f"{acc:.3f}")
            model.train()
            if acc >= args.stop_at:
                log(f"\nvalidation accuracy {acc:.3f} >= {args.stop_at}: stopping at step {step}")
                break
    model.eval()
    return model


@torch.no_grad()
def answer_accuracy(model, tok, ids, att, batch: int = 250) -> tuple[float, float]:
    """``(accuracy, mean cross-entropy)`` of the answer token, teacher-forced on the prompt."""
    model.eval()
    pos = answer_positions(tok, ids)
    hits, nll = 0, 0.0
    for s in range(0, ids.shape[0], batch):
        x, a, p = ids[s:s + batch], att[s:s + batch], pos[s:s + batch]
        logits = model(input_ids=x, attention_mask=a.long()).logits
        r = torch.arange(x.shape[0])
        lg = logits[r, p - 1]
        hits += int((lg.argmax(-1) == x[r, p]).sum())
        nll += float(F.cross_entropy(lg, x[r, p], reduction="sum"))
    return hits / ids.shape[0], nll / ids.shape[0]


@torch.no_grad()
def collect(model, ids, att, batch: int = 250) -> torch.Tensor:
    """Residual-stream vectors at :data:`HOOK` for every real token, ``[N, d_model]``."""
    point = resolve_hook(model, HOOK)
    out = []

    def grab(h):
        out.append(h.detach().clone())
        return h

    handle = point.attach(grab)
    try:
        for s in range(0, ids.shape[0], batch):
            model(input_ids=ids[s:s + batch], attention_mask=att[s:s + batch].long())
    finally:
        handle.remove()
    acts = torch.cat([o.reshape(-1, o.shape[-1]) for o in out])
    return acts[att.reshape(-1)]


# ---------------------------------------------------------------------------------- SAEs
class _JumpHeaviside(torch.autograd.Function):
    """H(v - t) with the straight-through pseudo-derivative of Rajamanoharan et al. (2024)
    for the threshold: d/dt = -(1/eps) * rect((v - t) / eps)."""

    @staticmethod
    def forward(ctx, v, t, eps):
        ctx.save_for_backward(v, t)
        ctx.eps = eps
        return (v > t).to(v.dtype)

    @staticmethod
    def backward(ctx, g):
        v, t = ctx.saved_tensors
        eps = ctx.eps
        rect = ((v - t).abs() < eps / 2).to(v.dtype)
        return torch.zeros_like(v), (-(1.0 / eps) * rect * g).sum(0), None


class _JumpReLU(torch.autograd.Function):
    """v * H(v - t): gradient v -> H(v - t); threshold pseudo-derivative -(t/eps) rect(.)."""

    @staticmethod
    def forward(ctx, v, t, eps):
        ctx.save_for_backward(v, t)
        ctx.eps = eps
        return v * (v > t).to(v.dtype)

    @staticmethod
    def backward(ctx, g):
        v, t = ctx.saved_tensors
        eps = ctx.eps
        rect = ((v - t).abs() < eps / 2).to(v.dtype)
        return g * (v > t).to(v.dtype), (-(t / eps) * rect * g).sum(0), None


def train_sae(acts: torch.Tensor, kind: str, args) -> SAE:
    """Train a ``topk`` or ``jumprelu`` SAE on ``acts`` (already divided by the input scale)."""
    d_in = acts.shape[1]
    d_sae = args.d_sae
    torch.manual_seed(args.seed + (10 if kind == "topk" else 20))
    W_dec = torch.randn(d_sae, d_in)
    W_dec = W_dec / W_dec.norm(dim=-1, keepdim=True) * 0.1
    W_dec.requires_grad_(True)
    W_enc = W_dec.detach().t().clone().requires_grad_(True)
    b_enc = torch.zeros(d_sae, requires_grad=True)
    b_dec = acts.median(dim=0).values.clone().requires_grad_(True)
    params = [W_enc, b_enc, W_dec, b_dec]
    log_t = None
    if kind == "jumprelu":
        log_t = torch.full((d_sae,), math.log(args.jump_init), requires_grad=True)
        params.append(log_t)
    opt = torch.optim.Adam(params, lr=args.sae_lr)
    g = torch.Generator().manual_seed(args.seed + 30)
    var = (acts - acts.mean(0)).pow(2).sum(-1).mean()
    from tqdm.auto import tqdm

    bar = tqdm(range(args.sae_steps), desc=f"sae {kind}", mininterval=2.0, file=sys.stdout)
    for step in bar:
        x = acts[torch.randint(0, acts.shape[0], (args.sae_batch,), generator=g)]
        pre = (x - b_dec) @ W_enc + b_enc
        if kind == "topk":
            top = pre.topk(args.k, dim=-1)
            z = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
            sparsity = torch.zeros(())
        else:
            t = log_t.exp()
            z = _JumpReLU.apply(pre, t, args.jump_eps)
            l0 = _JumpHeaviside.apply(pre, t, args.jump_eps).sum(-1).mean()
            coeff = args.l0_coeff * min(1.0, step / (0.2 * args.sae_steps))
            sparsity = coeff * l0
        x_hat = z @ W_dec + b_dec
        mse = (x_hat - x).pow(2).sum(-1).mean() / var
        loss = mse + sparsity
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():  # unit-norm decoder rows (the encoder absorbs the scale)
            W_dec /= W_dec.norm(dim=-1, keepdim=True).clamp(min=1e-8)
        if step % 500 == 0:
            bar.set_postfix(nmse=f"{mse.item():.4f}", l0=f"{(z > 0).float().sum(-1).mean():.1f}")
    kw = dict(hook_name=HOOK, hook_layer=LAYER, model_name="gradsae-demo-kv")
    if kind == "topk":
        return SAE(W_enc.detach(), b_enc.detach(), W_dec.detach(), b_dec.detach(), "topk", k=args.k, **kw)
    return SAE(W_enc.detach(), b_enc.detach(), W_dec.detach(), b_dec.detach(), "jumprelu",
               threshold=log_t.detach().exp(), **kw)


def fold_scale(sae: SAE, s: float) -> SAE:
    """The SAE trained on ``x / s`` as an SAE on raw ``x`` (same latents, reconstruction * s)."""
    return SAE(sae.W_enc / s, sae.b_enc, sae.W_dec * s, sae.b_dec * s, sae.activation, k=sae.k,
               threshold=sae.threshold, hook_name=sae.meta.hook_name, hook_layer=sae.meta.hook_layer,
               model_name=sae.meta.model_name)


@torch.no_grad()
def sae_quality(sae: SAE, acts: torch.Tensor, model, tok, ids, att) -> dict:
    """Fraction of variance explained, L0 and dead latents on held-out vectors; answer accuracy
    and cross-entropy with the SAE spliced in (through gradsae's own splice)."""
    z = sae.encode(acts)
    x_hat = sae.decode(z)
    fve = 1.0 - float((acts - x_hat).pow(2).sum() / (acts - acts.mean(0)).pow(2).sum())
    l0 = float((z > 0).float().sum(-1).mean())
    dead = int(((z > 0).sum(0) == 0).sum())
    scorer = GradSAE(model, sae, mode="splice", tokenizer=tok)
    with scorer.spliced():
        acc, ce = answer_accuracy(model, tok, ids, att)
    return dict(fve=round(fve, 4), l0=round(l0, 2), dead_latents=dead, d_sae=sae.d_sae,
                spliced_answer_accuracy=round(acc, 4), spliced_answer_ce=round(ce, 4))


# ---------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=10000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--stop-at", type=float, default=0.99, help="stop when validation accuracy reaches this")
    p.add_argument("--questions", type=int, default=task.MAX_PAIRS, help="questions per training sequence")
    p.add_argument("--train-examples", type=int, default=50000)
    p.add_argument("--sae-examples", type=int, default=2000)
    p.add_argument("--d-sae", type=int, default=256)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--sae-steps", type=int, default=1500)
    p.add_argument("--sae-batch", type=int, default=512)
    p.add_argument("--sae-lr", type=float, default=1e-3)
    p.add_argument("--l0-coeff", type=float, default=2e-3)
    p.add_argument("--jump-init", type=float, default=0.05)
    p.add_argument("--jump-eps", type=float, default=0.05)
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    t0 = time.time()
    tok = task.build_tokenizer()
    model = train_model(tok, args)
    val_ids, val_att, _ = encode(tok, [e.text for e in task.examples(2000, seed=args.seed + 3)])
    acc, ce = answer_accuracy(model, tok, val_ids, val_att)
    log(f"model: answer accuracy {acc:.4f}, answer cross-entropy {ce:.4f} on 2000 held-out prompts "
        f"({time.time() - t0:.0f}s)")

    sae_ids, sae_att, _ = encode(tok, [e.text for e in task.examples(args.sae_examples, seed=args.seed + 4)])
    acts = collect(model, sae_ids, sae_att)
    held = collect(model, val_ids[:500], val_att[:500])
    scale = float(acts.pow(2).sum(-1).mean().sqrt() / math.sqrt(acts.shape[1]))
    log(f"activations at {HOOK}: {tuple(acts.shape)} for training, {tuple(held.shape)} held out; "
        f"input scale {scale:.3f}")

    report = dict(task=dict(keys=task.N_KEYS, values=task.N_VALUES, pairs=[task.MIN_PAIRS, task.MAX_PAIRS]),
                  model=dict(MODEL, answer_accuracy=round(acc, 4), answer_ce=round(ce, 4)),
                  hook=HOOK, args={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                                   if k != "out"}, saes={})
    saes = {}
    for kind in ("topk", "jumprelu"):
        sae = fold_scale(train_sae(acts / scale, kind, args), scale)
        q = sae_quality(sae, held, model, tok, val_ids, val_att)
        log(f"sae {kind}: FVE {q['fve']:.4f}, L0 {q['l0']:.1f}, dead {q['dead_latents']}/{q['d_sae']}; "
            f"spliced: answer accuracy {q['spliced_answer_accuracy']:.4f} (clean {acc:.4f}), "
            f"answer cross-entropy {q['spliced_answer_ce']:.4f} (clean {ce:.4f})")
        saes[kind] = sae
        report["saes"][kind] = q

    out = args.out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        model.save_pretrained(tmp / "model", safe_serialization=True)
        tok.save_pretrained(tmp / "model")
        for kind, sae in saes.items():
            sae.save(tmp / f"sae_{kind}")
            back = load_sae(tmp / f"sae_{kind}")  # the shipped files must read back exactly
            x = held[:64]
            if not torch.equal(back.encode(x), sae.encode(x)):
                raise RuntimeError(f"sae_{kind} does not read back identically")
        report["seconds"] = round(time.time() - t0, 1)
        (tmp / "training.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    log(f"wrote {out} ({size / 2**20:.1f} MiB) in {time.time() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
