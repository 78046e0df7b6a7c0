#!/usr/bin/env python3
"""mtp-gen test suite: runs the built binaries against the reference fixtures.

Usage (from the repository root, after `make`):  python3 tests/run.py [-k SUBSTRING]
Environment: MTP_GEN=path to the mtp-gen binary (default ./mtp-gen; the ASan
build and cross builds reuse the suite this way), MTP_RUNNER=prefix command
(e.g. qemu-aarch64), MTP_QUICK=1 to skip the slowest groups, MTP_CASES=short
to run the model tests on the short prompt only.

Ground truth is tests/fixtures (copied from the shared reference fixtures):
Hugging Face transformers outputs for tiny random-weight models with the exact
Qwen3.5 / Qwen3.5-MoE / Qwen3-Next layouts.  See tests/README.md for what each
tolerance is and why.  Python standard library only.
"""
import array, json, os, shutil, struct, subprocess, sys, tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "tests", "fixtures")
BIN = os.environ.get("MTP_GEN", os.path.join(ROOT, "mtp-gen"))
RUNNER = os.environ.get("MTP_RUNNER", "").split()
QUICK = os.environ.get("MTP_QUICK") == "1"
CASES = os.environ.get("MTP_CASES", "short long").split()   # prompts the model tests use
MODELS = ["qwen35-dense", "qwen35-moe", "qwen3next"]
QUANTS = ["bf16", "q8_0", "q4_k_m"]
ONLY = sys.argv[sys.argv.index("-k") + 1] if "-k" in sys.argv else ""
TMP = tempfile.mkdtemp(prefix="mtp-tests-")

passed, failed = 0, 0


def check(name, ok, detail=""):
    global passed, failed
    if ok:
        passed += 1
    else:
        failed += 1
    print(f"{'ok  ' if ok else 'FAIL'} {name}{'  ' + detail if detail else ''}", flush=True)


def run(args, stdin=None, timeout=600, binary=None):
    return subprocess.run(RUNNER + [binary or BIN] + args, input=stdin, capture_output=True, timeout=timeout)


def gguf(model, quant):
    return os.path.join(FIX, model, "gguf", f"model-{quant}.gguf")


def ref(model):
    with open(os.path.join(FIX, model, "ref", "reference.json")) as f:
        return json.load(f)


def f32(path):
    a = array.array("f")
    with open(path, "rb") as f:
        a.frombytes(f.read())
    return a


def prompt_file(model, case):
    path = os.path.join(TMP, f"{model}.{case}.txt")
    with open(path, "w", encoding="utf-8") as f:
        f.write(ref(model)["cases"][case]["text"])
    return path


def argmax(row):
    return max(range(len(row)), key=row.__getitem__)


def compare(a, b, V):
    """max |a-b|, rows whose argmax agree, rows, and the worst row."""
    n = len(b) // V
    if len(a) != len(b):
        return float("inf"), 0, n, -1
    worst, worst_row, agree = 0.0, -1, 0
    for i in range(n):
        ra, rb = a[i * V:(i + 1) * V], b[i * V:(i + 1) * V]
        d = max(abs(x - y) for x, y in zip(ra, rb))
        if d > worst:
            worst, worst_row = d, i
        agree += argmax(ra) == argmax(rb)
    return worst, agree, n, worst_row


# ==== kernels and internals (C test programs) ====

def closing_counts(out):
    for line in reversed(out.decode(errors="replace").splitlines()):
        parts = line.split()
        if len(parts) == 4 and parts[1] == "passed," and parts[3] == "failed":
            return int(parts[0]), int(parts[2])
    return 0, 1


