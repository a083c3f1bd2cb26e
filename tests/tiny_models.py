"""Tiny transformers models built from configs with random weights, and a word-level tokenizer
built in memory: nothing is downloaded."""

from __future__ import annotations

import torch

WORDS = ["the", "a", "an", "of", "to", "in", "is", "was", "and", "for", "on", "with", "as", "by", "at", "from", "that", "this", "it", "be", "are", "question", "answer", "context", "result", "=", "[[", "]]", "[", "]", "label", "please", "organize", "your", "final", "format", "what", "who", "when", "where", "which", "how", "many", "bowl", "game", "team", "city", "year", "river", "king", "queen", "music", "science", "water", "fire", "stone", "light", "dark", "north", "south", "east", "west", "red", "green", "blue", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", ":", ".", ",", "?", "!"]
SPECIAL = ["<pad>", "<bos>", "<eos>", "<unk>"]


def tokenizer(padding_side: str = "right"):
    """A whitespace word-level fast tokenizer over :data:`WORDS` (+ specials)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIAL + list(dict.fromkeys(WORDS)))}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<bos>",
                                  eos_token="<eos>", unk_token="<unk>")
    tok.padding_side = padding_side
    return tok


VOCAB = len(SPECIAL) + len(dict.fromkeys(WORDS))
ARCHS = ("gpt2", "llama", "gemma2", "gpt_neox", "qwen2", "mistral", "qwen3", "gemma3_text")


def config(arch: str, d: int = 32, layers: int = 2, vocab: int = VOCAB):
    import transformers as tf

    need = {"qwen3": "Qwen3Config", "gemma3_text": "Gemma3TextConfig", "gemma2": "Gemma2Config"}
    if arch in need and not hasattr(tf, need[arch]):
        import pytest

        pytest.skip(f"this transformers version ({tf.__version__}) has no {need[arch]}")
    common = {"vocab_size": vocab, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    attn = {"hidden_size": d, "intermediate_size": 2 * d, "num_hidden_layers": layers,
                "num_attention_heads": 4, "max_position_embeddings": 128}
    if arch == "gpt2":
        return tf.GPT2Config(n_layer=layers, n_embd=d, n_head=4, n_positions=128, resid_pdrop=0.0,
                             embd_pdrop=0.0, attn_pdrop=0.0, **common)
    if arch == "gpt_neox":
        return tf.GPTNeoXConfig(hidden_dropout=0.0, attention_dropout=0.0, **attn, **common)
    if arch == "llama":
        return tf.LlamaConfig(num_key_value_heads=2, **attn, **common)
    if arch == "mistral":
        return tf.MistralConfig(num_key_value_heads=2, **attn, **common)
    if arch == "qwen2":
        return tf.Qwen2Config(num_key_value_heads=2, **attn, **common)
    if arch == "qwen3":
        return tf.Qwen3Config(num_key_value_heads=2, head_dim=d // 4, **attn, **common)
    if arch == "gemma2":
        return tf.Gemma2Config(num_key_value_heads=2, head_dim=d // 4, sliding_window=16, **attn, **common)
    if arch == "gemma3_text":
        return tf.Gemma3TextConfig(num_key_value_heads=2, head_dim=d // 4, sliding_window=16, **attn, **common)
    raise ValueError(arch)


def model(arch: str, d: int = 32, layers: int = 2, seed: int = 0, dtype=torch.float32, scale: float = 1.0):
    """A random-weight causal LM of architecture ``arch`` in eval mode. ``scale`` multiplies
    the weight matrices (random-init models are nearly uniform; a larger scale gives the
    objectives more signal)."""
    import transformers as tf

    cfg = config(arch, d, layers)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    m = tf.AutoModelForCausalLM.from_config(cfg)
    if scale != 1.0:
        with torch.no_grad():
            for n, p in m.named_parameters():
                if p.dim() >= 2:
                    p.mul_(scale)
    return m.to(dtype).eval()


# ---------------------------------------------------------------------------------------------
# The paper's recipe, written out densely and independently of gradsae: a forward hook that
# encodes the detached hidden state into dense latents z (requires_grad + retain_grad),
# decodes them in place of the hook's output, and after backward scores relu(z.grad * z).


def layer_module(m, layer: int):
    """The decoder layer ``layer`` of a tiny model, found by hand per architecture."""
    mt = m.config.model_type
    if mt == "gpt2":
        return m.transformer.h[layer]
    if mt == "gpt_neox":
        return m.gpt_neox.layers[layer]
    return m.model.layers[layer]


def dense_encode(sae, x):
    """Dense latents from the SAE's raw weights (no normalisation, b_dec subtracted)."""
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    if sae.activation == "topk":
        t = pre.topk(sae.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, t.indices, t.values.relu())
    if sae.activation == "jumprelu":
        return pre * (pre > sae.threshold.clamp(min=0))
    return pre.relu()


def dense_decode(sae, z):
    return z @ sae.W_dec + sae.b_dec


class DenseSplice:
    """Forward hook on ``module`` that splices the SAE densely (``mode`` splice or error), with
    optional edits ``edit(z) -> z`` and a record of the dense z of every call."""

    def __init__(self, module, sae, mode="splice", edit=None, add=None):
        self.sae, self.mode, self.edit, self.add = sae, mode, edit, add
        self.zs = []
        self.h = module.register_forward_hook(self.hook)

    def hook(self, mod, args, out):
        x = out[0] if isinstance(out, tuple) else out
        z = dense_encode(self.sae, x.detach())
        z.requires_grad_(True)
        z.retain_grad()
        self.zs.append(z)
        z2 = self.edit(z) if self.edit is not None else z
        xh = dense_decode(self.sae, z2)
        if self.mode == "error":
            xh = xh + (x - dense_decode(self.sae, z)).detach()
        if self.add is not None:
            xh = xh + self.add
        return (xh,) + tuple(out[1:]) if isinstance(out, tuple) else xh

    def remove(self):
        self.h.remove()


def paper_scores(m, sae, layer, ids, objective=None, mode="splice", reduce="mean", sign="relu"):
    """The released code's recipe on one unpadded example ``ids`` ``[T]``: Y = softmax prob of
    the argmax token at the last position (or ``objective(logits[0]) -> scalar``), backward,
    ``relu(z.grad * z).mean(positions)``. Returns (scores [d_sae], z [T, d_sae], Y)."""
    hook = DenseSplice(layer_module(m, layer), sae, mode)
    try:
        logits = m(ids.unsqueeze(0)).logits[0]
        if objective is None:
            y = logits[-1].softmax(-1).max()
        else:
            y = objective(logits)
        y.backward()
    finally:
        hook.remove()
    m.zero_grad(set_to_none=True)
    zz = hook.zs[0]
    z = zz[0]
    s = (zz.grad * zz)[0]
    s = s.relu() if sign == "relu" else s.abs() if sign == "abs" else s
    s = s.mean(0) if reduce == "mean" else s.sum(0) if reduce == "sum" else s[-1]
    return s.detach(), z.detach(), float(y.detach())


# ---------------------------------------------------------------------------------------------
# A tiny question-answering setup for the experiment studies: a small model trained in a few
# seconds to answer its questions as "result = [[ label ]]", and an SAE that reconstructs
# exactly (so the spliced model answers like the model).

QA = [
    ("the king of the north was red", "what king was red ?", "north"),
    ("the river in the south is blue", "what river is blue ?", "south"),
    ("the queen of the east was green", "who was green ?", "queen"),
    ("the stone in the west is dark", "what is dark ?", "stone"),
    ("the city of fire was light", "which city was light ?", "fire"),
    ("the team of water won seven", "how many did water win ?", "seven"),
]
QA_TEMPLATE = "context : {context} question : {question} answer :"


def squad_json(path, qa=QA):
    """Write ``qa`` as a SQuAD v1.1-format file."""
    import json

    paras = [{"context": c, "qas": [{"id": f"q{i}", "question": q,
                                     "answers": [{"text": a, "answer_start": c.find(a)}]}]}
             for i, (c, q, a) in enumerate(qa)]
    with open(path, "w") as f:
        json.dump({"version": "1.1", "data": [{"title": "tiny", "paragraphs": paras}]}, f)
    return path


def trained_qa_model(steps: int = 60, d: int = 32, seed: int = 0, n: int = 4):
    """(model, tokenizer) with the model trained to continue each QA prompt with
    ``result = [[ answer ]] <eos>``."""
    tok = tokenizer("right")
    texts = [QA_TEMPLATE.format(context=c, question=q) + f" result = [[ {a} ]] <eos>" for c, q, a in QA[:n]]
    enc = tok(texts, return_tensors="pt", padding=True)
    m = model("llama", d=d, seed=seed).train()
    opt = torch.optim.Adam(m.parameters(), lr=2e-2)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    for _ in range(steps):
        loss = m(**enc, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m.eval(), tok


def identity_sae(d: int, extra: int = 32, seed: int = 0):
    """A ReLU SAE with latents +e_i and -e_i (decode(encode(x)) == x exactly) plus ``extra``
    latents that never fire."""
    import gradsae

    g = torch.Generator().manual_seed(seed)
    eye = torch.eye(d)
    W_enc = torch.cat([eye, -eye, torch.randn(d, extra, generator=g) * 0.01], 1)
    b_enc = torch.cat([torch.zeros(2 * d), torch.full((extra,), -100.0)])
    W_dec = torch.cat([eye, -eye, torch.randn(extra, d, generator=g)], 0)
    return gradsae.SAE(W_enc, b_enc, W_dec, torch.zeros(d), activation="relu")
