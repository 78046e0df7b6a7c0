#!/usr/bin/env python3
"""Second set of reference outputs for the mtp-gen fixtures ("ref2"), made with Hugging Face
transformers through the *recurrent* gated-delta-rule path, for the bf16 weights and for the
dequantised weights of the quantised GGUF files.  Development tool: never run by the build or CI.
See README.md next to this file.

usage (inside the reference chroot, see tests/fixtures/README.md):
    python3 make_ref2.py FIXTURE_DIR [--out DIR] [--variants bf16,q8_0,q4_k_m] [--threads N]
            [--save-hidden] [--no-check-chunked]

FIXTURE_DIR is one model folder (tests/fixtures/qwen35-dense etc.) with hf/, gguf/, ref/.
Writes into DIR (default FIXTURE_DIR/ref2), for each variant V and prompt case C (short, long,
prompt_ids from ref/reference.json):
    V.C.logits.f32      [n_prompt][vocab]   main-model logits, prompt fed one token at a time
                                           through the cache (recurrent path for every token)
    V.C.mtp_logits.f32  [n_prompt-1][vocab] teacher-forced MTP-head logits (as ref/), computed
                                           from the post-final-norm hidden states of that run
    V.C.greedy.json     24 greedy tokens continuing the prompt (bf16: both cases; quantised
                        variants: short only), with the top-2 margin of every step
    V.C.hidden_post.f32 [n_prompt][hidden]  only with --save-hidden
    ref2.json           metadata: shapes, ggml types, mapping check, comparisons
All float32 little-endian, row-major.
V = bf16: the HF checkpoint's own weights (bf16 values, float32 compute).
V = q8_0 / q4_k_m: every weight replaced by the dequantised tensor of gguf/model-V.gguf mapped back
to the HF parameter (gguf_to_hf.py); the F32 norm weights (+1 folded in by the converter) and
ssm_a (= -exp(A_log)) are kept from HF after checking the GGUF holds exactly the same values as
in the bf16 GGUF.  Before anything else the mapping is checked on gguf/model-bf16.gguf: it must
reproduce every HF and MTP parameter bit for bit.

RoPE: the model is loaded with from_pretrained(dtype=float32), so the rotary inv_freq is the exact
float32 1/theta^(2i/d).  ref/ (make_fixtures.py) was computed with inv_freq rounded to bf16 (its
model.to(bfloat16).save_pretrained(); model.float() round trip also casts that buffer); the
diagnostics in ref2.json ("checks") show this, and that it, not chunked-vs-recurrent, is most of
the difference between ref/ and ref2/.
"""
import argparse, json, os, sys
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gguf_to_hf as G  # noqa: E402

N_GREEDY = 24


# ---------------------------------------------------------------- model + MTP head
def arch_classes(model_type):
    if model_type == "qwen3_5_text":
        from transformers.models.qwen3_5 import modeling_qwen3_5 as mod
        return mod.Qwen3_5DecoderLayer, mod.Qwen3_5RMSNorm
    if model_type == "qwen3_5_moe_text":
        from transformers.models.qwen3_5_moe import modeling_qwen3_5_moe as mod
        return mod.Qwen3_5MoeDecoderLayer, mod.Qwen3_5MoeRMSNorm
    if model_type == "qwen3_next":
        from transformers.models.qwen3_next import modeling_qwen3_next as mod
        return mod.Qwen3NextDecoderLayer, mod.Qwen3NextRMSNorm
    raise ValueError(model_type)


class MTPHead(torch.nn.Module):
    """Same module as tests/fixtures/../refgen/make_fixtures.py (official mtp.* layout)."""
    def __init__(self, config, Layer, Norm, full_idx):
        super().__init__()
        H = config.hidden_size
        self.fc = torch.nn.Linear(2 * H, H, bias=False)
        self.pre_fc_norm_embedding = Norm(H, eps=config.rms_norm_eps)
        self.pre_fc_norm_hidden = Norm(H, eps=config.rms_norm_eps)
        self.layers = torch.nn.ModuleList([Layer(config, full_idx)])
        self.norm = Norm(H, eps=config.rms_norm_eps)


