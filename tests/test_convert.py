#!/usr/bin/env python3
"""Tests for mtp-convert (tools/convert.c), Python 3 standard library only.

    python3 tests/test_convert.py            # from the repository root, ./mtp-convert built
    MTP_FIXTURES=/path/to/fixtures MTP_CONVERT=./mtp-convert python3 tests/test_convert.py

For each fixture model (tests/fixtures/<model>/{hf,gguf}) the checkpoint is converted and
compared with the GGUF files llama.cpp made from it:
  bf16  - tensor by tensor (names, order, shapes, types, bytes) and key by key;
  q8_0  - the same, byte for byte;
  q4_k_m - same tensor set, llama-quantize's type mix, and dequantisation error no worse
           than llama-quantize's on the same tensors.
Checkpoint layouts the fixtures do not ship (sharded with an index, Qwen3_5*ForConditional-
Generation with a vision tower, fused MoE experts) are made from the fixtures and must
convert to the same bytes. Bad inputs must fail with one clear line, a non-zero exit, and no
file left behind.

Known, intended differences from llama.cpp's files (see KNOWN_KV_DIFFS / ULP_TENSORS):
  tokenizer.ggml.pre - we detect it from the tokenizer's split regex; the fixture tokenizer
      has Qwen2's regex, but the fixture GGUFs were made with "qwen35" forced for Qwen3.5
      architectures (refgen/convert_wrap.py).
  ssm_a - -exp(A_log) correctly rounded; PyTorch's vectorised exp is 1 ulp off on some values.

End-to-end checks through mtp-gen (logits, greedy, MTP logits against ref/) plug in through
EXTRA_CHECKS: append a function f(model, outputs) where outputs maps a type name to the path
of the converted file; it returns a list of failure strings.
"""
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.environ.get("MTP_FIXTURES", os.path.join(ROOT, "tests", "fixtures"))
CONVERT = os.environ.get("MTP_CONVERT", os.path.join(ROOT, "mtp-convert"))
MODELS = ["qwen35-dense", "qwen35-moe", "qwen3next"]
EXTRA_CHECKS = []

KNOWN_KV_DIFFS = {"qwen35-dense": {"tokenizer.ggml.pre"}, "qwen35-moe": {"tokenizer.ggml.pre"}, "qwen3next": set()}
ULP_TENSORS = (".ssm_a",)

# ==== GGUF reading ====

T_F32, T_F16, T_Q5_0, T_Q8_0, T_Q4_K, T_Q5_K, T_Q6_K, T_BF16 = 0, 1, 6, 8, 12, 13, 14, 30
BLOCK = {T_F32: (1, 4), T_F16: (1, 2), T_BF16: (1, 2), T_Q5_0: (32, 22), T_Q8_0: (32, 34),
         T_Q4_K: (256, 144), T_Q5_K: (256, 176), T_Q6_K: (256, 210)}
SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


