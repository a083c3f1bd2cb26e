"""gradsae's released recipe side by side with the authors' released code, on a tiny model.

    git clone https://github.com/Tizzzzy/sae_gradient /tmp/sae_gradient   # their code, not gradsae's
    python bench/released_side_by_side.py --src /tmp/sae_gradient [--json out.json]

Their modules are imported from that checkout (``experiment2/gradsae.py`` for the selection
with scores, ``experiment1/gradsae_after.py`` for masking, ``experiment2/gradsae_steer.py``
for steering) and run on the same objects as gradsae: a tiny TransformerLens
``HookedTransformer`` (float32, a word-level tokenizer, trained here for a few seconds to
answer ``result = [[ label ]]``, some questions twice) and a SAELens ``StandardSAE`` at
``blocks.0.hook_resid_post`` that reconstructs exactly (latents +e_i and -e_i) plus random
latents that fire now and then (``--flat N``: and N latents active everywhere whose decoder
row is zero, so that their score is 0 and the 50% Top-K is padded with zero-score latents).

For each question it compares: the stored selection (their ``have_gradient`` /
``no_gradient`` at 50% with their scores) with gradsae's ``score_at_trigger(trigger_at="last")``
and ``recipes.select(..., "argsort")``; the generated text and the answer; the masked
generation (their Top-K zeroed at every position); the steered generation (own Top-K zeroed,
the donor's Top-K set to its scores clamped to [0, 50] at the last position). It prints the
largest relative score difference (relative to each prompt's largest score), how many
sets and texts differ (``*_diff``: 0 means identical), how many prompts' Top-K change between
the first and the last ``[`` step, how many Top-K sets are padded with zero-score latents, and
how many masked / steered generations differ from the unedited one (the edits do something).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
import re
import sys
import warnings

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))  # the tiny word-level tokenizer

QA = [
    ("the king of the north was red", "what king was red ?", "north", 1),
    ("the king of the north was red", "what was the king ?", "red", 2),
    ("the river in the south is blue", "what river is blue ?", "south", 1),
    ("the river in the south is blue", "what is the river ?", "blue", 2),
    ("the queen of the east was green", "who was green ?", "queen", 1),
    ("the stone in the west is dark", "what is dark ?", "stone", 2),
]
TEMPLATE = "context : {context} question : {question} answer :"
LAYER = 0


def load(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        spec.loader.exec_module(mod)
    return mod


def tiny_model(tok, steps, seed):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    torch.manual_seed(seed)
    cfg = HookedTransformerConfig(n_layers=2, d_model=32, n_ctx=128, d_head=8, n_heads=4, d_mlp=64,
                                  d_vocab=len(tok.get_vocab()), act_fn="gelu_new", normalization_type="LN",
                                  dtype=torch.float32, default_prepend_bos=True, seed=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ht = HookedTransformer(cfg, tokenizer=tok)
    texts = []
    for c, q, a, times in QA:
        ans = " and ".join([f"[[ {a} ]]"] * times)
        texts.append(TEMPLATE.format(context=c, question=q) + f" result = {ans} <eos>")
    opt = torch.optim.Adam(ht.parameters(), lr=1e-2)
    toks = [ht.to_tokens(t) for t in texts]
    for _ in range(steps):
        for t in toks:
            loss = ht(t, return_type="loss")
            opt.zero_grad()
            loss.backward()
            opt.step()
    return ht.eval()


def tiny_sae(d, extra, seed, flat=0):
    import sae_lens
    from sae_lens.saes.sae import SAEMetadata

    g = torch.Generator().manual_seed(seed)
    cfg = sae_lens.StandardSAEConfig(d_in=d, d_sae=2 * d + extra + flat, dtype="float32", apply_b_dec_to_input=False,
                                     metadata=SAEMetadata(hook_name=f"blocks.{LAYER}.hook_resid_post"))
    sae = sae_lens.StandardSAE(cfg)
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye, torch.randn(d, extra, generator=g) * 0.5, torch.zeros(d, flat)], 1))
        sae.b_enc.copy_(torch.cat([torch.zeros(2 * d), torch.full((extra,), -1.5), torch.ones(flat)]))
        sae.W_dec.copy_(torch.cat([eye, -eye, torch.randn(extra, d, generator=g) * 0.02, torch.zeros(flat, d)], 0))
        sae.b_dec.zero_()
    return sae


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", default="/tmp/sae_gradient", help="a checkout of the authors' repository")
    ap.add_argument("--steps", type=int, default=40, help="training epochs of the tiny model")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--flat", type=int, default=0,
                    help="latents active at every token with a zero decoder row (score 0): with enough of them "
                         "50%% of the active latents exceeds the positive scores and the released Top-K pads")
    ap.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                    help="the model's dtype after training (the SAE stays float32); float16: their hook returns "
                         "float32, and gradsae's released recipe keeps the SAE's dtype after the splice")
    ap.add_argument("--cast-back", action="store_true",
                    help="gradsae's default splice dtype (cast back to the model's) instead of the released one")
    ap.add_argument("--json", default=None, help="write the numbers here")
    args = ap.parse_args(argv)

    import tiny_models as tm

    import gradsae
    from gradsae import experiments as ex
    from gradsae.recipes import RELEASED, clamp_values, select

    sel2 = load(os.path.join(args.src, "experiment2", "gradsae.py"), "released_select")
    mask1 = load(os.path.join(args.src, "experiment1", "gradsae_after.py"), "released_mask")
    steer2 = load(os.path.join(args.src, "experiment2", "gradsae_steer.py"), "released_steer")

    import tempfile

    from transformers import AutoTokenizer

    d = tempfile.mkdtemp(prefix="side-by-side-tok-")
    tm.tokenizer().save_pretrained(d)
    tok = AutoTokenizer.from_pretrained(d)  # TransformerLens reloads it by path
    ht = tiny_model(tok, args.steps, args.seed)
    if args.dtype == "float16":
        ht = ht.to(torch.float16)
        ht.cfg.dtype = torch.float16  # the norms cast their inputs to it
    lib = tiny_sae(32, 64, args.seed, args.flat)
    sc = gradsae.GradSAE(ht, lib, hook=f"blocks.{LAYER}.hook_resid_post")
    if RELEASED.splice_dtype == "sae" and not args.cast_back:
        sc.splice.out_dtype = sc.sae.dtype
    tok = sc.tokenizer

    def theirs(mod, *a):
        with contextlib.redirect_stdout(io.StringIO()):
            return mod.run_generate(*a)

    def text_of(ids):
        return tok.decode(ids.tolist(), skip_special_tokens=False, clean_up_tokenization_spaces=False)

    stats = {"prompts": 0, "max_rel_score": 0.0, "top_diff": 0, "bottom_diff": 0, "original_diff": 0,
             "text_diff": 0, "answer_diff": 0, "masked_diff": 0, "steered_diff": 0, "steered": 0,
             "first_vs_last_topk": 0, "two_brackets": 0, "kept_f1": 0, "padded_topk": 0,
             "masked_changed": 0, "steered_changed": 0}
    kept = {}
    for c, q, a, _ in QA:
        prompt = TEMPLATE.format(context=c, question=q)
        ids = ht.to_tokens(prompt)[0]
        text, out = theirs(sel2, prompt, ht, LAYER, True, lib)
        rec = out[prompt]
        g = sc.score_at_trigger(ids, trigger="[", trigger_at="last", max_new_tokens=50)
        s = g.scores
        top, bottom = select(s, 0.5, "top", "argsort", sc.device), select(s, 0.5, "bottom", "argsort")
        stats["prompts"] += 1
        stats["top_diff"] += top != [int(j) for j in rec["have_gradient"]]
        stats["bottom_diff"] += bottom != [int(j) for j in rec["no_gradient"]]
        stats["original_diff"] += s.active_last.tolist() != sorted(rec["original"])
        scale = float(s.scores.abs().max())
        for j, v in list(rec["have_gradient"].items()) + list(rec["no_gradient"].items()):
            stats["max_rel_score"] = max(stats["max_rel_score"], abs(float(s.scores[int(j)]) - v) / scale)
        mine = text_of(g.token_ids).replace("<end_of_turn>", "")
        stats["text_diff"] += mine != text
        ans_theirs = text
        m = re.search(r"\[\s*(.*?)\s*\]", ans_theirs)
        ans_theirs = (m.group(1) if m else ans_theirs).replace("[", "").replace("]", "").replace("=", "").strip()
        stats["answer_diff"] += ex.extract_answer_released(mine) != ans_theirs
        stats["kept_f1"] += ex.keeps(ex.extract_answer_released(mine), [a], "released")
        stats["padded_topk"] += bool((s.scores[top] == 0).any())
        n_br = sum("[" in tok.decode([t]) for t in g.token_ids.tolist())
        if n_br > 1:
            stats["two_brackets"] += 1
            first = sc.score_at_trigger(ids, trigger="[", max_new_tokens=50).scores
            stats["first_vs_last_topk"] += select(first, 0.5, "top", "argsort", sc.device) != top
        # masking their Top-K at every position
        masked_theirs, _ = theirs(mask1, prompt, ht, LAYER, True, lib, list(top))
        with sc.intervene(zero=top, positions="all"):
            masked = text_of(sc.generate(ids, max_new_tokens=50).token_ids).replace("<end_of_turn>", "")
        stats["masked_diff"] += masked != masked_theirs
        stats["masked_changed"] += masked != mine
        kept[prompt] = (c, ids, s, {int(j): v for j, v in rec["have_gradient"].items()})

    # steering: each prompt steered by the other question on its paragraph
    for prompt, (c, ids, s, own) in kept.items():
        donor = next((v for p, v in kept.items() if p != prompt and v[0] == c), None)
        if donor is None:
            continue
        stats["steered"] += 1
        steered_theirs, _ = theirs(steer2, prompt, ht, LAYER, True, lib, own, donor[3])
        give = select(donor[2], 0.5, "top", "argsort")
        vals = clamp_values({j: float(donor[2].scores[j]) for j in give}, RELEASED.clamp)
        with sc.intervene(zero=select(s, 0.5, "top", "argsort", sc.device), set=vals, positions="last"):
            steered = text_of(sc.generate(ids, max_new_tokens=50).token_ids).replace("<end_of_turn>", "")
        stats["steered_diff"] += steered != steered_theirs
        stats["steered_changed"] += steered != text_of(sc.generate(ids, max_new_tokens=50).token_ids).replace(
            "<end_of_turn>", "")

    for k, v in stats.items():
        print(f"{k:>20}: {v:.3g}" if isinstance(v, float) else f"{k:>20}: {v}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(stats, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