def mtp_forward(model, mtp, hidden, next_ids, rotary, positions):
    """Teacher-forced MTP over a sequence (verbatim from make_fixtures.py): hidden [T,H] is the
    post-final-norm main-model output at i, next_ids [T] the token at i+1."""
    emb = model.model.embed_tokens(next_ids[None])
    x = mtp.fc(torch.cat([mtp.pre_fc_norm_embedding(emb), mtp.pre_fc_norm_hidden(hidden[None])], dim=-1))
    T = x.shape[1]
    pos = positions[None]
    pe = rotary(x, pos)
    mask = torch.full((T, T), float("-inf")).triu(1)[None, None]
    layer = mtp.layers[0]
    out = layer(x, position_embeddings=pe, attention_mask=mask, position_ids=pos, past_key_values=None)
    if isinstance(out, tuple):
        out = out[0]
    return model.lm_head(mtp.norm(out))[0]


def load(fixture):
    from transformers import AutoModelForCausalLM
    from safetensors.torch import load_file
    hf = os.path.join(fixture, "hf")
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32, attn_implementation="eager").eval()
    cfg = model.config
    Layer, Norm = arch_classes(cfg.model_type)
    full_idx = cfg.layer_types.index("full_attention")
    mtp = MTPHead(cfg, Layer, Norm, full_idx).float().eval()
    st = load_file(os.path.join(hf, "model.safetensors"))
    msd = {k[4:]: v.float() for k, v in st.items() if k.startswith("mtp.")}
    mtp.load_state_dict(msd, strict=True)
    return model, mtp


class RopeInvFreq:
    """Context manager: run with the rotary inv_freq as computed (f32) or rounded to bf16 (as ref/)."""
    def __init__(self, model, mode):
        self.re, self.mode = model.model.rotary_emb, mode

    def __enter__(self):
        self.saved = self.re.inv_freq
        if self.mode == "bf16":
            self.re.inv_freq = self.saved.to(torch.bfloat16).float()
        return self

    def __exit__(self, *a):
        self.re.inv_freq = self.saved


class Recurrent:
    """Context manager: route HF's chunked gated-delta-rule (used for the first token of an empty
    cache and for multi-token calls) to its per-token recurrence, so every position of the
    token-by-token run goes through the same recurrent update as cached decoding."""
    def __init__(self, model, on=True):
        self.mods = [m for m in model.modules() if hasattr(m, "chunk_gated_delta_rule")]
        self.on = on

    def __enter__(self):
        self.saved = [m.chunk_gated_delta_rule for m in self.mods]
        if self.on:
            for m in self.mods:
                rec = m.recurrent_gated_delta_rule

                def f(query, key, value, g, beta, initial_state=None, output_final_state=False,
                      use_qk_l2norm_in_kernel=False, _rec=rec, **kw):
                    return _rec(query, key, value, g, beta, initial_state, output_final_state,
                                use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel)
                m.chunk_gated_delta_rule = f
        return self

    def __exit__(self, *a):
        for m, s in zip(self.mods, self.saved):
            m.chunk_gated_delta_rule = s


# ---------------------------------------------------------------- runs
def step_run(model, ids, n_greedy=0):
    """Feed ids one at a time through the cache. Returns (logits [T,V], post-norm hidden [T,H],
    greedy steps).  Greedy continues from the same cache: step j picks argmax of the current
    logits and feeds it."""
    cap = []
    h = model.model.norm.register_forward_hook(lambda m, i, o: cap.append(o.detach()[0, -1].clone()))
    logits, past = [], None
    greedy = []
    try:
        with torch.no_grad():
            for t in ids:
                o = model(torch.tensor([[t]]), past_key_values=past, use_cache=True)
                past = o.past_key_values
                logits.append(o.logits[0, -1].float().clone())
            hidden = torch.stack(cap)
            cur = logits[-1]
            for j in range(n_greedy):
                top = torch.topk(cur, 2)
                tok = int(top.indices[0])
                greedy.append({"token": tok, "logit": float(top.values[0]),
                               "second": int(top.indices[1]), "second_logit": float(top.values[1]),
                               "margin": float(top.values[0] - top.values[1])})
                if j + 1 < n_greedy:
                    o = model(torch.tensor([[tok]]), past_key_values=past, use_cache=True)
                    past = o.past_key_values
                    cur = o.logits[0, -1].float()
    finally:
        h.remove()
    return torch.stack(logits), hidden, greedy