def test_c_programs():
    suffix = os.path.basename(BIN)[len("mtp-gen"):]
    progs = [(["test_kernels" + suffix], "kernels: SIMD vs scalar reference"),
             (["test_units" + suffix, "spec-stats"], "units: speculative sampling is lossless"),
             (["test_units" + suffix, "margin"], "units: adaptive depth's margin bins")]
    for m, q in (("qwen35-dense", "q8_0"), ("qwen35-moe", "q4_k_m"), ("qwen3next", "bf16")):
        progs.append((["test_units" + suffix, "rollback", gguf(m, q)], f"units: rollback bit-exact, oracle drafts [{m} {q}]"))
        progs.append((["test_units" + suffix, "chain", gguf(m, q)], f"units: chained drafts continue from the catch-up's last row [{m} {q}]"))
        progs.append((["test_units" + suffix, "draft-copy", gguf(m, q)], f"units: the head's 4-bit draft copy [{m} {q}]"))
    for argv, name in progs:
        exe = os.path.join(ROOT, argv[0])
        if not os.path.exists(exe):
            check(name, False, f"{argv[0]} not built")
            continue
        r = subprocess.run(RUNNER + [exe] + argv[1:], capture_output=True, timeout=1200)
        p, f = closing_counts(r.stdout)
        check(name, r.returncode == 0 and f == 0 and p > 0, f"{p} passed, {f} failed" + ("" if r.returncode == 0 else "\n" + r.stdout.decode()[-2000:]))


# ==== tokenizer ====

def test_tokenizer():
    vocab = os.path.join(FIX, "tokenizer", "qwen3-vocab.gguf")
    with open(os.path.join(FIX, "tokenizer", "tokenizer_cases_dev.golden.json")) as f:
        cases = json.load(f)
    bad = []
    for i, c in enumerate(cases):
        path = os.path.join(TMP, "tok.txt")
        with open(path, "w", encoding="utf-8", newline="") as f:
            f.write(c["text"])
        r = run(["-m", vocab, "-f", path, "--tokenize"])
        ids = [int(x) for x in r.stdout.split()] if r.returncode == 0 else None
        if ids != c["ids"]:
            bad.append(i)
    check("tokenizer: golden Hugging Face ids (qwen2 pre-tokenizer, NFC)", not bad, f"{len(cases) - len(bad)}/{len(cases)}" + (f" failing cases {bad[:10]}" if bad else ""))
    texts = os.path.join(TMP, "roundtrip.bin")
    import unicodedata
    with open(texts, "wb") as f:
        for c in cases:
            f.write(unicodedata.normalize("NFC", c["text"]).encode("utf-8") + b"\0")
    exe = os.path.join(ROOT, "test_units" + os.path.basename(BIN)[len("mtp-gen"):])
    r = subprocess.run(RUNNER + [exe, "roundtrip", vocab, texts], capture_output=True, timeout=300)
    check("tokenizer: decode(encode(x)) == x for NFC text", r.returncode == 0, r.stdout.decode()[-500:] if r.returncode else "")
    for m in MODELS:
        for case in CASES:
            r = run(["-m", gguf(m, "bf16"), "-f", prompt_file(m, case), "--tokenize"])
            ids = [int(x) for x in r.stdout.split()] if r.returncode == 0 else None
            check(f"tokenizer: {m} {case} prompt ids (qwen35 pre-tokenizer)", ids == ref(m)["cases"][case]["prompt_ids"])


# ==== model outputs ====

# Tolerances, all measured and explained in tests/README.md.
BF16_MAX_ABS = 1e-2          # vs the recurrent-path reference (ref2), every position
OLD_REF_MAX_ABS = 0.05       # vs ref/, whose RoPE frequencies were rounded to bf16 (0.028 apart from ref2)
# Quantised files with the fast kernels: 8-bit activations add 0.1-3.5 logits
# of noise at position 0, which these random, chaotic fixtures amplify along
# the sequence (measured agreement 71-88%; llama.cpp diverges the same way).  The
# --ref-kernels run checks the quantised weights themselves to BF16_MAX_ABS.
FAST_QUANT_MIN_ARGMAX = 0.65
# With --ref-kernels the products are exact but the vector kernels still round
# in f32 in their own order: measured <= 1e-3, 0.013 at one sensitive position.
REF_KERNELS_MAX_ABS = 0.05


def logits_of(model, quant, case, flag, extra=()):
    out = os.path.join(TMP, f"{model}.{quant}.{case}.{flag}.f32")
    r = run(["-m", gguf(model, quant), "-f", prompt_file(model, case), "-n", "0", "-q", "--" + flag, out] + list(extra))
    return f32(out) if r.returncode == 0 else array.array("f"), r


