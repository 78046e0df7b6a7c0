#!/usr/bin/env python3
"""Second stage for the built-in model: teach the MTP head to draft from its own output.

mtp-gen chains drafts as the real checkpoints are used (vLLM, SGLang, llama.cpp): draft k > 1
feeds the head its own post-`mtp.norm` output at the previous position as h, where training
(train_mtp.py) only ever showed it the main model's hidden state.  Jointly trained, its held-out
loss was 3.92 on a chained step against 3.66 on a first one.  This stage freezes the main model
and trains only the head on

  loss = CE(step 1 at i, t[i+2]) + CE(step 2 at i+1, t[i+3])
  step 1 at i:   the head on (h_i, t[i+1]) at position i, attending steps 1 at 0..i (as train_mtp.py)
  step 2 at i+1: the head on (mtp.norm(step 1 at i), t[i+2]) at position i+1, attending steps 1
                 at 0..i and itself: what a chained draft sees in mtp-gen, whose head cache holds
                 teacher-forced rows for every accepted position

Step 2 runs in one pass over [steps 1, steps 2] with a mask that gives each chained row its
teacher-forced prefix.  Gradients reach step 1 through the chained input too.

usage: chain_head.py --data DIR --from RUN --out DIR [--steps N] [--export]
  RUN/ckpt.pt is train_mtp.py's checkpoint; OUT/ckpt.pt this stage's (resumable; SIGTERM saves).
"""
import argparse, json, math, os, signal, time
import numpy as np
import torch
import torch.nn.functional as F

from train_mtp import make_config, build, export

def head_layer(model, mtp, z, pos, mask):
    out = mtp.layers[0](z, position_embeddings=model.model.rotary_emb(z, pos), attention_mask=mask,
                        position_ids=pos, past_key_values=None)
    return out[0] if isinstance(out, tuple) else out


def chain_mask(T):
    """[1, 1, 2T-1, 2T-1] additive mask over [T step-1 rows, T-1 step-2 rows]."""
    n = 2 * T - 1
    allow = torch.zeros(n, n, dtype=torch.bool)
    allow[:T, :T] = torch.ones(T, T, dtype=torch.bool).tril()
    for i in range(T - 1):                      # step 2 row i sits at position i+1
        allow[T + i, :i + 1] = True
        allow[T + i, T + i] = True
    return torch.zeros(n, n).masked_fill(~allow, float("-inf"))[None, None]


def chain_losses(model, mtp, ids, mask):
    """ids [B, T+2] -> (step-1 CE, step-2 CE); the main model runs without gradients."""
    x = ids[:, :-2]
    B, T = x.shape
    with torch.no_grad():
        h = model.model(input_ids=x, use_cache=False).last_hidden_state
    emb = model.model.embed_tokens
    z1 = mtp.fc(torch.cat([mtp.pre_fc_norm_embedding(emb(ids[:, 1:T + 1])), mtp.pre_fc_norm_hidden(h)], dim=-1))
    pos1 = torch.arange(T)[None].expand(B, -1)
    n1 = mtp.norm(head_layer(model, mtp, z1, pos1, mask[:, :, :T, :T]))
    l1 = F.cross_entropy(model.lm_head(n1).reshape(-1, emb.num_embeddings).float(), ids[:, 2:T + 2].reshape(-1))
    z2 = mtp.fc(torch.cat([mtp.pre_fc_norm_embedding(emb(ids[:, 2:T + 1])), mtp.pre_fc_norm_hidden(n1[:, :-1])], dim=-1))
    pos = torch.cat([pos1, pos1[:, 1:]], dim=1)
    n2 = mtp.norm(head_layer(model, mtp, torch.cat([z1, z2], dim=1), pos, mask)[:, T:])
    l2 = F.cross_entropy(model.lm_head(n2).reshape(-1, emb.num_embeddings).float(), ids[:, 3:T + 2].reshape(-1))
    return l1, l2


