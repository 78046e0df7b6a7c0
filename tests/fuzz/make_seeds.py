#!/usr/bin/env python3
"""Rebuild the seed corpus in tests/fuzz/corpus/ from the fixtures (the committed corpus is its output).

Seeds are kept small, since libFuzzer's mutations slow down with input size: GGUF headers without
their tensor data (the gguf harness pads the input with zeros to stand for it), a vocabulary cut
down to 512 tokens, the tokenizer golden strings, JSON and safetensors headers from the fixtures'
Hugging Face checkpoints, and command lines.  Python standard library only.
"""
import json, os, shutil, struct

HERE = os.path.dirname(os.path.abspath(__file__))
FIX = os.path.join(HERE, "..", "fixtures")
OUT = os.path.join(HERE, "corpus")
SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
GG_STR, GG_ARR, GG_U32, GG_I32 = 8, 9, 4, 5


def read_gguf(path):
    """(metadata [(key, type, raw value bytes)], tensor infos [raw bytes]) of a GGUF file."""
    with open(path, "rb") as f:
        d = f.read(1 << 24)
    n_t, n_kv = struct.unpack_from("<QQ", d, 8)

    def skip(t, o):
        if t == GG_STR:
            return o + 8 + struct.unpack_from("<Q", d, o)[0]
        if t == GG_ARR:
            et, n = struct.unpack_from("<IQ", d, o)
            o += 12
            for _ in range(n):
                o = skip(et, o)
            return o
        return o + SIZES[t]
    o, kvs, tensors = 24, [], []
    for _ in range(n_kv):
        n = struct.unpack_from("<Q", d, o)[0]
        key = d[o + 8:o + 8 + n].decode()
        t = struct.unpack_from("<I", d, o + 8 + n)[0]
        end = skip(t, o + 12 + n)
        kvs.append((key, t, d[o + 12 + n:end]))
        o = end
    for _ in range(n_t):
        n = struct.unpack_from("<Q", d, o)[0]
        nd = struct.unpack_from("<I", d, o + 8 + n)[0]
        end = o + 8 + n + 4 + 8 * nd + 4 + 8
        tensors.append(d[o:end])
        o = end
    return kvs, tensors


def gg_str(s):
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def gg_arr(et, items):
    if et == GG_STR:
        return struct.pack("<IQ", et, len(items)) + b"".join(gg_str(s) for s in items)
    return struct.pack("<IQ", et, len(items)) + struct.pack(f"<{len(items)}i", *items)


def write_gguf(kvs, tensors, pad_to=32):
    out = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kvs))
    for key, t, raw in kvs:
        out += gg_str(key) + struct.pack("<I", t) + raw
    out += b"".join(tensors)
    return out + b"\0" * (-len(out) % pad_to)


def strings(raw):
    n = struct.unpack_from("<Q", raw, 4)[0]
    o, out = 12, []
    for _ in range(n):
        k = struct.unpack_from("<Q", raw, o)[0]
        out.append(raw[o + 8:o + 8 + k])
        o += 8 + k
    return out


