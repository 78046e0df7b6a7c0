#!/usr/bin/env python3
"""Train mtp-gen's built-in default model (issue 8): a small Qwen3.5 (Qwen3_5ForCausalLM, exact
architecture: Gated DeltaNet + gated full attention 3:1, tied embeddings) with a 1-layer MTP head
trained jointly, on the Python standard library (see prepare_data.py / README.md).

  loss = CE(main logits at i, t[i+1]) + LAMBDA * CE(mtp logits at i, t[i+2])
  mtp logits at i = lm_head(mtp.norm(mtp.layers.0(fc(cat(pre_fc_norm_embedding(embed(t[i+1])),
                                                         pre_fc_norm_hidden(h_i))))))
  h_i = main model hidden state after the final norm (as in the real Qwen3.5 / Qwen3-Next checkpoints).

The model is the unmodified transformers Qwen3_5ForCausalLM. Only for speed on CPU, the
intra-chunk triangular solve of HF's pure-torch chunked gated delta rule (a 63-step Python loop)
is replaced by torch.linalg.solve_triangular, which computes the same matrix ((I+L)^-1, L strictly
lower); `--check` verifies it against HF's function.

Resumable: checkpoints to OUT/ckpt.pt every --ckpt-every seconds (atomic rename) and on SIGTERM;
rerun the same command to continue.  Learning rate: warmup, constant, then linear decay over the
last --decay-frac of --steps (WSD), so --steps may be changed on resume before the decay starts.

usage: train_mtp.py --data DIR --out DIR [--steps N] [--pilot SECONDS] [--check] [--export]
"""
import argparse, json, math, os, signal, sys, time
import numpy as np
import torch
import torch.nn.functional as F

from transformers import Qwen3_5TextConfig, Qwen3_5ForCausalLM
from transformers.models.qwen3_5 import modeling_qwen3_5 as mq

MODEL = dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
             num_key_value_heads=2, head_dim=64, linear_num_key_heads=8, linear_num_value_heads=8,
             linear_key_head_dim=64, linear_value_head_dim=64, linear_conv_kernel_dim=4,
             rms_norm_eps=1e-6)
FULL_ATTENTION_INTERVAL = 4