class Gguf:
    """Keys (in order, with their value types) and tensors of a GGUF file."""

    def __init__(self, path):
        with open(path, "rb") as f:
            self.data = f.read()
        self.pos = 0
        if self.data[:4] != b"GGUF":
            raise ValueError(path + ": not a GGUF file")
        self.pos = 4
        self.version = self._read("I")
        n_tensors, n_kv = self._read("Q"), self._read("Q")
        self.kv = {}
        for _ in range(n_kv):
            key = self._str()
            vtype = self._read("I")
            self.kv[key] = (vtype, self._value(vtype))
        self.tensors = []
        for _ in range(n_tensors):
            name = self._str()
            dims = [self._read("Q") for _ in range(self._read("I"))]
            ttype, offset = self._read("I"), self._read("Q")
            self.tensors.append((name, dims, ttype, offset))
        self.data_start = (self.pos + 31) // 32 * 32
        self.by_name = {t[0]: t for t in self.tensors}

    def _read(self, fmt):
        v = struct.unpack_from("<" + fmt, self.data, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return v

    def _str(self):
        n = self._read("Q")
        s = self.data[self.pos:self.pos + n].decode("utf-8")
        self.pos += n
        return s

    def _value(self, vtype):
        if vtype == 8:
            return self._str()
        if vtype == 9:
            etype, n = self._read("I"), self._read("Q")
            return (etype, [self._value(etype) for _ in range(n)])
        return self._read(SCALAR[vtype])

    def raw(self, name):
        _, dims, ttype, offset = self.by_name[name]
        numel = math.prod(dims)
        block, size = BLOCK[ttype]
        start = self.data_start + offset
        return self.data[start:start + numel // block * size]

    def floats(self, name):
        return dequantize(self.by_name[name][2], self.raw(name))


# ==== Dequantisation ====

def _k_scale_min(j, q):
    if j < 4:
        return q[j] & 63, q[j + 4] & 63
    return (q[j + 4] & 15) | (q[j - 4] >> 6) << 4, (q[j + 4] >> 4) | (q[j] >> 6) << 4


def dequantize(ttype, b):
    out = []
    if ttype == T_F32:
        return list(struct.unpack("<%df" % (len(b) // 4), b))
    if ttype == T_F16:
        return list(struct.unpack("<%de" % (len(b) // 2), b))
    if ttype == T_BF16:
        return list(struct.unpack("<%df" % (len(b) // 2), b"".join(b"\0\0" + b[i:i + 2] for i in range(0, len(b), 2))))
    block, size = BLOCK[ttype]
    for off in range(0, len(b), size):
        if ttype == T_Q8_0:
            d = struct.unpack_from("<e", b, off)[0]
            out.extend(d * q for q in struct.unpack_from("<32b", b, off + 2))
        elif ttype == T_Q5_0:
            d, high = struct.unpack_from("<eI", b, off)
            qs = b[off + 6:off + 22]
            lo = [(qs[i] & 15 | ((high >> i) & 1) << 4) - 16 for i in range(16)]
            hi = [(qs[i] >> 4 | ((high >> (i + 16)) & 1) << 4) - 16 for i in range(16)]
            out.extend(d * q for q in lo + hi)
        elif ttype in (T_Q4_K, T_Q5_K):
            d, dmin = struct.unpack_from("<2e", b, off)
            sc = b[off + 4:off + 16]
            qh = b[off + 16:off + 48] if ttype == T_Q5_K else bytes(32)
            qs = b[off + 48:off + 176] if ttype == T_Q5_K else b[off + 16:off + 144]
            for j in range(8):
                ls, lm = _k_scale_min(j, sc)
                step, m, shift = d * ls, dmin * lm, 4 * (j % 2)
                part = qs[32 * (j // 2):32 * (j // 2) + 32]
                out.extend(step * ((q >> shift) & 15 | ((qh[l] >> j) & 1) << 4) - m for l, q in enumerate(part))
        elif ttype == T_Q6_K:
            ql, qh = b[off:off + 128], b[off + 128:off + 192]
            sc = struct.unpack_from("<16b", b, off + 192)
            d = struct.unpack_from("<e", b, off + 208)[0]
            vals = [0.0] * 256
            for half in range(2):
                for l in range(32):
                    h = qh[32 * half + l]
                    a, c = ql[64 * half + l], ql[64 * half + 32 + l]
                    for part, q in enumerate(((a & 15) | (h & 3) << 4, (c & 15) | ((h >> 2) & 3) << 4,
                                              (a >> 4) | ((h >> 4) & 3) << 4, (c >> 4) | ((h >> 6) & 3) << 4)):
                        e = 128 * half + 32 * part + l
                        vals[e] = d * sc[e // 16] * (q - 32)
            out.extend(vals)
        else:
            raise ValueError("unknown type %d" % ttype)
    return out


# ==== Safetensors writing (for the layout and error cases) ====

def read_safetensors(path):
    with open(path, "rb") as f:
        data = f.read()
    n = struct.unpack_from("<Q", data, 0)[0]
    header = json.loads(data[8:8 + n])
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        b, e = info["data_offsets"]
        tensors[name] = (info["dtype"], info["shape"], data[8 + n + b:8 + n + e])
    return tensors


def write_safetensors(path, tensors):
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, (dtype, shape, blob) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def copy_checkpoint(model, dest):
    shutil.copytree(os.path.join(FIXTURES, model, "hf"), dest)
    for name in os.listdir(dest):
        os.chmod(os.path.join(dest, name), 0o644)
    os.chmod(dest, 0o755)
    return dest


def edit_config(hf, change):
    path = os.path.join(hf, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    change(cfg)
    with open(path, "w") as f:
        json.dump(cfg, f, indent=1)


# ==== Running the converter ====

def convert(hf, out, *args):
    started = time.time()
    p = subprocess.run([CONVERT, "-q", *args, hf, out], capture_output=True, text=True)
    return p.returncode, p.stderr, time.time() - started


def compare_files(ours, theirs, known_kv, exact_types=True):
    """Failures (as strings) between our GGUF and llama.cpp's."""
    a, b = Gguf(ours), Gguf(theirs)
    fails = []
    keys_a = [k for k in a.kv if k not in known_kv]
    keys_b = [k for k in b.kv if k not in known_kv]
    if keys_a != keys_b:
        fails.append("metadata keys differ: ours-only %s, theirs-only %s" %
                     (sorted(set(keys_a) - set(keys_b)), sorted(set(keys_b) - set(keys_a))))
    for k in keys_a:
        if k in b.kv and a.kv[k] != b.kv[k]:
            fails.append("metadata %s: ours %.80r, theirs %.80r" % (k, a.kv[k], b.kv[k]))
    if [t[0] for t in a.tensors] != [t[0] for t in b.tensors]:
        fails.append("tensor names or order differ")
    for name, dims, ttype, _ in a.tensors:
        if name not in b.by_name:
            continue
        _, dims_b, ttype_b, _ = b.by_name[name]
        if dims != dims_b or (exact_types and ttype != ttype_b):
            fails.append("%s: ours %s type %d, theirs %s type %d" % (name, dims, ttype, dims_b, ttype_b))
        elif exact_types and a.raw(name) != b.raw(name):
            if name.endswith(ULP_TENSORS) and within_one_ulp(a.raw(name), b.raw(name)):
                continue
            fails.append("%s: data differs" % name)
    return fails


def within_one_ulp(x, y):
    ux = struct.unpack("<%di" % (len(x) // 4), x)
    uy = struct.unpack("<%di" % (len(y) // 4), y)
    return all(abs(p - q) <= 1 for p, q in zip(ux, uy))


def rel_error(values, reference):
    num = sum((v - r) ** 2 for v, r in zip(values, reference))
    den = sum(r * r for r in reference) or 1.0
    return math.sqrt(num / den)


# ==== Tests ====

TESTS = []


def test(fn):
    TESTS.append(fn)
    return fn


class Ctx:
    """Scratch directory and the files converted so far (reused by later tests)."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="mtp-convert-test-")
        self.outputs = {m: {} for m in MODELS}
        self.timings = []

    def converted(self, model, qtype, *extra):
        if qtype not in self.outputs[model]:
            out = os.path.join(self.dir, "%s-%s.gguf" % (model, qtype))
            rc, err, secs = convert(os.path.join(FIXTURES, model, "hf"), out, "--type", qtype, *extra)
            if rc != 0:
                raise AssertionError("conversion failed: " + err.strip())
            self.timings.append((model, qtype, secs))
            self.outputs[model][qtype] = out
        return self.outputs[model][qtype]


def fixture_gguf(model, name):
    return os.path.join(FIXTURES, model, "gguf", name)


def per_model(fn):
    """One test per fixture model."""
    for model in MODELS:
        def run(ctx, model=model):
            return fn(ctx, model)
        run.__name__ = "%s[%s]" % (fn.__name__, model)
        TESTS.append(run)
    return fn


@per_model
def bf16_matches_llama_cpp(ctx, model):
    return compare_files(ctx.converted(model, "bf16"), fixture_gguf(model, "model-bf16.gguf"), KNOWN_KV_DIFFS[model])


@per_model
def q8_0_matches_llama_cpp(ctx, model):
    return compare_files(ctx.converted(model, "q8_0"), fixture_gguf(model, "model-q8_0.gguf"), KNOWN_KV_DIFFS[model])


@per_model
def q4_k_m_mix_and_error(ctx, model):
    """Same tensors and types as llama-quantize's Q4_K_M outside the MTP block, MTP matrices in
    q8_0 by default, and dequantisation error within 5% of llama-quantize's per type."""
    ours = Gguf(ctx.converted(model, "q4_k_m"))
    theirs = Gguf(fixture_gguf(model, "model-q4_k_m.gguf"))
    source = Gguf(ctx.converted(model, "bf16"))
    n_layer = ours.kv["%s.block_count" % ours.kv["general.architecture"][1]][1] - 1
    fails = []
    if sorted(t[0] for t in ours.tensors) != sorted(t[0] for t in theirs.tensors):
        fails.append("tensor sets differ")
    err = {}
    for name, dims, ttype, _ in ours.tensors:
        if name not in theirs.by_name:
            continue
        their_type = theirs.by_name[name][2]
        if name.startswith("blk.%d." % n_layer):
            if ttype not in (T_F32, T_Q8_0):
                fails.append("%s: MTP matrix is type %d, want q8_0" % (name, ttype))
            continue
        if ttype != their_type:
            fails.append("%s: type %d, llama-quantize chose %d" % (name, ttype, their_type))
            continue
        if ttype == T_F32:
            continue
        ref = source.floats(name)
        e = err.setdefault(ttype, [0.0, 0.0, 0.0])
        e[0] += sum((v - r) ** 2 for v, r in zip(ours.floats(name), ref))
        e[1] += sum((v - r) ** 2 for v, r in zip(theirs.floats(name), ref))
        e[2] += sum(r * r for r in ref)
    for ttype, (mine, llama, norm) in sorted(err.items()):
        mine, llama = math.sqrt(mine / norm), math.sqrt(llama / norm)
        print("    %s type %2d: relative rms error ours %.5f, llama-quantize %.5f" % (model, ttype, mine, llama))
        if mine > 1.05 * llama:
            fails.append("type %d: error %.5f vs llama-quantize %.5f" % (ttype, mine, llama))
    return fails


@test
def pure_k_quants_decode_close(ctx):
    """--type q4_k / q6_k: every matrix in the requested type (or its fallback), errors in the
    range those formats give on random weights."""
    source = Gguf(ctx.converted("qwen35-dense", "bf16"))
    fails = []
    for qtype, want, bound in (("q4_k", T_Q4_K, 0.12), ("q6_k", T_Q6_K, 0.03)):
        g = Gguf(ctx.converted("qwen35-dense", qtype))
        for name, dims, ttype, _ in g.tensors:
            if ttype == T_F32 or name.startswith("blk.4."):
                continue
            if ttype != want and dims[0] % 256 == 0:
                fails.append("%s %s: type %d" % (qtype, name, ttype))
            e = rel_error(g.floats(name), source.floats(name))
            if e > bound:
                fails.append("%s %s: relative error %.4f > %.2f" % (qtype, name, e, bound))
    return fails


@test
def f16_close_to_bf16(ctx):
    a, b = Gguf(ctx.converted("qwen3next", "f16")), Gguf(ctx.converted("qwen3next", "bf16"))
    fails = []
    for name, dims, ttype, _ in a.tensors:
        if ttype not in (T_F16, T_F32):
            fails.append("%s: type %d" % (name, ttype))
        elif ttype == T_F16 and rel_error(a.floats(name), b.floats(name)) > 1e-3:
            fails.append("%s: f16 differs from bf16" % name)
    return fails


def same_as_reference(ctx, model, hf, label):
    out = os.path.join(ctx.dir, label + ".gguf")
    rc, err, _ = convert(hf, out)
    if rc != 0:
        return ["conversion failed: " + err.strip()]
    with open(out, "rb") as f, open(ctx.converted(model, "bf16"), "rb") as g:
        mine, ref = f.read(), g.read()
    return [] if mine == ref else ["output differs from the single-file conversion"]


@per_model
def sharded_with_index(ctx, model):
    hf = copy_checkpoint(model, os.path.join(ctx.dir, "sharded-" + model, "hf"))
    tensors = read_safetensors(os.path.join(hf, "model.safetensors"))
    os.remove(os.path.join(hf, "model.safetensors"))
    names = list(tensors)
    shards = [names[:len(names) // 2], names[len(names) // 2:]]
    weight_map = {}
    for i, part in enumerate(shards):
        fname = "model-%05d-of-00002.safetensors" % (i + 1)
        write_safetensors(os.path.join(hf, fname), {n: tensors[n] for n in part})
        weight_map.update({n: fname for n in part})
    with open(os.path.join(hf, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return same_as_reference(ctx, model, hf, "sharded-" + model)


@test
def conditional_generation_layout(ctx):
    """Qwen3_5ForConditionalGeneration: text under model.language_model.*, the config nested in
    text_config, a vision tower to skip."""
    model = "qwen35-dense"
    hf = copy_checkpoint(model, os.path.join(ctx.dir, "vl", "hf"))
    path = os.path.join(hf, "model.safetensors")
    tensors = read_safetensors(path)
    renamed = {("model.language_model." + n[6:] if n.startswith("model.") else n): v for n, v in tensors.items()}
    renamed["model.visual.patch_embed.proj.weight"] = ("BF16", [4, 4], bytes(32))
    write_safetensors(path, renamed)

    def nest(cfg):
        text = {k: v for k, v in cfg.items() if k != "architectures"}
        cfg.clear()
        cfg.update({"architectures": ["Qwen3_5ForConditionalGeneration"], "model_type": "qwen3_5",
                    "text_config": text, "vision_config": {"depth": 1}})
    edit_config(hf, nest)
    return same_as_reference(ctx, model, hf, "vl")


@test
def fused_experts_layout(ctx):
    """MoE experts stored fused: experts.gate_up_proj [E, 2*ff, hidden], experts.down_proj."""
    model = "qwen35-moe"
    hf = copy_checkpoint(model, os.path.join(ctx.dir, "fused", "hf"))
    path = os.path.join(hf, "model.safetensors")
    tensors = read_safetensors(path)
    fused, pending = {}, {}
    for name, (dtype, shape, blob) in tensors.items():
        head, sep, rest = name.partition(".mlp.experts.")
        if not sep or rest in ("gate_up_proj", "down_proj"):   # the fixture's MTP layer is fused already
            fused[name] = (dtype, shape, blob)
            continue
        e, proj = rest.split(".")[0], rest.split(".")[1]
        pending.setdefault(head, {}).setdefault(proj, {})[int(e)] = (shape, blob)
        group = pending[head]
        if sum(len(v) for v in group.values()) == 24:
            gate, up, down = group["gate_proj"], group["up_proj"], group["down_proj"]
            ff, hidden = gate[0][0]
            fused[head + ".mlp.experts.down_proj"] = ("BF16", [8, hidden, ff], b"".join(down[i][1] for i in range(8)))
            fused[head + ".mlp.experts.gate_up_proj"] = ("BF16", [8, 2 * ff, hidden],
                                                         b"".join(gate[i][1] + up[i][1] for i in range(8)))
    write_safetensors(path, fused)
    return same_as_reference(ctx, model, hf, "fused")


@test
def no_mtp_converts_with_warning(ctx):
    hf = copy_checkpoint("qwen35-moe", os.path.join(ctx.dir, "nomtp", "hf"))
    path = os.path.join(hf, "model.safetensors")
    write_safetensors(path, {n: v for n, v in read_safetensors(path).items() if not n.startswith("mtp.")})
    out = os.path.join(ctx.dir, "nomtp.gguf")
    rc, err, _ = convert(hf, out)
    if rc != 0:
        return ["failed: " + err.strip()]
    g = Gguf(out)
    fails = []
    if "without MTP" not in err:
        fails.append("no warning about the missing MTP head: %r" % err)
    if g.kv["qwen35moe.block_count"][1] != 4 or "qwen35moe.nextn_predict_layers" in g.kv:
        fails.append("block count / nextn key wrong for a model without MTP")
    if any(t[0].startswith("blk.4.") for t in g.tensors):
        fails.append("MTP tensors written")
    return fails


def expect_failure(ctx, label, hf, message, *args):
    out_dir = os.path.join(ctx.dir, "err-" + label)
    os.makedirs(out_dir)
    out = os.path.join(out_dir, "out.gguf")
    rc, err, _ = convert(hf, out, *args)
    lines = err.strip().splitlines()
    fails = []
    if rc == 0:
        fails.append("exit code 0")
    if len(lines) != 1 or not lines[0].startswith("mtp-convert: error: ") or message not in lines[0]:
        fails.append("want one error line containing %r, got %r" % (message, err))
    if os.listdir(out_dir):
        fails.append("left files behind: %s" % os.listdir(out_dir))
    return fails


def broken_checkpoint(ctx, label, model="qwen35-dense"):
    return copy_checkpoint(model, os.path.join(ctx.dir, "broken-" + label, "hf"))


@test
def error_missing_dir(ctx):
    return expect_failure(ctx, "nodir", os.path.join(ctx.dir, "does-not-exist"), "is not a directory")


@test
def error_missing_config(ctx):
    hf = broken_checkpoint(ctx, "noconfig")
    os.remove(os.path.join(hf, "config.json"))
    return expect_failure(ctx, "noconfig", hf, "no config.json")


@test
def error_missing_tokenizer(ctx):
    hf = broken_checkpoint(ctx, "notok")
    os.remove(os.path.join(hf, "tokenizer.json"))
    return expect_failure(ctx, "notok", hf, "no tokenizer.json")


@test
def error_missing_weights(ctx):
    hf = broken_checkpoint(ctx, "noweights")
    os.remove(os.path.join(hf, "model.safetensors"))
    return expect_failure(ctx, "noweights", hf, "no model.safetensors")


@test
def error_unknown_architecture(ctx):
    hf = broken_checkpoint(ctx, "arch")
    edit_config(hf, lambda c: c.update(architectures=["LlamaForCausalLM"]))
    return expect_failure(ctx, "arch", hf, "unsupported architecture LlamaForCausalLM")


@test
def error_truncated_safetensors(ctx):
    hf = broken_checkpoint(ctx, "trunc")
    path = os.path.join(hf, "model.safetensors")
    os.truncate(path, os.path.getsize(path) - 1000)
    return expect_failure(ctx, "trunc", hf, "truncated")


@test
def error_truncated_header(ctx):
    hf = broken_checkpoint(ctx, "trunchdr")
    os.truncate(os.path.join(hf, "model.safetensors"), 100)
    return expect_failure(ctx, "trunchdr", hf, "truncated")


@test
def error_shape_mismatch(ctx):
    hf = broken_checkpoint(ctx, "shape")
    edit_config(hf, lambda c: c.update(intermediate_size=640))
    return expect_failure(ctx, "shape", hf, "config.json implies")


@test
def error_missing_shard(ctx):
    hf = broken_checkpoint(ctx, "shard")
    tensors = read_safetensors(os.path.join(hf, "model.safetensors"))
    with open(os.path.join(hf, "model.safetensors.index.json"), "w") as f:
        json.dump({"weight_map": {n: "model-00001-of-00002.safetensors" for n in tensors}}, f)
    return expect_failure(ctx, "shard", hf, "missing")


@test
def error_bad_type(ctx):
    return expect_failure(ctx, "type", os.path.join(FIXTURES, "qwen35-dense", "hf"), "expected bf16", "--type", "q3_k")


@test
def extra_checks(ctx):
    fails = []
    for check in EXTRA_CHECKS:
        for model in MODELS:
            fails += check(model, {q: ctx.converted(model, q) for q in ("bf16", "q8_0", "q4_k_m")})
    return fails


def main():
    if not os.path.exists(CONVERT):
        print("missing %s: build it first (make mtp-convert)" % CONVERT)
        print("0 passed, 1 failed")
        return 1
    ctx = Ctx()
    passed = failed = 0
    try:
        for fn in TESTS:
            try:
                fails = fn(ctx)
            except Exception as e:  # a crash is a failure of that test, not of the run
                fails = ["%s: %s" % (type(e).__name__, e)]
            if fails:
                failed += 1
                print("FAIL %s" % fn.__name__)
                for f in fails[:20]:
                    print("    " + f)
            else:
                passed += 1
                print("ok   %s" % fn.__name__)
        for model, qtype, secs in ctx.timings:
            print("    convert %-13s %-7s %.2f s" % (model, qtype, secs))
    finally:
        shutil.rmtree(ctx.dir, ignore_errors=True)
    print("%d passed, %d failed" % (passed, failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