def chunked_run(model, ids):
    """HF's chunked prefill over the whole prompt (how ref/ was made): (post-norm hidden, logits)."""
    cap = {}
    h = model.model.norm.register_forward_hook(lambda m, i, o: cap.update(post=o.detach()))
    try:
        with torch.no_grad():
            l = model(torch.tensor([ids]), use_cache=False).logits[0].float()
    finally:
        h.remove()
    return cap["post"][0].float(), l


def hf_generate(model, ids, pad):
    """HF generate exactly as make_fixtures.py (chunked prefill, cached decode)."""
    with torch.no_grad():
        g = model.generate(torch.tensor([ids]), max_new_tokens=N_GREEDY, do_sample=False, use_cache=True,
                           eos_token_id=None, pad_token_id=pad)
    return g[0, len(ids):].tolist()


def mtp_run(model, mtp, hidden, ids):
    ids_t = torch.tensor(ids)
    with torch.no_grad():
        return mtp_forward(model, mtp, hidden[:-1], ids_t[1:], model.model.rotary_emb,
                           torch.arange(len(ids) - 1)).float()


def save_f32(path, t):
    a = np.ascontiguousarray(t.detach().to(torch.float32).numpy()).astype("<f4", copy=False)
    a.tofile(path)


def load_f32(path, ncol):
    return torch.from_numpy(np.fromfile(path, dtype="<f4").reshape(-1, ncol))


def stats(a, b):
    return {"max_abs": float((a - b).abs().max()), "argmax_agree": int((a.argmax(-1) == b.argmax(-1)).sum()),
            "rows": int(a.shape[0])}