def fast_chunk_gated_delta_rule(query, key, value, g, beta, chunk_size=64, initial_state=None,
                                output_final_state=False, use_qk_l2norm_in_kernel=False, **kwargs):
    """Same computation as modeling_qwen3_5.torch_chunk_gated_delta_rule, loop-free intra-chunk solve."""
    initial_dtype = query.dtype
    if use_qk_l2norm_in_kernel:
        query = mq.l2norm(query, dim=-1, eps=1e-6)
        key = mq.l2norm(key, dim=-1, eps=1e-6)
    query, key, value, beta, g = [x.transpose(1, 2).contiguous().to(torch.float32) for x in (query, key, value, beta, g)]
    B, Hh, T, Dk = key.shape
    Dv = value.shape[-1]
    pad = (chunk_size - T % chunk_size) % chunk_size
    query, key, value = [F.pad(x, (0, 0, 0, pad)) for x in (query, key, value)]
    beta, g = F.pad(beta, (0, pad)), F.pad(g, (0, pad))
    TT = T + pad
    query = query * (1 / (Dk ** 0.5))
    v_beta = value * beta.unsqueeze(-1)
    k_beta = key * beta.unsqueeze(-1)
    query, key, value, k_beta, v_beta = [x.reshape(B, Hh, -1, chunk_size, x.shape[-1]) for x in (query, key, value, k_beta, v_beta)]
    g = g.reshape(B, Hh, -1, chunk_size).cumsum(dim=-1)
    decay_mask = ((g.unsqueeze(-1) - g.unsqueeze(-2)).tril().exp().float()).tril()
    upper = torch.triu(torch.ones(chunk_size, chunk_size, dtype=torch.bool), diagonal=0)
    L = ((k_beta @ key.transpose(-1, -2)) * decay_mask).masked_fill(upper, 0)
    eye = torch.eye(chunk_size, dtype=L.dtype)
    attn = torch.linalg.solve_triangular(eye + L, eye.expand_as(L), upper=False, unitriangular=True)
    value = attn @ v_beta
    k_cumdecay = attn @ (k_beta * g.exp().unsqueeze(-1))
    S = torch.zeros(B, Hh, Dk, Dv, dtype=value.dtype) if initial_state is None else initial_state.to(value)
    smask = torch.triu(torch.ones(chunk_size, chunk_size, dtype=torch.bool), diagonal=1)
    outs = []
    for i in range(TT // chunk_size):
        q_i, k_i, v_i = query[:, :, i], key[:, :, i], value[:, :, i]
        a = (q_i @ k_i.transpose(-1, -2) * decay_mask[:, :, i]).masked_fill(smask, 0)
        v_new = v_i - k_cumdecay[:, :, i] @ S
        outs.append((q_i * g[:, :, i, :, None].exp()) @ S + a @ v_new)
        S = S * g[:, :, i, -1, None, None].exp() + (k_i * (g[:, :, i, -1, None] - g[:, :, i]).exp()[..., None]).transpose(-1, -2) @ v_new
    o = torch.stack(outs, 2).reshape(B, Hh, TT, Dv)[:, :, :T].transpose(1, 2).contiguous().to(initial_dtype)
    return o, (S if output_final_state else None)


class MTPHead(torch.nn.Module):
    """As /work/shared/refgen/make_fixtures.py (official mtp.* layout)."""
    def __init__(self, config, full_idx):
        super().__init__()
        H = config.hidden_size
        self.fc = torch.nn.Linear(2 * H, H, bias=False)
        self.pre_fc_norm_embedding = mq.Qwen3_5RMSNorm(H, eps=config.rms_norm_eps)
        self.pre_fc_norm_hidden = mq.Qwen3_5RMSNorm(H, eps=config.rms_norm_eps)
        self.layers = torch.nn.ModuleList([mq.Qwen3_5DecoderLayer(config, full_idx)])
        self.norm = mq.Qwen3_5RMSNorm(H, eps=config.rms_norm_eps)


def make_config(vocab, eos, pad, overrides=None):
    kw = dict(MODEL, **(overrides or {}))
    n = kw["num_hidden_layers"]
    lt = ["linear_attention" if (i + 1) % FULL_ATTENTION_INTERVAL else "full_attention" for i in range(n)]
    rope = {"rope_type": "default", "rope_theta": 10000000.0, "partial_rotary_factor": 0.25,
            "mrope_section": [3, 3, 2], "mrope_interleaved": True}
    cfg = Qwen3_5TextConfig(vocab_size=vocab, layer_types=lt, tie_word_embeddings=True, rope_parameters=rope,
                            max_position_embeddings=4096, bos_token_id=None, eos_token_id=eos, pad_token_id=pad, **kw)
    cfg._attn_implementation = "sdpa"
    cfg.architectures = ["Qwen3_5ForCausalLM"]
    return cfg, lt


def build(cfg, lt, seed=1234):
    torch.manual_seed(seed)
    model = Qwen3_5ForCausalLM(cfg).float()
    mtp = MTPHead(cfg, lt.index("full_attention")).float()
    for m in mtp.modules():                      # same init as the main model
        model._init_weights(m)
    model.lm_head.weight = model.model.embed_tokens.weight
    for layer in model.model.layers:
        if hasattr(layer, "linear_attn"):
            layer.linear_attn.chunk_gated_delta_rule = fast_chunk_gated_delta_rule
    return model, mtp


def forward_losses(model, mtp, ids, causal):
    """ids [B, T+1] -> (main CE, mtp CE) averaged over tokens."""
    x, y = ids[:, :-1], ids[:, 1:]
    B, T = x.shape
    h = model.model(input_ids=x, use_cache=False).last_hidden_state          # post final norm
    logits = model.lm_head(h)
    main = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))
    # MTP: position i (0..T-2) uses h_i and token x[i+1] (= y[i]) and predicts x[i+2] (= y[i+1])
    hm = h[:, :-1]
    emb = model.model.embed_tokens(x[:, 1:])
    z = mtp.fc(torch.cat([mtp.pre_fc_norm_embedding(emb), mtp.pre_fc_norm_hidden(hm)], dim=-1))
    Tm = z.shape[1]
    pos = torch.arange(Tm)[None].expand(B, -1)
    pe = model.model.rotary_emb(z, pos)
    out = mtp.layers[0](z, position_embeddings=pe, attention_mask=causal[:, :, :Tm, :Tm], position_ids=pos, past_key_values=None)
    if isinstance(out, tuple):
        out = out[0]
    ml = model.lm_head(mtp.norm(out))
    mtpl = F.cross_entropy(ml.reshape(-1, ml.shape[-1]).float(), y[:, 1:].reshape(-1))
    return main, mtpl


