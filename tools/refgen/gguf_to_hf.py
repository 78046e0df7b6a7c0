#!/usr/bin/env python3
"""Map the tensors of a llama.cpp GGUF (qwen35 / qwen35moe / qwen3next, with the MTP block)
back onto the parameters of the Hugging Face model, undoing the transforms of llama.cpp's
converter (conversion/qwen.py: Qwen3NextModel, _LinearAttentionVReorderBase, Qwen3_5TextModel,
Qwen3_5MoeTextModel, Qwen2MoeModel, _QwenMtpMixin).  Development tool for mtp-gen.

Result: two dicts of float32 torch tensors keyed by the names of the *in-memory* HF modules
(transformers 5: MoE experts fused as `mlp.experts.gate_up_proj` [E, 2*F, H] (gate rows first)
and `mlp.experts.down_proj` [E, H, F]):
  main: names of `model.state_dict()` of the *ForCausalLM model
  mtp:  names of the MTP head module (fc, pre_fc_norm_embedding, pre_fc_norm_hidden, layers.0.*, norm),
        i.e. the checkpoint's `mtp.*` names without the `mtp.` prefix.

Transforms undone (HF -> GGUF direction in brackets):
  * every `*norm.weight` except `linear_attn.norm.weight`, and the MTP head's
    `pre_fc_norm_embedding` / `pre_fc_norm_hidden` [w + 1, F32]                     -> kind "plus1"
  * `linear_attn.A_log` -> `ssm_a` [-exp(A_log), F32]                              -> kind "negexp"
    (these two are not bit-invertible in general: callers keep HF's own values and
    check the GGUF value equals the forward transform of them, see verify_*)
  * `dt_bias` -> `ssm_dt.bias`; `conv1d.weight` [C,1,K] -> [C,K] (squeeze)
  * qwen35/qwen35moe only: value heads reordered from grouped-by-key-head to tiled order
    ([nk, r, d] -> [r, nk, d]) in in_proj_qkv's v rows, in_proj_z rows, in_proj_a/b rows,
    A_log, dt_bias, conv1d v channels and out_proj columns
  * qwen3next only: in_proj_qkvz (rows per key head [q k v z]) -> attn_qkv ([q.. k.. v..]) +
    attn_gate (z..); in_proj_ba is stored unchanged as ssm_ba (rows per key head [b.. a..])
  * MoE experts stacked per layer: ffn_{gate,up,down}_exps [E, out, in]
  * shared_expert_gate [1, H] -> ffn_gate_inp_shexp ([H] in qwen35moe, [1, H] in qwen3next)
  * MTP: mtp.fc -> blk.N.nextn.eh_proj, pre_fc_norm_embedding -> nextn.enorm,
    pre_fc_norm_hidden -> nextn.hnorm, mtp.norm -> nextn.shared_head_norm,
    mtp.layers.0.* -> blk.N.* (N = num_hidden_layers)
  * tied embeddings (qwen35-dense): no output.weight; lm_head = token_embd
"""
import numpy as np
import torch
import gguf

GGUF_ARCHS = ("qwen35", "qwen35moe", "qwen3next")

# GGUF per-block suffix -> HF module suffix (inside a decoder layer)
_BLOCK = {
    "attn_norm.weight": "input_layernorm.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    # full attention
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    # linear attention (gated delta net)
    "ssm_a": "linear_attn.A_log",
    "ssm_dt.bias": "linear_attn.dt_bias",
    "ssm_conv1d.weight": "linear_attn.conv1d.weight",
    "ssm_norm.weight": "linear_attn.norm.weight",
    "ssm_out.weight": "linear_attn.out_proj.weight",
    "ssm_alpha.weight": "linear_attn.in_proj_a.weight",
    "ssm_beta.weight": "linear_attn.in_proj_b.weight",
    "ssm_ba.weight": "linear_attn.in_proj_ba.weight",
    "attn_qkv.weight": None,   # special (in_proj_qkv / in_proj_qkvz)
    "attn_gate.weight": None,  # special (in_proj_z / in_proj_qkvz)
    # dense FFN
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    # MoE
    "ffn_gate_inp.weight": "mlp.gate.weight",
    "ffn_gate_exps.weight": None,  # special (fused gate_up_proj)
    "ffn_up_exps.weight": None,
    "ffn_down_exps.weight": "mlp.experts.down_proj",
    "ffn_gate_shexp.weight": "mlp.shared_expert.gate_proj.weight",
    "ffn_up_shexp.weight": "mlp.shared_expert.up_proj.weight",
    "ffn_down_shexp.weight": "mlp.shared_expert.down_proj.weight",
    "ffn_gate_inp_shexp.weight": "mlp.shared_expert_gate.weight",
}
_NEXTN = {
    "nextn.eh_proj.weight": "fc.weight",
    "nextn.enorm.weight": "pre_fc_norm_embedding.weight",
    "nextn.hnorm.weight": "pre_fc_norm_hidden.weight",
    "nextn.shared_head_norm.weight": "norm.weight",
}


