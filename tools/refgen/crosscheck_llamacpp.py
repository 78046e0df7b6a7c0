#!/usr/bin/env python3
"""Independent check of the ref2 references of the quantised files: llama.cpp's own logits
(`llama-debug --save-logits`, last position of a prompt prefix) on each GGUF, compared with
ref2/{V}.short.logits.f32 (HF on the same dequantised weights) and with ref2/bf16.short.logits.f32.
If the GGUF -> HF mapping were wrong, llama.cpp on q4_k_m would not be closer to ref2/q4_k_m than
to ref2/bf16.  (llama.cpp itself computes bf16/q8_0/q4_K matmuls with quantised activations, so
expect differences of ~0.1..1 logit from HF even with the same weights.)  Development tool.

usage (inside the reference chroot): crosscheck_llamacpp.py FIXTURE_DIR [--prefixes 1,3,8,16,24,33]
"""
import argparse, json, os, subprocess, tempfile
import numpy as np


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("fixture")
    ap.add_argument("--prefixes", default="1,3,8,16,24,33")
    ap.add_argument("--variants", default="bf16,q8_0,q4_k_m")
    a = ap.parse_args()
    from transformers import AutoTokenizer
    fx = a.fixture.rstrip("/")
    tok = AutoTokenizer.from_pretrained(os.path.join(fx, "hf"))
    R = json.load(open(os.path.join(fx, "ref", "reference.json")))
    V = R["vocab_size"]
    ids = R["cases"]["short"]["prompt_ids"]
    print(f"{R['model']}: max-abs of last-position logits; columns: llama.cpp vs ref2/V | llama.cpp vs ref2/bf16 | ref2/V vs ref2/bf16")
    with tempfile.TemporaryDirectory() as td:
        for n in map(int, a.prefixes.split(",")):
            pf = os.path.join(td, "prompt.txt")
            open(pf, "w").write(tok.decode(ids[:n]))
            cols = [f"prefix {n:3d}"]
            for v in a.variants.split(","):
                od = os.path.join(td, v)
                r = subprocess.run(["llama-debug", "-m", os.path.join(fx, "gguf", f"model-{v}.gguf"), "-f", pf,
                                    "--save-logits", "--logits-output-dir", od, "-t", "1", "--no-warmup"],
                                   capture_output=True, text=True)
                if r.returncode != 0:
                    raise SystemExit(r.stderr[-3000:])
                base = os.path.join(od, f"llamacpp-model-{v}")
                toks = np.fromfile(base + "-tokens.bin", dtype=np.int32).tolist()
                if toks != ids[:len(toks)]:   # note: llama.cpp's -f drops a final newline
                    cols.append(f"{v}: tokenisation differs"); continue
                k = len(toks) - 1
                lc = np.fromfile(base + ".bin", dtype="<f4")
                same = np.fromfile(os.path.join(fx, "ref2", f"{v}.short.logits.f32"), dtype="<f4").reshape(-1, V)[k]
                bf = np.fromfile(os.path.join(fx, "ref2", "bf16.short.logits.f32"), dtype="<f4").reshape(-1, V)[k]
                cols.append(f"{v}@{k}: {np.abs(lc - same).max():.3f} | {np.abs(lc - bf).max():.3f} | {np.abs(same - bf).max():.3f}")
            print("  " + "   ".join(cols), flush=True)


if __name__ == "__main__":
    main()