def lr_at(step, a):
    if step < a.warmup:
        return a.lr * (step + 1) / a.warmup
    d0 = int(a.steps * (1 - a.decay_frac))
    if step < d0:
        return a.lr
    return a.lr * max(0.0, 1 - (step - d0) / max(1, a.steps - d0)) * 0.95 + a.lr * 0.05 * (step < a.steps)


@torch.no_grad()
def evaluate(model, mtp, data, T, causal, max_seqs=None, bs=8):
    model.eval(); mtp.eval()
    n = (len(data) - 1) // T
    if max_seqs:
        n = min(n, max_seqs)
    tm = tt = 0.0
    for s in range(0, n, bs):
        rows = [torch.from_numpy(data[i * T:i * T + T + 1].astype(np.int64)) for i in range(s, min(n, s + bs))]
        ids = torch.stack(rows)
        m, t = forward_losses(model, mtp, ids, causal)
        tm += m.item() * len(rows); tt += t.item() * len(rows)
    model.train(); mtp.train()
    return tm / n, tt / n


def check():
    cfg, lt = make_config(256, 0, 0)
    torch.manual_seed(0)
    B, T, Hh, D = 2, 200, 4, 32
    q, k, v = (torch.randn(B, T, Hh, D) for _ in range(3))
    g = -torch.rand(B, T, Hh) * 0.5
    beta = torch.rand(B, T, Hh)
    s0 = torch.randn(B, Hh, D, D) * 0.1
    o1, s1 = mq.torch_chunk_gated_delta_rule(q, k, v, g, beta, initial_state=s0, output_final_state=True, use_qk_l2norm_in_kernel=True)
    o2, s2 = fast_chunk_gated_delta_rule(q, k, v, g, beta, initial_state=s0, output_final_state=True, use_qk_l2norm_in_kernel=True)
    o3, s3 = mq.torch_recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=s0, output_final_state=True, use_qk_l2norm_in_kernel=True)
    print("max|fast-hf_chunk| out %.2e state %.2e ; max|fast-recurrent| out %.2e" % (
        (o1 - o2).abs().max(), (s1 - s2).abs().max(), (o3 - o2).abs().max()))