def kind_of(hf_name):
    """How the GGUF value relates to the HF value: 'plus1', 'negexp' or 'exact'."""
    if hf_name.endswith("A_log"):
        return "negexp"
    # the converter tests the *renamed* tensor: mtp.pre_fc_norm_{embedding,hidden} become
    # blk.N.{enorm,hnorm}.weight and so get the +1 too
    if (hf_name.endswith("norm.weight") and not hf_name.endswith("linear_attn.norm.weight")) or \
            hf_name in ("pre_fc_norm_embedding.weight", "pre_fc_norm_hidden.weight"):
        return "plus1"
    return "exact"


def forward_transform(hf_name, t):
    k = kind_of(hf_name)
    if k == "plus1":
        return t + 1
    if k == "negexp":
        return -torch.exp(t)
    return t


def _v_grouped_from_tiled(t, dim, nk, r, d):
    """Inverse of llama.cpp's _reorder_v_heads (grouped [nk, r, d] -> tiled [r, nk, d]) along dim."""
    shape = list(t.shape)
    if dim < 0:
        dim += len(shape)
    t = t.reshape(*shape[:dim], r, nk, d, *shape[dim + 1:])
    perm = list(range(t.dim()))
    perm[dim], perm[dim + 1] = perm[dim + 1], perm[dim]
    return t.permute(*perm).contiguous().reshape(*shape)


def read_gguf(path):
    """name -> (float32 numpy array in PyTorch dim order, ggml type name), plus arch and metadata."""
    r = gguf.GGUFReader(path)
    arch = bytes(r.fields["general.architecture"].parts[-1]).decode()
    out = {}
    for t in r.tensors:
        a = gguf.quants.dequantize(t.data, t.tensor_type)
        a = np.array(a, dtype=np.float32, copy=True)
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))  # ggml ne reversed = torch order
        out[t.name] = (a.reshape(shape), t.tensor_type.name)
    return arch, out