def test_logits():
    for m in MODELS:
        V = ref(m)["vocab_size"]
        for q in QUANTS:
            for case in CASES:
                for flag, what, refname in (("logits-out", "logits", "logits"), ("mtp-logits-out", "MTP logits", "mtp_logits")):
                    want = f32(os.path.join(FIX, m, "ref2", f"{q}.{case}.{refname}.f32"))
                    label = f"{what}: {m} {q} {case}"
                    ours, r = logits_of(m, q, case, flag)
                    if r.returncode:
                        check(label, False, r.stderr.decode()[-300:])
                        continue
                    d, agree, n, row = compare(ours, want, V)
                    if q == "bf16":
                        check(f"{label} vs HF", d <= BF16_MAX_ABS and agree == n, f"max|diff| {d:.4f} (row {row}), argmax {agree}/{n}")
                        d, agree, n, row = compare(ours, f32(os.path.join(FIX, m, "ref", f"{case}.{refname}.f32")), V)
                        check(f"{label} vs HF with bf16-rounded RoPE (ref/)", d <= OLD_REF_MAX_ABS and agree >= n - 1, f"max|diff| {d:.4f}, argmax {agree}/{n}")
                        continue
                    check(f"{label} vs HF on the dequantised weights (8-bit activations)", agree >= FAST_QUANT_MIN_ARGMAX * n,
                          f"argmax {agree}/{n}, max|diff| {d:.3f}")
                    if QUICK and case == "long":
                        continue
                    ours, r = logits_of(m, q, case, flag, ["--ref-kernels"])
                    d, agree, n, row = compare(ours, want, V)
                    check(f"{label} --ref-kernels vs HF on the dequantised weights", r.returncode == 0 and d <= REF_KERNELS_MAX_ABS and agree == n,
                          f"max|diff| {d:.4f} (row {row}), argmax {agree}/{n}")


def test_converted():
    """mtp-convert's own GGUFs of the HF checkpoints run like llama.cpp's."""
    conv = os.path.join(ROOT, "mtp-convert" + os.path.basename(BIN)[len("mtp-gen"):])
    for m in MODELS:
        V = ref(m)["vocab_size"]
        for q in QUANTS:
            out = os.path.join(TMP, f"conv-{m}-{q}.gguf")
            r = subprocess.run(RUNNER + [conv, "-q", "--type", q, os.path.join(FIX, m, "hf"), out], capture_output=True, timeout=600)
            if r.returncode:
                check(f"convert: {m} {q}", False, r.stderr.decode()[-300:])
                continue
            for case in CASES:
                for flag, what, refname in (("logits-out", "logits", "logits"), ("mtp-logits-out", "MTP logits", "mtp_logits")):
                    path = os.path.join(TMP, "conv.f32")
                    args = ["-m", out, "-f", prompt_file(m, case), "-n", "0", "-q", "--" + flag, path]
                    if q == "q8_0":
                        args.append("--ref-kernels")
                    r = run(args)
                    ours = f32(path) if r.returncode == 0 else array.array("f")
                    want = f32(os.path.join(FIX, m, "ref2", f"{'bf16' if q == 'q4_k_m' else q}.{case}.{refname}.f32"))
                    if q == "q4_k_m":   # our own 4-bit rounding: as close to the bf16 model as llama-quantize's file
                        if case != "long":  # 34 positions of a chaotic model are too few to compare two roundings
                            continue
                        theirs, _ = logits_of(m, q, case, flag)
                        agree, n = compare(ours, want, V)[1:3]
                        bar = compare(theirs, want, V)[1] - 0.1 * n
                        check(f"convert: {m} q4_k_m {case} {what} vs HF bf16 at least as close as llama-quantize's file",
                              agree >= bar, f"argmax {agree}/{n}, llama-quantize's file {bar + 0.1 * n:.0f}/{n}")
                        continue
                    d, agree, n, row = compare(ours, want, V)
                    bound = BF16_MAX_ABS if q == "bf16" else REF_KERNELS_MAX_ABS
                    check(f"convert: {m} {q} {case} {what} vs HF", d <= bound and agree == n, f"max|diff| {d:.4f}, argmax {agree}/{n}")
            if q == "bf16":
                r = run(["-m", out, "-f", prompt_file(m, "short"), "-n", "24", "--temp", "0", "--ids", "-q", "--no-display-prompt", "--ignore-eos"])
                got = [int(x) for x in r.stdout.split()] if r.returncode == 0 else None
                check(f"convert: {m} bf16 greedy equals HF generate", got == ref(m)["cases"]["short"]["greedy_ids"])