def export(a, model, mtp, cfg, tokdir):
    from safetensors.torch import save_file
    hf = os.path.join(a.out, "hf")
    os.makedirs(hf, exist_ok=True)
    model.save_pretrained(hf, safe_serialization=True)
    from safetensors.torch import load_file
    st = load_file(os.path.join(hf, "model.safetensors"))
    for k, v in mtp.state_dict().items():
        st["mtp." + k] = v.contiguous()
    st = {k: v.to(torch.bfloat16).contiguous() for k, v in st.items()}
    save_file(st, os.path.join(hf, "model.safetensors"), metadata={"format": "pt"})
    c = json.load(open(os.path.join(hf, "config.json")))
    c["mtp_num_hidden_layers"] = 1
    c["mtp_use_dedicated_embeddings"] = False
    c["dtype"] = "bfloat16"
    json.dump(c, open(os.path.join(hf, "config.json"), "w"), indent=2)
    from transformers import AutoTokenizer
    AutoTokenizer.from_pretrained(tokdir).save_pretrained(hf)
    print("exported", hf)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="/tmp/train/data")
    ap.add_argument("--out", default="/tmp/train/run")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--decay-frac", type=float, default=0.25)
    ap.add_argument("--wd", type=float, default=0.1)
    ap.add_argument("--mtp-lambda", type=float, default=0.5)
    ap.add_argument("--ckpt-every", type=float, default=180)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--model", type=json.loads, default={},
                    help='JSON object overriding entries of MODEL, e.g. \'{"hidden_size": 384}\' (give it again on resume and export)')
    ap.add_argument("--pilot", type=float, default=0, help="run this many seconds from scratch, report tok/s, save nothing")
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--export", action="store_true", help="write OUT/hf from OUT/ckpt.pt and evaluate")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads; on the 2-core build machine 2 ran 1.5x faster than 1 when it was otherwise idle, "
                         "and 2-3x slower when other work loaded it")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.check:
        return check()
    from transformers import AutoTokenizer
    tokdir = os.path.join(a.data, "tok")
    tok = AutoTokenizer.from_pretrained(tokdir)
    vocab = (len(tok) + 63) // 64 * 64
    cfg, lt = make_config(vocab, tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>"), a.model)
    model, mtp = build(cfg, lt)
    params = [p for p in list(model.parameters()) + list(mtp.parameters())]
    nparam = sum(p.numel() for p in {id(p): p for p in params}.values())
    decay = [p for p in params if p.dim() >= 2]
    nodecay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": a.wd}, {"params": nodecay, "weight_decay": 0.0}],
                            lr=a.lr, betas=(0.9, 0.95), eps=1e-8)
    train = np.fromfile(os.path.join(a.data, "train.bin"), dtype=np.uint16)
    val = np.fromfile(os.path.join(a.data, "val.bin"), dtype=np.uint16)
    T = a.seq
    causal = torch.full((T + 1, T + 1), float("-inf")).triu(1)[None, None]
    os.makedirs(a.out, exist_ok=True)
    ck = os.path.join(a.out, "ckpt.pt")
    logf = os.path.join(a.out, "log.jsonl")
    step, elapsed = 0, 0.0
    gen = torch.Generator().manual_seed(42)
    if os.path.exists(ck) and not a.pilot:
        s = torch.load(ck, weights_only=False)
        model.load_state_dict(s["model"]); mtp.load_state_dict(s["mtp"]); opt.load_state_dict(s["opt"])
        model.lm_head.weight = model.model.embed_tokens.weight
        step, elapsed = s["step"], s["elapsed"]
        gen.set_state(s["gen"])
        print("resumed at step", step, "elapsed %.0fs" % elapsed, flush=True)
    if a.export:
        export(a, model, mtp, cfg, tokdir)
        m, t = evaluate(model, mtp, val, T, causal)
        r = {"val_main_loss": m, "val_ppl": math.exp(m), "val_mtp_loss": t, "val_mtp_ppl": math.exp(t),
             "val_tokens": int(len(val)), "step": step, "elapsed_s": elapsed, "params": nparam}
        json.dump(r, open(os.path.join(a.out, "final_eval.json"), "w"), indent=1)
        print(r)
        return
    print("params %.2fM (incl. MTP head), vocab %d, train tokens %d, val tokens %d" % (nparam / 1e6, vocab, len(train), len(val)), flush=True)

    def save():
        if a.pilot:
            return
        tmp = ck + ".tmp"
        torch.save({"model": model.state_dict(), "mtp": mtp.state_dict(), "opt": opt.state_dict(), "step": step,
                    "elapsed": elapsed, "gen": gen.get_state(), "args": vars(a)}, tmp)
        os.replace(tmp, ck)

    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
    model.train(); mtp.train()
    t_start = time.time(); last_ck = time.time(); t_last = time.time()
    acc = [0.0, 0.0, 0]
    while step < a.steps and not stop["now"]:
        for gr in opt.param_groups:
            gr["lr"] = lr_at(step, a)
        offs = torch.randint(0, len(train) - T - 1, (a.batch,), generator=gen)
        ids = torch.stack([torch.from_numpy(train[o:o + T + 1].astype(np.int64)) for o in offs.tolist()])
        m, t = forward_losses(model, mtp, ids, causal)
        loss = m + a.mtp_lambda * t
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        now = time.time()
        dt = now - t_last
        t_last = now
        elapsed += min(dt, 60)       # a step takes seconds: longer gaps are pauses (SIGSTOP), not counted
        acc[0] += m.item(); acc[1] += t.item(); acc[2] += 1
        if step % 10 == 0 or step == 1:
            rec = {"step": step, "loss": acc[0] / acc[2], "mtp_loss": acc[1] / acc[2], "lr": lr_at(step - 1, a),
                   "gnorm": float(gn), "elapsed": round(elapsed, 1), "tok_s": round(a.batch * T / dt, 1)}
            acc = [0.0, 0.0, 0]
            if a.eval_every and step % a.eval_every == 0:
                vm, vt = evaluate(model, mtp, val, T, causal, max_seqs=32)
                rec.update(val_loss=vm, val_mtp_loss=vt)
            print(json.dumps(rec), flush=True)
            if not a.pilot:
                open(logf, "a").write(json.dumps(rec) + "\n")
        if a.pilot and now - t_start > a.pilot:
            print("pilot: %d steps in %.1fs = %.1f tok/s" % (step, now - t_start, step * a.batch * T / (now - t_start)))
            return
        if now - last_ck > a.ckpt_every:
            save(); last_ck = time.time()
    save()
    print("stopped" if stop["now"] else "done", "at step", step, flush=True)


if __name__ == "__main__":
    main()
