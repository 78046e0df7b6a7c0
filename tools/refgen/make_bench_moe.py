#!/usr/bin/env python3
"""A random-weight qwen35moe model for speed tests only: Qwen3.5-35B-A3B's per-layer shapes
(hidden 2048, 16 heads of 256 with 2 KV heads, 32 linear-attention value heads, experts of 512
with a shared expert of 512, top-8 routing, 248k vocabulary, MTP head) but 32 experts and
12 layers, so it fits this machine.  Converted by llama.cpp's converter and quantised.
Run inside the reference chroot (see /work/shared/refgen): make_bench_moe.py OUTDIR"""
import json, os, subprocess, sys, torch
sys.path.insert(0, "/refgen")
from make_fixtures import classes, MTPHead

out = sys.argv[1]
C, M, Layer, Norm, archname = classes("qwen3_5_moe")
n = 12
lt = ["linear_attention" if (i + 1) % 4 else "full_attention" for i in range(n)]
config = C(vocab_size=248320, layer_types=lt, tie_word_embeddings=False, max_position_embeddings=262144,
           hidden_size=2048, num_hidden_layers=n, num_attention_heads=16, num_key_value_heads=2, head_dim=256,
           linear_num_key_heads=16, linear_num_value_heads=32, linear_key_head_dim=128, linear_value_head_dim=128,
           linear_conv_kernel_dim=4, num_experts=32, num_experts_per_tok=8, moe_intermediate_size=512,
           shared_expert_intermediate_size=512,
           rope_parameters={"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25,
                            "mrope_section": [11, 11, 10], "mrope_interleaved": True},
           eos_token_id=151645, pad_token_id=151643)
config.architectures = [archname]
torch.manual_seed(0)
with torch.device("cpu"):
    model = M(config).to(torch.bfloat16)
mtp = MTPHead(config, Layer, Norm, lt.index("full_attention")).to(torch.bfloat16)
hf = os.path.join(out, "qwen35moe-bench", "hf")
os.makedirs(hf, exist_ok=True)
model.save_pretrained(hf, safe_serialization=True)
from safetensors.torch import save_file
save_file({"mtp." + k: v.contiguous() for k, v in mtp.state_dict().items()}, os.path.join(hf, "mtp.safetensors"), metadata={"format": "pt"})
idx = os.path.join(hf, "model.safetensors.index.json")
if os.path.exists(idx):
    j = json.load(open(idx))
else:
    from safetensors import safe_open
    with safe_open(os.path.join(hf, "model.safetensors"), "pt") as f:
        j = {"metadata": {}, "weight_map": {k: "model.safetensors" for k in f.keys()}}
for k in mtp.state_dict():
    j["weight_map"]["mtp." + k] = "mtp.safetensors"
json.dump(j, open(idx, "w"))
cfg = json.load(open(os.path.join(hf, "config.json")))
cfg["mtp_num_hidden_layers"] = 1
json.dump(cfg, open(os.path.join(hf, "config.json"), "w"), indent=1)
for f in ("tokenizer.json", "tokenizer_config.json"):
    subprocess.run(["cp", "/refgen/qwen3tok/" + f, hf], check=True)
gg = os.path.join(out, "qwen35moe-bench")
bf = os.path.join(gg, "model-bf16.gguf")
subprocess.run([sys.executable, "/refgen/convert_wrap.py", "/usr/share/doc/llama.cpp-tools/scripts/convert_hf_to_gguf.py", hf,
                "--outtype", "bf16", "--outfile", bf], check=True, capture_output=True)
for q in ("Q8_0", "Q4_K_M"):
    subprocess.run(["llama-quantize", bf, os.path.join(gg, f"model-{q.lower()}.gguf"), q], check=True, capture_output=True)
print("done", os.listdir(gg))