def greedy_ids(model, quant, case, extra, n=24):
    r = run(["-m", gguf(model, quant), "-f", prompt_file(model, case), "-n", str(n), "--temp", "0", "--ids", "-q",
             "--ignore-eos", "--no-display-prompt"] + extra)
    return ([int(x) for x in r.stdout.split()] if r.returncode == 0 else None), r


def test_greedy():
    for m in MODELS:
        for case in CASES:
            want = ref(m)["cases"][case]["greedy_ids"]
            got, r = greedy_ids(m, "bf16", case, ["--no-mtp"])
            check(f"greedy: {m} bf16 {case}: 24 tokens equal HF generate", got == want, f"got {got}\nwant {want}" if got != want else "")


def test_mtp_identity():
    drafts = [["--draft", "1"], ["--draft", "2"], ["--draft", "3"], ["--draft-max", "8"]]
    for m in MODELS:
        for q in QUANTS:
            for case in CASES:
                base, r = greedy_ids(m, q, case, ["--no-mtp"], 48)
                bad = []
                for d in drafts:
                    got, r = greedy_ids(m, q, case, d, 48)
                    if got != base:
                        bad.append(" ".join(d))
                check(f"mtp: {m} {q} {case}: greedy output with K=1,2,3,adaptive equals --no-mtp", base is not None and not bad,
                      f"differs for {bad}" if bad else "")


def test_sampling():
    m = "qwen35-dense"
    args = ["-m", gguf(m, "q8_0"), "-p", "The quick brown fox", "-n", "40", "--temp", "0.9", "--ids", "-q", "--no-display-prompt"]
    a, b, c = run(args + ["--seed", "7"]), run(args + ["--seed", "7"]), run(args + ["--seed", "8"])
    check("sampling: the same --seed gives the same output (MTP on)", a.returncode == 0 and a.stdout == b.stdout and len(a.stdout.split()) == 40)
    check("sampling: another seed gives other output", a.stdout != c.stdout)
    d = run(args + ["--seed", "7", "--no-mtp"])
    e = run(args + ["--seed", "7", "--no-mtp"])
    check("sampling: the same --seed gives the same output (MTP off)", d.returncode == 0 and d.stdout == e.stdout)
    r = run(["-m", gguf(m, "q8_0"), "-p", "The quick brown fox", "-n", "20", "--temp", "0.7", "--top-k", "0", "--top-p", "0.9",
             "--min-p", "0", "--repeat-penalty", "1.3", "--seed", "3", "-q"])
    check("sampling: full-vocabulary top-p with repetition penalty runs", r.returncode == 0 and len(r.stdout) > len("The quick brown fox"))


def test_cli():
    m = gguf("qwen35-dense", "q8_0")
    r = run(["-m", m, "-p", "The quick brown fox", "-n", "8", "--temp", "0"])
    out, err = r.stdout.decode(errors="replace"), r.stderr.decode(errors="replace")
    check("cli: prompt echoed then text on stdout, timings on stderr", r.returncode == 0 and out.startswith("The quick brown fox")
          and len(out) > len("The quick brown fox") and "tok/s" in err and "tok/s" not in out)
    r = run(["-m", m, "-n", "4", "--temp", "0", "--no-display-prompt", "-q"], stdin=b"The quick brown fox")
    check("cli: prompt from stdin, --quiet keeps stderr empty", r.returncode == 0 and r.stdout and not r.stderr, r.stderr.decode()[-300:])
    r = run(["-m", m, "-p", "-", "-n", "4", "--temp", "0", "-q"], stdin=b"The quick brown fox")
    check("cli: -p - reads stdin", r.returncode == 0 and r.stdout.startswith(b"The quick brown fox"))
    r = run(["--help"])
    check("cli: --help documents the flags", r.returncode == 0 and b"--draft-max" in r.stdout and b"--logits-out" in r.stdout)
    stats = os.path.join(TMP, "stats.json")
    r = run(["-m", m, "-p", "The quick brown fox", "-n", "16", "--temp", "0", "-q", "--stats-json", stats])
    ok = r.returncode == 0 and os.path.exists(stats)
    if ok:
        with open(stats) as f:
            s = json.load(f)
        ok = s["n_gen"] == 16 and s["mtp"] is True and s["tested"] >= s["accepted"] and s["drafted"] >= s["tested"]
    check("cli: --stats-json writes consistent JSON", ok)