def put(target, name, data):
    os.makedirs(os.path.join(OUT, target), exist_ok=True)
    with open(os.path.join(OUT, target, name), "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())


def gguf_seeds():
    """Model headers: the loader needs only the token count, so the vocabulary becomes empty strings."""
    for model, quant in (("qwen35-dense", "q8_0"), ("qwen35-moe", "q4_k_m"), ("qwen3next", "q4_k_m")):
        kvs, tensors = read_gguf(os.path.join(FIX, model, "gguf", f"model-{quant}.gguf"))
        keep = []
        for key, t, raw in kvs:
            if key == "tokenizer.ggml.tokens":
                raw = gg_arr(GG_STR, [b""] * len(strings(raw)))
            elif key.startswith("tokenizer.") or key.startswith("general.") and key != "general.architecture":
                continue
            keep.append((key, t, raw))
        image = write_gguf(keep, tensors)
        put("gguf", f"{model}-{quant}", image)
    put("gguf", "header-only", image[:24])


def vocab_seeds():
    """The dense fixture's tokenizer cut to its first 512 tokens plus the special ones."""
    kvs, _ = read_gguf(os.path.join(FIX, "qwen35-dense", "gguf", "model-q8_0.gguf"))
    kv = {key: (t, raw) for key, t, raw in kvs}
    toks = strings(kv["tokenizer.ggml.tokens"][1])
    n = struct.unpack_from("<Q", kv["tokenizer.ggml.token_type"][1], 4)[0]
    types = list(struct.unpack_from(f"<{n}i", kv["tokenizer.ggml.token_type"][1], 12))
    keep_ids = [i for i in range(len(toks)) if i < 512 or types[i] in (3, 4)]
    new_id = {old: new for new, old in enumerate(keep_ids)}
    vocab = {toks[i] for i in keep_ids}
    merges = [m for m in strings(kv["tokenizer.ggml.merges"][1])
              if b" " in m and all(p in vocab for p in m.split(b" ", 1)) and m.replace(b" ", b"", 1) in vocab]
    eos = struct.unpack("<I", kv["tokenizer.ggml.eos_token_id"][1])[0]
    meta = [
        ("tokenizer.ggml.model", GG_STR, gg_str("gpt2")),
        ("tokenizer.ggml.pre", GG_STR, gg_str("qwen35")),
        ("tokenizer.ggml.tokens", GG_ARR, gg_arr(GG_STR, [toks[i] for i in keep_ids])),
        ("tokenizer.ggml.token_type", GG_ARR, gg_arr(GG_I32, [types[i] for i in keep_ids])),
        ("tokenizer.ggml.merges", GG_ARR, gg_arr(GG_STR, merges)),
        ("tokenizer.ggml.eos_token_id", GG_U32, struct.pack("<I", new_id.get(eos, 0))),
        ("tokenizer.ggml.normalizer.nfc", 7, b"\x01"),
    ]
    put("vocab", "qwen35-512", write_gguf(meta, [], pad_to=1))
    put("vocab", "qwen2-bytes-only", write_gguf(
        [(k, t, gg_str("qwen2") if k == "tokenizer.ggml.pre" else gg_arr(GG_STR, []) if k == "tokenizer.ggml.merges" else r)
         for k, t, r in meta], [], pad_to=1))


def tokenizer_seeds():
    """Texts after a mode byte (bit 0: parse control tokens)."""
    with open(os.path.join(FIX, "tokenizer", "tokenizer_cases_dev.golden.json"), encoding="utf-8") as f:
        cases = json.load(f)
    for i, case in enumerate(cases):
        put("tokenizer", f"golden-{i:02d}", bytes([i & 1]) + case["text"].encode("utf-8"))
    put("tokenizer", "invalid-utf8", b"\x01ab\xff\xc3(\xe2\x82\xf0\x9f\x98 \xed\xa0\x80<|im_start|>x\xc0\xaf")
    put("tokenizer", "marks-hangul", b"\x00e\xcc\x81\xcc\xa3\xcc\x81 \xe1\x84\x80\xe1\x85\xa1\xe1\x86\xa8 ")


def json_seeds():
    for model in ("qwen35-dense", "qwen35-moe", "qwen3next"):
        with open(os.path.join(FIX, model, "hf", "config.json"), "rb") as f:
            put("json", f"{model}-config.json", f.read())
    with open(os.path.join(FIX, "tokenizer", "qwen3-tokenizer_config.json"), "rb") as f:
        put("json", "tokenizer_config.json", f.read()[:4096])
    put("json", "escapes.json", r'{"a": "\u00e9\ud83d\ude00\n\t\"\\\/", "b": [1, -2.5e+3, true, false, null, {}], "c": []}')
    put("json", "nested.json", "[" * 50 + "0" + "]" * 50)


def safetensors_seeds():
    """8 bytes of data-section length, then the JSON header (as st_open hands them to st_parse_header)."""
    for model, limit in (("qwen35-dense", None), ("qwen3next", 12)):
        with open(os.path.join(FIX, model, "hf", "model.safetensors"), "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            header = json.loads(f.read(n))
        size = os.path.getsize(os.path.join(FIX, model, "hf", "model.safetensors")) - 8 - n
        if limit:
            header = dict(list(header.items())[:limit])
        put("safetensors", model, struct.pack("<Q", size) + json.dumps(header).encode())


def cli_seeds():
    """NUL-separated arguments after the program name."""
    lines = [
        ["-m", "m.gguf", "-p", "The quick brown fox", "-n", "8", "--temp", "0"],
        ["-m", "m.gguf", "-f", "p.txt", "-c", "64", "-t", "2", "--no-display-prompt", "-q", "--ids"],
        ["-m", "m.gguf", "--draft-max", "4", "--draft-p-min", "0.3", "--top-k", "5", "--top-p", "0.9",
         "--min-p", "0.1", "--repeat-penalty", "1.1", "--repeat-last-n", "-1", "-s", "42", "--stats-json", "s.json"],
        ["-m", "m.gguf", "--draft", "0", "--mtp", "--no-mtp", "--mtp-optimistic", "--ignore-eos", "-v",
         "--logits-out", "l.bin", "--mtp-logits-out", "ml.bin", "--tokenize", "-p", "-"],
        ["-n", "-1", "-m"],
    ]
    for i, args in enumerate(lines):
        put("cli", f"args-{i}", "\0".join(args))


if __name__ == "__main__":
    shutil.rmtree(OUT, ignore_errors=True)
    gguf_seeds()
    vocab_seeds()
    tokenizer_seeds()
    json_seeds()
    safetensors_seeds()
    cli_seeds()
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(OUT) for f in fs)
    print(f"corpus: {total // 1024} KB")
