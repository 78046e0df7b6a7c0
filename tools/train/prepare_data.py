#!/usr/bin/env python3
"""Corpus + tokenizer for the built-in default model (issue 8).

Corpus: the Python 3.14 standard library sources shipped by Debian (libpython3.14-minimal /
libpython3.14-stdlib, /usr/lib/python3.14, PSF License v2), *.py only, without the test
suites (test/, */tests/, idle_test/) and pydoc_data/topics.py (generated docs).
A fixed list of modules is held out for evaluation (perplexity, acceptance prompts).

Tokenizer: byte-level BPE (4096 tokens incl. specials) trained on the training files with the
real Qwen3 tokenizer's pre-tokenizer, normalizer and decoder (from qwen3-tokenizer.json).

usage (in the reference chroot): prepare_data.py QWEN3_TOKENIZER_JSON OUTDIR
writes OUTDIR/tok/ (HF tokenizer), OUTDIR/train.bin, OUTDIR/val.bin (uint16 token ids,
files joined by <|endoftext|>), OUTDIR/files.json, OUTDIR/prompts/*.txt
"""
import glob, json, os, sys
import numpy as np
from transformers import PreTrainedTokenizerFast

SRC = "/usr/lib/python3.14"
HELDOUT = ["textwrap.py", "shlex.py", "fractions.py", "statistics.py", "difflib.py", "calendar.py",
           "graphlib.py", "colorsys.py", "bisect.py", "heapq.py", "string/__init__.py", "json/encoder.py"]
VOCAB = 4096


def corpus_files():
    out = []
    for f in sorted(glob.glob(SRC + "/**/*.py", recursive=True)):
        r = os.path.relpath(f, SRC)
        parts = r.split("/")
        if any(p in ("test", "tests", "idle_test", "site-packages", "dist-packages") for p in parts[:-1]):
            continue
        if r.startswith("pydoc_data/"):
            continue
        out.append(r)
    return out


def main():
    src_tok, outdir = sys.argv[1], sys.argv[2]
    os.makedirs(outdir, exist_ok=True)
    files = corpus_files()
    held = [f for f in files if f in HELDOUT]
    train = [f for f in files if f not in HELDOUT]
    assert len(held) == len(HELDOUT), set(HELDOUT) - set(held)
    read = lambda r: open(os.path.join(SRC, r), encoding="utf-8", errors="replace").read()
    base = PreTrainedTokenizerFast(tokenizer_file=src_tok)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
    tok = base.train_new_from_iterator((read(f) for f in train), vocab_size=VOCAB, new_special_tokens=specials)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.eos_token = "<|im_end|>"
    tok.pad_token = "<|endoftext|>"
    tok.chat_template = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
                         "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    tok.save_pretrained(os.path.join(outdir, "tok"))
    eot = tok.convert_tokens_to_ids("<|endoftext|>")
    print("vocab", len(tok), "eot", eot)
    stats = {}
    for name, lst in (("train", train), ("val", held)):
        ids = []
        nchar = 0
        for f in lst:
            t = read(f)
            nchar += len(t)
            ids += tok(t, add_special_tokens=False)["input_ids"] + [eot]
        np.array(ids, dtype=np.uint16).tofile(os.path.join(outdir, name + ".bin"))
        stats[name] = {"files": len(lst), "chars": nchar, "tokens": len(ids)}
        print(name, stats[name])
    json.dump({"source": SRC, "heldout": held, "train": train, "stats": stats, "vocab": len(tok)},
              open(os.path.join(outdir, "files.json"), "w"), indent=1)
    # held-out prompts: 8 excerpts (about 40 lines each) starting at a top-level def/class
    pd = os.path.join(outdir, "prompts")
    os.makedirs(pd, exist_ok=True)
    n = 0
    for f in held:
        lines = read(f).split("\n")
        starts = [i for i, l in enumerate(lines) if l.startswith(("def ", "class ")) and i > 20]
        if not starts:
            continue
        i = starts[len(starts) // 2]
        text = "\n".join(lines[i:i + 40]) + "\n"
        open(os.path.join(pd, "%02d_%s.txt" % (n, f.replace("/", "_").replace(".py", ""))), "w").write(text)
        n += 1
        if n == 8:
            break


if __name__ == "__main__":
    main()