# ==== errors: every bad input gets one clear line and a non-zero exit ====

def gguf_layout(data):
    """Offsets of the metadata values and tensor infos of a GGUF image."""
    o = 24
    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
    n_t, n_kv = struct.unpack_from("<QQ", data, 8)
    kvs, tensors = {}, {}

    def skip(t, o):
        if t == 8:
            return o + 8 + struct.unpack_from("<Q", data, o)[0]
        if t == 9:
            et, n = struct.unpack_from("<IQ", data, o)
            o += 12
            for _ in range(n):
                o = skip(et, o)
            return o
        return o + sizes[t]
    for _ in range(n_kv):
        n = struct.unpack_from("<Q", data, o)[0]
        key = data[o + 8:o + 8 + n].decode()
        o += 8 + n
        t = struct.unpack_from("<I", data, o)[0]
        kvs[key] = o + 4
        o = skip(t, o + 4)
    for _ in range(n_t):
        n = struct.unpack_from("<Q", data, o)[0]
        name = data[o + 8:o + 8 + n].decode()
        o += 8 + n
        nd = struct.unpack_from("<I", data, o)[0]
        tensors[name] = {"dims": o + 4, "type": o + 4 + 8 * nd, "offset": o + 4 + 8 * nd + 4}
        o += 4 + 8 * nd + 4 + 8
    return kvs, tensors


BLOCK = {0: (1, 4), 1: (1, 2), 2: (32, 18), 6: (32, 22), 8: (32, 34), 12: (256, 144), 13: (256, 176), 14: (256, 210), 30: (1, 2)}


def fuse_gate_up(src, dst):
    """Rewrite a qwen35moe GGUF with each layer's ffn_gate_exps and ffn_up_exps fused into
    ffn_gate_up_exps (per expert: its gate rows, then its up rows), as newer converters write."""
    with open(src, "rb") as f:
        data = f.read()
    kvs, infos = gguf_layout(data)
    n_t = struct.unpack_from("<Q", data, 8)[0]
    kv_end = min(i["dims"] - 4 - len(name.encode()) - 8 for name, i in infos.items())
    tensors = []
    for name, i in infos.items():
        nd = (i["type"] - i["dims"]) // 8
        dims = list(struct.unpack_from(f"<{nd}Q", data, i["dims"]))
        ttype = struct.unpack_from("<I", data, i["type"])[0]
        per, size = BLOCK[ttype]
        nbytes = dims[0] // per * size
        for d in dims[1:]:
            nbytes *= d
        off = struct.unpack_from("<Q", data, i["offset"])[0]
        tensors.append([name, dims, ttype, data[data_start(data, infos) + off:][:nbytes]])
    out = []
    by_name = {t[0]: t for t in tensors}
    for t in tensors:
        if t[0].endswith("ffn_up_exps.weight"):
            continue
        if t[0].endswith("ffn_gate_exps.weight"):
            up = by_name[t[0].replace("gate_exps", "up_exps")]
            E = t[1][2]
            g, u, per = t[3], up[3], len(t[3]) // E
            fused = b"".join(g[e * per:(e + 1) * per] + u[e * per:(e + 1) * per] for e in range(E))
            t = [t[0].replace("gate_exps", "gate_up_exps"), [t[1][0], 2 * t[1][1], E], t[2], fused]
        out.append(t)
    body, blob = bytearray(), bytearray()
    for name, dims, ttype, raw in out:
        body += struct.pack("<Q", len(name)) + name.encode() + struct.pack("<I", len(dims))
        body += struct.pack(f"<{len(dims)}Q", *dims) + struct.pack("<IQ", ttype, len(blob))
        blob += raw + b"\0" * (-len(raw) % 32)
    head = bytearray(data[:kv_end])
    struct.pack_into("<Q", head, 8, len(out))
    meta = head + body
    meta += b"\0" * (-len(meta) % 32)
    with open(dst, "wb") as f:
        f.write(meta + blob)
    return n_t, len(out)