# ---------------------------------------------------------------- main
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("fixture")
    ap.add_argument("--out")
    ap.add_argument("--variants", default="bf16,q8_0,q4_k_m")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--save-hidden", action="store_true",
                    help="also write V.C.hidden_post.f32 [n_prompt][hidden] (post-final-norm, the MTP input)")
    ap.add_argument("--no-check-chunked", action="store_true",
                    help="skip the sanity runs (chunked forward vs ref/, first-token patch effect)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    fx = a.fixture.rstrip("/")
    out = a.out or os.path.join(fx, "ref2")
    os.makedirs(out, exist_ok=True)
    R = json.load(open(os.path.join(fx, "ref", "reference.json")))
    V = R["vocab_size"]
    cases = {k: v["prompt_ids"] for k, v in R["cases"].items()}

    model, mtp = load(fx)
    cfg = model.config
    hf_main = {k: v.detach().clone() for k, v in model.state_dict().items()}
    hf_mtp = {k: v.detach().clone() for k, v in mtp.state_dict().items()}
    meta = {"model": R["model"], "model_type": cfg.model_type, "vocab_size": V, "hidden_size": cfg.hidden_size,
            "n_greedy": N_GREEDY, "torch_threads": a.threads, "attn_implementation": "eager",
            "cases": {k: {"n_prompt": len(v)} for k, v in cases.items()}, "variants": {}, "checks": {}}

    # 0. diagnostics against ref/ (HF chunked prefill, model(ids, use_cache=False)).  make_fixtures.py
    # computed ref/ after model.to(bfloat16).save_pretrained(); model.float(), which also rounded
    # the rotary embedding's inv_freq buffer to bf16.  Reproduce that, and measure the pieces.
    chunked = {}
    if not a.no_check_chunked:
        for c, ids in cases.items():
            ref_l = load_f32(os.path.join(fx, "ref", f"{c}.logits.f32"), V)
            ref_h = load_f32(os.path.join(fx, "ref", f"{c}.hidden_post.f32"), cfg.hidden_size)
            ref_m = load_f32(os.path.join(fx, "ref", f"{c}.mtp_logits.f32"), V)
            ck = {}
            for rope in ("f32", "bf16"):
                with RopeInvFreq(model, rope):
                    h, l = chunked_run(model, ids)
                    ck[f"chunked_{rope}rope_vs_ref"] = stats(l, ref_l)
                    ck[f"mtp_of_ref_hidden_{rope}rope_vs_ref"] = stats(mtp_run(model, mtp, ref_h, ids), ref_m)
                    if rope == "f32":
                        chunked[c] = (l, mtp_run(model, mtp, h, ids))
            meta["checks"][c] = ck
            print(c, json.dumps(ck), flush=True)

    # 1. mapping check on the bf16 GGUF: must reproduce HF exactly
    arch, g_main, g_mtp, types, src = G.gguf_to_hf(os.path.join(fx, "gguf", "model-bf16.gguf"), cfg)
    fails = G.check_against(hf_main, hf_mtp, g_main, g_mtp, src)
    if fails:
        print("\n".join(fails))
        raise SystemExit("bf16 GGUF does not map back onto the HF weights exactly")
    inv = G.invertible(hf_main, hf_mtp, g_main, g_mtp)
    meta["checks"]["bf16_gguf_mapping"] = {
        "gguf_arch": arch, "exact": True,
        "n_params_main": len(hf_main), "n_params_mtp": len(hf_mtp),
        "plus1_negexp_naively_invertible": all(inv.values()),
        "not_invertible": sorted(k for k, v in inv.items() if not v)}
    print(f"bf16 GGUF ({arch}) -> HF: all {len(hf_main)} + {len(hf_mtp)} parameters bitwise equal", flush=True)
    g_bf16 = (g_main, g_mtp)

    for var in a.variants.split(","):
        vm = {"files": []}
        if var == "bf16":
            new_main, new_mtp = hf_main, hf_mtp
            vm["weights"] = "hf/model.safetensors (bf16 values), identical to dequantised gguf/model-bf16.gguf"
        else:
            path = os.path.join(fx, "gguf", f"model-{var}.gguf")
            _, q_main, q_mtp, qtypes, qsrc = G.gguf_to_hf(path, cfg)
            new_main, new_mtp = {}, {}
            kept, tdiff = [], {}
            for tag, hf, q, gb, dst in (("main", hf_main, q_main, g_bf16[0], new_main),
                                        ("mtp", hf_mtp, q_mtp, g_bf16[1], new_mtp)):
                assert set(hf) == set(q), (tag, set(hf) ^ set(q))
                for k in hf:
                    if G.kind_of(k) != "exact":
                        # F32 in every file: must be the very same values as in the bf16 GGUF
                        assert G.bits_equal(q[k], gb[k]), f"{var}: {k} differs from the bf16 GGUF"
                        dst[k] = hf[k]
                        kept.append(f"{tag}:{k}")
                    else:
                        dst[k] = q[k]
                        tdiff[f"{tag}:{k}"] = {"type": qtypes[f"{tag}:{k}"],
                                               "max_abs_vs_bf16": float((q[k] - hf[k]).abs().max()),
                                               "rel_rms_err": float((q[k] - hf[k]).pow(2).mean().sqrt()
                                                                    / hf[k].pow(2).mean().sqrt())}
            vm["weights"] = f"dequantised gguf/model-{var}.gguf (gguf.quants.dequantize), mapped back by gguf_to_hf.py"
            vm["kept_from_hf"] = sorted(kept)
            vm["tensors"] = tdiff
        model.load_state_dict(new_main, strict=True)
        mtp.load_state_dict(new_mtp, strict=True)
        if cfg.tie_word_embeddings:
            assert model.lm_head.weight is model.model.embed_tokens.weight

        for c, ids in cases.items():
            want_greedy = var == "bf16" or c == "short"
            with Recurrent(model, True):
                logits, hidden, greedy = step_run(model, ids, N_GREEDY if want_greedy else 0)
            mlog = mtp_run(model, mtp, hidden, ids)
            assert logits.shape == (len(ids), V) and mlog.shape == (len(ids) - 1, V)
            save_f32(os.path.join(out, f"{var}.{c}.logits.f32"), logits)
            save_f32(os.path.join(out, f"{var}.{c}.mtp_logits.f32"), mlog)
            vm["files"] += [f"{var}.{c}.logits.f32", f"{var}.{c}.mtp_logits.f32"]
            if a.save_hidden:
                save_f32(os.path.join(out, f"{var}.{c}.hidden_post.f32"), hidden)
                vm["files"].append(f"{var}.{c}.hidden_post.f32")
            cm = vm.setdefault("cases", {}).setdefault(c, {})
            ref_l = load_f32(os.path.join(fx, "ref", f"{c}.logits.f32"), V)
            ref_m = load_f32(os.path.join(fx, "ref", f"{c}.mtp_logits.f32"), V)
            cm["logits_vs_ref_chunked"] = stats(logits, ref_l)
            cm["mtp_logits_vs_ref_chunked"] = stats(mlog, ref_m)
            if var != "bf16":
                b_l = load_f32(os.path.join(out, f"bf16.{c}.logits.f32"), V)
                b_m = load_f32(os.path.join(out, f"bf16.{c}.mtp_logits.f32"), V)
                cm["logits_vs_bf16_recurrent"] = stats(logits, b_l)
                cm["mtp_logits_vs_bf16_recurrent"] = stats(mlog, b_m)
            elif not a.no_check_chunked:
                cm["logits_vs_hf_chunked_same_rope"] = stats(logits, chunked[c][0])
                cm["mtp_logits_vs_hf_chunked_same_rope"] = stats(mlog, chunked[c][1])
                # effect of also routing the very first token through the recurrence (instead of
                # HF's 1-token chunked call on an empty cache, as a plain token-by-token loop does)
                with Recurrent(model, False):
                    l2, _, _ = step_run(model, ids, 0)
                cm["unpatched_first_token_vs_patched"] = stats(l2, logits)
            print(var, c, json.dumps(cm), flush=True)
            if want_greedy:
                gen = hf_generate(model, ids, cfg.pad_token_id)
                ids_g = [s["token"] for s in greedy]
                ref_g = R["cases"][c]["greedy_ids"]
                gj = {"variant": var, "case": c, "prompt_len": len(ids),
                      "greedy_ids": ids_g,
                      "margins": [s["margin"] for s in greedy],
                      "steps": greedy,
                      "min_margin": min(s["margin"] for s in greedy),
                      "equals_reference_json": ids_g == ref_g,
                      "hf_generate_ids": gen,
                      "hf_generate_equals_reference_json": gen == ref_g,
                      "hf_generate_equals_greedy_ids": gen == ids_g,
                      "reference_json_greedy_ids": ref_g,
                      "how": "prompt fed token by token through the cache (recurrent path for every token), "
                             "then argmax decoding from the same cache; top-2 margin = logit[1st] - logit[2nd] "
                             "of the logits the token was picked from. hf_generate_ids: HF generate "
                             "(do_sample=False, eos_token_id=None; chunked prefill, cached decode) as make_fixtures.py"}
                fn = f"{var}.{c}.greedy.json"
                json.dump(gj, open(os.path.join(out, fn), "w"), indent=1)
                vm["files"].append(fn)
                print(var, c, "greedy", ids_g, "== reference.json:", gj["equals_reference_json"],
                      "| hf generate == reference.json:", gj["hf_generate_equals_reference_json"],
                      "| min margin %.4f" % gj["min_margin"], flush=True)
        meta["variants"][var] = vm
        json.dump(meta, open(os.path.join(out, "ref2.json"), "w"), indent=1)
    # restore the HF weights (in case this is used as a module)
    model.load_state_dict(hf_main, strict=True)
    mtp.load_state_dict(hf_mtp, strict=True)
    print("wrote", out)


if __name__ == "__main__":
    main()