@torch.no_grad()
def evaluate(model, mtp, data, T, mask, n_seqs, bs=8):
    mtp.eval()
    n = min(n_seqs, (len(data) - 2) // T)
    s1 = s2 = 0.0
    for s in range(0, n, bs):
        ids = torch.stack([torch.from_numpy(data[i * T:i * T + T + 2].astype(np.int64)) for i in range(s, min(n, s + bs))])
        l1, l2 = chain_losses(model, mtp, ids, mask)
        s1 += l1.item() * len(ids); s2 += l2.item() * len(ids)
    mtp.train()
    return s1 / n, s2 / n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="/tmp/train/data")
    ap.add_argument("--from", dest="src", default="/tmp/train/runA")
    ap.add_argument("--out", default="/tmp/train/chain")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--model", type=json.loads, default={})
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--export", action="store_true", help="write OUT/hf from OUT/ckpt.pt and evaluate")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from transformers import AutoTokenizer
    tokdir = os.path.join(a.data, "tok")
    tok = AutoTokenizer.from_pretrained(tokdir)
    cfg, lt = make_config((len(tok) + 63) // 64 * 64, tok.convert_tokens_to_ids("<|im_end|>"),
                          tok.convert_tokens_to_ids("<|endoftext|>"), a.model)
    model, mtp = build(cfg, lt)
    base = torch.load(os.path.join(a.src, "ckpt.pt"), weights_only=False)
    model.load_state_dict(base["model"]); mtp.load_state_dict(base["mtp"])
    model.lm_head.weight = model.model.embed_tokens.weight
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    # the head's own weights only: embeddings and lm_head are the main model's
    params = list(mtp.parameters())
    opt = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
                             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                            lr=a.lr, betas=(0.9, 0.95), eps=1e-8)
    train = np.fromfile(os.path.join(a.data, "train.bin"), dtype=np.uint16)
    val = np.fromfile(os.path.join(a.data, "val.bin"), dtype=np.uint16)
    T = a.seq
    mask = chain_mask(T)
    os.makedirs(a.out, exist_ok=True)
    ck, logf = os.path.join(a.out, "ckpt.pt"), os.path.join(a.out, "log.jsonl")
    step, elapsed = 0, 0.0
    gen = torch.Generator().manual_seed(7)
    if os.path.exists(ck):
        s = torch.load(ck, weights_only=False)
        mtp.load_state_dict(s["mtp"]); opt.load_state_dict(s["opt"])
        step, elapsed = s["step"], s["elapsed"]
        gen.set_state(s["gen"])
        print("resumed at step", step, flush=True)
    if a.export:
        export(a, model, mtp, cfg, tokdir)
        l1, l2 = evaluate(model, mtp, val, T, mask, 10 ** 9)
        r = {"val_step1_loss": l1, "val_step2_loss": l2, "step": step, "elapsed_s": elapsed}
        json.dump(r, open(os.path.join(a.out, "final_eval.json"), "w"), indent=1)
        print(r)
        return

    def save():
        torch.save({"mtp": mtp.state_dict(), "opt": opt.state_dict(), "step": step, "elapsed": elapsed,
                    "gen": gen.get_state(), "args": vars(a)}, ck + ".tmp")
        os.replace(ck + ".tmp", ck)

    if step == 0:
        l1, l2 = evaluate(model, mtp, val, T, mask, 32)
        rec = {"step": 0, "val_step1_loss": l1, "val_step2_loss": l2}
        print(json.dumps(rec), flush=True)
        open(logf, "a").write(json.dumps(rec) + "\n")
    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
    t_last, last_ck = time.time(), time.time()
    while step < a.steps and not stop["now"]:
        lr = a.lr * min(1.0, (step + 1) / a.warmup) * (1 - 0.9 * step / a.steps)
        for gr in opt.param_groups:
            gr["lr"] = lr
        offs = torch.randint(0, len(train) - T - 2, (a.batch,), generator=gen)
        ids = torch.stack([torch.from_numpy(train[o:o + T + 2].astype(np.int64)) for o in offs.tolist()])
        l1, l2 = chain_losses(model, mtp, ids, mask)
        opt.zero_grad(set_to_none=True)
        (l1 + l2).backward()
        gn = torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        now = time.time()
        elapsed += min(now - t_last, 60)
        t_last = now
        if step % 10 == 0:
            rec = {"step": step, "step1_loss": l1.item(), "step2_loss": l2.item(), "lr": lr, "gnorm": float(gn),
                   "elapsed": round(elapsed, 1)}
            if step % a.eval_every == 0:
                rec["val_step1_loss"], rec["val_step2_loss"] = evaluate(model, mtp, val, T, mask, 32)
            print(json.dumps(rec), flush=True)
            open(logf, "a").write(json.dumps(rec) + "\n")
        if now - last_ck > 180:
            save(); last_ck = time.time()
    save()
    print("stopped" if stop["now"] else "done", "at step", step, flush=True)


if __name__ == "__main__":
    main()
