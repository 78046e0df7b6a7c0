#!/usr/bin/env python3
"""Print the comparison tables of tools/refgen/README.md from the ref2.json files written by
make_ref2.py.  usage: summarize_ref2.py FIXTURE_DIR [FIXTURE_DIR...]"""
import json, os, sys


def f(s):
    return f"{s['max_abs']:.3g} ({s['argmax_agree']}/{s['rows']})"


def main():
    metas = [json.load(open(os.path.join(d.rstrip("/"), "ref2", "ref2.json"))) for d in sys.argv[1:]]
    print("### ref/ (chunked prefill, bf16-rounded RoPE inv_freq) vs ref2 bf16 (recurrent, float32 inv_freq)")
    print("max-abs (argmax agreement / rows)\n")
    print("| model | case | logits: ref/ vs ref2 | MTP logits: ref/ vs ref2 | logits: HF chunked vs recurrent, same RoPE"
          " | MTP: chunked vs recurrent, same RoPE | HF chunked + bf16 inv_freq vs ref/ | first token through 1-token chunk vs recurrence |")
    print("|---|---|---|---|---|---|---|---|")
    for m in metas:
        for c in m["cases"]:
            v = m["variants"]["bf16"]["cases"][c]
            ck = m["checks"].get(c, {})
            print(f"| {m['model']} | {c} | {f(v['logits_vs_ref_chunked'])} | {f(v['mtp_logits_vs_ref_chunked'])} | "
                  f"{f(v['logits_vs_hf_chunked_same_rope'])} | {f(v['mtp_logits_vs_hf_chunked_same_rope'])} | "
                  f"{f(ck['chunked_bf16rope_vs_ref'])} | {f(v['unpatched_first_token_vs_patched'])} |")
    print("\n### quantised (HF on dequantised GGUF weights) vs bf16, both recurrent")
    print("max-abs (argmax agreement / rows)\n")
    print("| model | variant | short logits | short MTP | long logits | long MTP |")
    print("|---|---|---|---|---|---|")
    for m in metas:
        for var, vm in m["variants"].items():
            if var == "bf16":
                continue
            cs = vm["cases"]
            print(f"| {m['model']} | {var} | {f(cs['short']['logits_vs_bf16_recurrent'])} | "
                  f"{f(cs['short']['mtp_logits_vs_bf16_recurrent'])} | {f(cs['long']['logits_vs_bf16_recurrent'])} | "
                  f"{f(cs['long']['mtp_logits_vs_bf16_recurrent'])} |")
    print("\n### weight error of the dequantised tensors (relative RMS vs the bf16 weights), by ggml type\n")
    print("| model | variant | types: rel. RMS error (min..max) |")
    print("|---|---|---|")
    for m in metas:
        for var, vm in m["variants"].items():
            if var == "bf16":
                continue
            bt = {}
            for t in vm["tensors"].values():
                bt.setdefault(t["type"], []).append(t["rel_rms_err"])
            s = ", ".join(f"{k}: {min(v):.4f}..{max(v):.4f}" for k, v in sorted(bt.items()))
            print(f"| {m['model']} | {var} | {s} |")
    print("\n### greedy (24 tokens)\n")
    print("| model | variant | case | = reference.json greedy_ids | HF generate = reference.json | HF generate = greedy_ids"
          " | common prefix with bf16 greedy | min top-2 margin | steps with margin < 0.05 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for d, m in zip(sys.argv[1:], metas):
        for var, vm in m["variants"].items():
            for fn in vm["files"]:
                if not fn.endswith("greedy.json"):
                    continue
                g = json.load(open(os.path.join(d.rstrip("/"), "ref2", fn)))
                b = json.load(open(os.path.join(d.rstrip("/"), "ref2", f"bf16.{g['case']}.greedy.json")))["greedy_ids"]
                n = 0
                while n < len(b) and g["greedy_ids"][n] == b[n]:
                    n += 1
                small = [i for i, x in enumerate(g["margins"]) if x < 0.05]
                print(f"| {m['model']} | {var} | {g['case']} | {g['equals_reference_json']} | "
                      f"{g['hf_generate_equals_reference_json']} | {g['hf_generate_equals_greedy_ids']} | {n} | "
                      f"{g['min_margin']:.4f} | {small} |")


if __name__ == "__main__":
    main()