def data_start(data, infos):
    last = max(infos.values(), key=lambda i: i["offset"])["offset"] + 8
    return last + (-last % 32)


def test_fused_experts():
    src = gguf("qwen35-moe", "q8_0")
    dst = os.path.join(TMP, "moe-fused.gguf")
    before, after = fuse_gate_up(src, dst)
    a, ra = logits_of("qwen35-moe", "q8_0", "short", "logits-out")
    out = os.path.join(TMP, "fused.f32")
    r = run(["-m", dst, "-f", prompt_file("qwen35-moe", "short"), "-n", "0", "-q", "--logits-out", out])
    check("moe: fused ffn_gate_up_exps gives the same logits as separate gate/up experts",
          r.returncode == 0 and after < before and f32(out) == a, r.stderr.decode()[-300:])


def test_larger_than_ram():
    """A file larger than RAM (a fixture grown past RAM with a sparse hole
    after its data) still runs, says so once on stderr, and writes what the
    file it extends writes."""
    src = gguf("qwen35-moe", "q8_0")
    dst = os.path.join(TMP, "moe-larger-than-ram.gguf")
    shutil.copyfile(src, dst)
    os.truncate(dst, os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGESIZE") + (1 << 30))
    args = ["-p", "The quick brown fox", "-n", "12", "--temp", "0", "--no-display-prompt"]
    a, b = run(["-m", src] + args), run(["-m", dst] + args)
    notes = b.stderr.decode().count("larger than RAM")
    check("moe: a model file larger than RAM runs, says so once on stderr, same output as the file's data alone",
          a.returncode == 0 and b.returncode == 0 and notes == 1 and b"larger than RAM" not in a.stderr and a.stdout == b.stdout,
          f"rc {a.returncode}/{b.returncode}, notes {notes}: {b.stderr.decode()[-300:]}")
    os.remove(dst)


def test_errors():
    with open(gguf("qwen35-dense", "q8_0"), "rb") as f:
        good = f.read()
    kvs, tensors = gguf_layout(good)

    def variant(name, fn):
        data = bytearray(good)
        fn(data)
        path = os.path.join(TMP, name + ".gguf")
        with open(path, "wb") as f:
            f.write(data)
        return path

    def patch(data, at, fmt, value):
        struct.pack_into(fmt, data, at, value)

    arch_at = kvs["general.architecture"] + 8
    cases = [
        ("missing model file", ["-m", os.path.join(TMP, "nope.gguf"), "-p", "x"], "cannot open model"),
        ("directory as model", ["-m", TMP, "-p", "x"], "is a directory"),
        ("not a GGUF file", ["-m", os.path.join(FIX, "README.md"), "-p", "x"], "not a GGUF"),
        ("bad magic", ["-m", variant("magic", lambda d: d.__setitem__(slice(0, 4), b"GGUX")), "-p", "x"], "not a GGUF"),
        ("unsupported version", ["-m", variant("version", lambda d: patch(d, 4, "<I", 9)), "-p", "x"], "unsupported GGUF version"),
        ("truncated header", ["-m", variant("trunc-head", lambda d: d.__delitem__(slice(200, None))), "-p", "x"], "truncated"),
        ("truncated tensor data", ["-m", variant("trunc-data", lambda d: d.__delitem__(slice(len(good) // 2, None))), "-p", "x"], "past the end"),
        ("tensor offset past the end", ["-m", variant("offset", lambda d: patch(d, tensors["blk.0.ffn_up.weight"]["offset"], "<Q", 1 << 40)), "-p", "x"], "past the end"),
        ("absurd metadata count", ["-m", variant("count", lambda d: patch(d, 16, "<Q", 1 << 60)), "-p", "x"], "counts larger than the file"),
        ("unsupported architecture", ["-m", variant("arch", lambda d: d.__setitem__(slice(arch_at, arch_at + 6), b"llama9")), "-p", "x"], "architecture 'llama9' is not supported"),
        ("unsupported tensor type", ["-m", variant("type", lambda d: patch(d, tensors["blk.0.ffn_up.weight"]["type"], "<I", 16)), "-p", "x"], "does not support"),
        ("missing tensor", ["-m", variant("missing", lambda d: d.__setitem__(slice(tensors["blk.0.ffn_up.weight"]["dims"] - 8, tensors["blk.0.ffn_up.weight"]["dims"] - 4), b"upzz")), "-p", "x"], "missing tensor 'blk.0.ffn_up.weight'"),
        ("shape mismatch", ["-m", variant("shape", lambda d: patch(d, tensors["blk.0.ffn_up.weight"]["dims"] + 8, "<Q", 256)), "-p", "x"], "expected"),
        ("absurd dimensions", ["-m", variant("dims", lambda d: patch(d, kvs["qwen35.embedding_length"], "<I", 1 << 30)), "-p", "x"], "implausible"),
        ("vocabulary-only model for generation", ["-m", os.path.join(FIX, "tokenizer", "qwen3-vocab.gguf"), "-p", "x"], "only --tokenize"),
        ("prompt longer than the context", ["-m", gguf("qwen35-dense", "q8_0"), "-f", prompt_file("qwen35-dense", "long"), "-c", "64"], "context holds 64"),
        ("context larger than the model's", ["-m", gguf("qwen35-dense", "q8_0"), "-p", "x", "-c", "100000"], "exceeds the model's context"),
        ("empty prompt", ["-m", gguf("qwen35-dense", "q8_0"), "-p", ""], "prompt is empty"),
        ("missing prompt file", ["-m", gguf("qwen35-dense", "q8_0"), "-f", os.path.join(TMP, "none.txt")], "cannot open prompt file"),
        ("unknown option", ["-m", gguf("qwen35-dense", "q8_0"), "--frobnicate"], "unknown option"),
        ("zero threads", ["-m", gguf("qwen35-dense", "q8_0"), "-t", "0", "-p", "x"], "-t expects"),
        ("non-numeric count", ["-m", gguf("qwen35-dense", "q8_0"), "-n", "lots", "-p", "x"], "-n expects"),
        ("flag without its value", ["-m"], "needs a value"),
    ]
    for name, args, want in cases:
        r = run(args, stdin=b"")
        err = r.stderr.decode(errors="replace")
        lines = err.strip().splitlines()
        ok = r.returncode not in (0, None) and r.returncode > 0 and len(lines) == 1 and want in err and "error" in err
        check(f"error: {name}", ok, f"exit {r.returncode}, stderr {err.strip()!r}")


def test_suites():
    """The other suites (converter, REPL, robustness, built-in model): their counts add to ours."""
    global passed, failed
    for script in ("test_convert.py", "test_repl.py", "test_robust.py", "test_default_model.py"):
        path = os.path.join(ROOT, "tests", script)
        if not os.path.exists(path):
            continue
        print(f"---- {script}", flush=True)
        r = subprocess.run([sys.executable, path], capture_output=True, timeout=1800, cwd=ROOT)
        out = r.stdout.decode(errors="replace")
        print("\n".join(l for l in out.splitlines() if not l.endswith(" failed") or "passed," not in l), flush=True)
        p, f = closing_counts(r.stdout)
        if r.returncode and not f:
            f = 1
        passed += p
        failed += f


def main():
    if not os.path.exists(BIN):
        print(f"{BIN} is not built (run make)")
        print("0 passed, 1 failed")
        return 1
    groups = [test_c_programs, test_tokenizer, test_errors, test_cli, test_sampling, test_logits, test_greedy, test_converted,
              test_fused_experts, test_larger_than_ram]
    if not QUICK:
        groups += [test_mtp_identity, test_suites]
    for g in groups:
        if ONLY in g.__name__:
            g()
    shutil.rmtree(TMP, ignore_errors=True)
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