def gguf_to_hf(path, config):
    """Returns (arch, main, mtp, types, src) with main/mtp dicts of float32 tensors in HF layout.
    Values of kind plus1/negexp are the *GGUF* values (not inverted); see kind_of().
    types: hf key ('main:..'/'mtp:..') -> ggml type; src: hf key -> gguf tensor name."""
    arch, T = read_gguf(path)
    assert arch in GGUF_ARCHS, arch
    nl = config.num_hidden_layers
    nk, nv = config.linear_num_key_heads, config.linear_num_value_heads
    dk, dv = config.linear_key_head_dim, config.linear_value_head_dim
    r = nv // nk
    reorder = arch in ("qwen35", "qwen35moe") and nk != nv
    main, mtp, types, src = {}, {}, {}, {}
    used = set()

    def put(dst, key, val, gname):
        tag = ("main:" if dst is main else "mtp:") + key
        assert key not in dst, key
        dst[key] = torch.from_numpy(np.ascontiguousarray(val)).float()
        types[tag] = T[gname][1]
        src[tag] = gname
        used.add(gname)

    def get(name):
        return torch.from_numpy(T[name][0])

    # globals
    put(main, "model.embed_tokens.weight", T["token_embd.weight"][0], "token_embd.weight")
    put(main, "model.norm.weight", T["output_norm.weight"][0], "output_norm.weight")
    if "output.weight" in T:
        assert not config.tie_word_embeddings
        put(main, "lm_head.weight", T["output.weight"][0], "output.weight")
    else:
        assert config.tie_word_embeddings
        main["lm_head.weight"] = main["model.embed_tokens.weight"]
        types["main:lm_head.weight"] = types["main:model.embed_tokens.weight"]
        src["main:lm_head.weight"] = "token_embd.weight (tied)"

    n_blocks = 1 + max(int(n.split(".")[1]) for n in T if n.startswith("blk."))
    for b in range(n_blocks):
        is_mtp = b >= nl
        dst = mtp if is_mtp else main
        pre = f"layers.{b - nl}." if is_mtp else f"model.layers.{b}."
        bt = {n[len(f"blk.{b}."):]: n for n in T if n.startswith(f"blk.{b}.")}
        for suf, gname in bt.items():
            if suf in _NEXTN:
                assert is_mtp
                put(mtp, _NEXTN[suf], T[gname][0], gname)
                continue
            assert suf in _BLOCK, f"unmapped GGUF tensor {gname}"
            hf = _BLOCK[suf]
            if hf is None:
                continue
            t = get(gname)
            if suf in ("ssm_a", "ssm_dt.bias", "ssm_alpha.weight", "ssm_beta.weight") and reorder:
                t = _v_grouped_from_tiled(t, 0, nk, r, 1)
            elif suf == "ssm_out.weight" and reorder:
                t = _v_grouped_from_tiled(t, 1, nk, r, dv)
            elif suf == "ssm_conv1d.weight":
                if reorder:
                    qk = 2 * nk * dk
                    t = torch.cat([t[:qk], _v_grouped_from_tiled(t[qk:], 0, nk, r, dv)], 0)
                t = t.unsqueeze(1)  # [C, K] -> [C, 1, K]
            elif suf == "ffn_gate_inp_shexp.weight":
                t = t.reshape(1, -1)
            put(dst, pre + hf, t, gname)
        # linear attention projections
        if "attn_qkv.weight" in bt:
            qkv, z = get(bt["attn_qkv.weight"]), get(bt["attn_gate.weight"])
            qd = nk * dk
            q, k, v = qkv[:qd], qkv[qd:2 * qd], qkv[2 * qd:]
            if arch == "qwen3next":
                # HF in_proj_qkvz rows: for each key head h: [q_h (dk), k_h (dk), v_h (r*dv), z_h (r*dv)]
                H = qkv.shape[1]
                parts = [q.reshape(nk, dk, H), k.reshape(nk, dk, H), v.reshape(nk, r * dv, H), z.reshape(nk, r * dv, H)]
                w = torch.cat(parts, 1).reshape(-1, H)
                put(dst, pre + "linear_attn.in_proj_qkvz.weight", w, bt["attn_qkv.weight"])
                used.add(bt["attn_gate.weight"])
                types[("mtp:" if is_mtp else "main:") + pre + "linear_attn.in_proj_qkvz.weight"] = \
                    T[bt["attn_qkv.weight"]][1] + "(qkv)+" + T[bt["attn_gate.weight"]][1] + "(z)"
            else:
                if reorder:
                    v = _v_grouped_from_tiled(v, 0, nk, r, dv)
                    z = _v_grouped_from_tiled(z, 0, nk, r, dv)
                put(dst, pre + "linear_attn.in_proj_qkv.weight", torch.cat([q, k, v], 0), bt["attn_qkv.weight"])
                put(dst, pre + "linear_attn.in_proj_z.weight", z, bt["attn_gate.weight"])
        # MoE experts: HF fuses gate and up as gate_up_proj [E, 2F, H], gate first
        if "ffn_gate_exps.weight" in bt:
            g, u = get(bt["ffn_gate_exps.weight"]), get(bt["ffn_up_exps.weight"])
            put(dst, pre + "mlp.experts.gate_up_proj", torch.cat([g, u], 1), bt["ffn_gate_exps.weight"])
            used.add(bt["ffn_up_exps.weight"])
            types[("mtp:" if is_mtp else "main:") + pre + "mlp.experts.gate_up_proj"] = \
                T[bt["ffn_gate_exps.weight"]][1] + "+" + T[bt["ffn_up_exps.weight"]][1]
    unused = set(T) - used
    assert not unused, f"GGUF tensors not mapped: {sorted(unused)}"
    return arch, main, mtp, types, src


def bits_equal(a, b):
    return a.shape == b.shape and torch.equal(a.contiguous().view(torch.int32), b.contiguous().view(torch.int32))


def check_against(hf_main, hf_mtp, g_main, g_mtp, src):
    """Every HF parameter covered and bitwise equal (after the forward transform for plus1/negexp).
    Returns a list of failure strings (empty = exact)."""
    fails = []
    for tag, hf, g in (("main", hf_main, g_main), ("mtp", hf_mtp, g_mtp)):
        missing = set(hf) - set(g)
        extra = set(g) - set(hf)
        if missing:
            fails.append(f"{tag}: HF parameters not covered by GGUF: {sorted(missing)}")
        if extra:
            fails.append(f"{tag}: mapped names unknown to HF: {sorted(extra)}")
        for k in sorted(set(hf) & set(g)):
            want = forward_transform(k, hf[k].float())
            if not bits_equal(want, g[k]):
                d = (want - g[k]).abs().max().item() if want.shape == g[k].shape else f"shape {tuple(want.shape)} vs {tuple(g[k].shape)}"
                fails.append(f"{tag}:{k} <- {src[tag + ':' + k]} ({kind_of(k)}): not bitwise equal, max diff {d}")
    return fails


def invertible(hf_main, hf_mtp, g_main, g_mtp):
    """For plus1 / negexp parameters: does the naive inverse (g - 1, log(-g)) reproduce HF's bits?"""
    res = {}
    for hf, g in ((hf_main, g_main), (hf_mtp, g_mtp)):
        for k in hf:
            kk = kind_of(k)
            if kk == "plus1":
                res[k] = bits_equal(g[k] - 1, hf[k].float())
            elif kk == "negexp":
                res[k] = bits_equal(torch.log(-g[k]), hf[k].float())
    return res
