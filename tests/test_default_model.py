#!/usr/bin/env python3
"""Tests of the built-in default model (issue 8, tools/train/).

  - mtp-gen with no -m runs the model embedded in the binary (same output as
    -m tools/train/default-q8_0.gguf), and -m still overrides it;
  - the text it writes at the default temperature (fixed seed) looks like its corpus (Python
    standard library source); greedy decoding of a model this small soon repeats itself;
  - greedy MTP acceptance at K = 1 (--draft 1) over the held-out prompts
    (tools/train/prompts/, from modules not trained on) is >= 0.70;
  - its q8_0 head drafts from a 4-bit copy by default: the output is still exactly plain
    decoding's, and acceptance is within 0.02 of drafting with the head as stored;
  - adaptive depth (--draft-max) drafts past four tokens where the head is sure, keeps
    acceptance high, and backs off to plain decoding when no draft is ever accepted.

Usage: python3 tests/test_default_model.py   (after `make`; MTP_GEN / MTP_RUNNER as in tests/run.py)
Python standard library only.  Prints `N passed, N failed` last.
"""
import glob, json, os, re, subprocess, sys, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("MTP_GEN", os.path.join(ROOT, "mtp-gen"))
RUNNER = os.environ.get("MTP_RUNNER", "").split()
GGUF = os.path.join(ROOT, "tools", "train", "default-q8_0.gguf")
SAMPLE = os.path.join(ROOT, "tools", "train", "sample_prompt.txt")   # the start of a class
PROMPTS = sorted(glob.glob(os.path.join(ROOT, "tools", "train", "prompts", "*.txt")))
DENSE = os.path.join(ROOT, "tests", "fixtures", "qwen35-dense", "gguf", "model-q8_0.gguf")
TMP = tempfile.mkdtemp(prefix="mtp-default-")
SLOW = 20 if RUNNER or "asan" in os.path.basename(BIN) else 1
MIN_ACCEPT = 0.70

passed, failed = 0, 0


def check(name, ok, detail=""):
    global passed, failed
    passed += bool(ok)
    failed += not ok
    print(f"{'ok  ' if ok else 'FAIL'} {name}{'  ' + detail if detail and not ok else ''}", flush=True)


def run(args):
    return subprocess.run(RUNNER + [BIN] + args, capture_output=True, timeout=300 * SLOW)


def python_like(text):
    """Rough: mostly lines indented by multiples of 4 (or blank), with Python keywords."""
    lines = [l for l in text.split("\n") if l.strip()]
    if len(lines) < 4:
        return False, f"only {len(lines)} lines"
    ind = sum(1 for l in lines if (len(l) - len(l.lstrip(" "))) % 4 == 0)
    kw = len(re.findall(r"\b(def|return|if|else|for|in|self|None|raise|import|class|not|is|and)\b", text))
    ok = ind >= 0.8 * len(lines) and kw >= 5 and ("def " in text or "self." in text)
    return ok, f"{ind}/{len(lines)} lines 4-space indented, {kw} keywords"


def stats_of(name, args):
    """The --stats-json of a run, or None after a failed check called name."""
    js = os.path.join(TMP, "s.json")
    r = run(args + ["--stats-json", js, "-q"])
    if r.returncode != 0 or not os.path.exists(js):
        check(name, False, r.stderr.decode(errors="replace")[-300:])
        return None
    s = json.load(open(js))
    os.unlink(js)
    return s


def adaptive_depth():
    """--draft-max decides per draft from the head's margin: deep where it is sure, none
    where nothing is accepted (--draft-vocab 1: every draft is token 0)."""
    drafted = steps = acc = tested = deep = 0
    for p in PROMPTS:
        s = stats_of(f"--draft-max 16 run on {os.path.basename(p)}",
                     ["-f", p, "-n", "256", "--temp", "0", "-t", "2", "--draft-max", "16"])
        if s is None:
            return
        drafted += s["drafted"]; steps += s["steps"]; acc += s["accepted"]; tested += s["tested"]
        deep += sum(s["tested_at"][4:])
    check("--draft-max 16: drafts past the fourth are tested, > 3 drafts a step on average",
          deep > 0 and drafted > 3 * steps, f"{drafted} drafts in {steps} steps, {deep} tested past the fourth")
    check("--draft-max 16: acceptance >= 0.85 (unsure drafts are not sent to verification)",
          tested and acc / tested >= 0.85, f"{acc}/{tested}")
    args = ["-f", PROMPTS[0], "-n", "256", "--temp", "0", "-t", "2", "--no-display-prompt"]
    s = stats_of("--draft-max 8 --draft-vocab 1 run", args + ["--draft-max", "8", "--draft-vocab", "1"])
    ok = s is not None and s["n_gen"] == 256 and s["steps"] <= 0.1 * s["n_gen"]
    check("--draft-max 8 backs off when no draft is accepted: drafting steps <= 10% of tokens", ok,
          f"{s and s['steps']} drafting steps for {s and s['n_gen']} tokens")
    plain = run(args + ["--no-mtp"]).stdout
    useless = run(args + ["--draft-max", "8", "--draft-vocab", "1"]).stdout
    check("... with output equal to --no-mtp's", len(plain) > 0 and plain == useless)


def main():
    t0 = time.time()
    base = ["--temp", "0", "-t", "2", "-n", "48"]
    check("tools/train/default-q8_0.gguf is there", os.path.exists(GGUF))
    check("held-out prompts are there", len(PROMPTS) >= 4, f"{len(PROMPTS)}")
    if not os.path.exists(GGUF) or not PROMPTS:
        print(f"{passed} passed, {failed} failed")
        sys.exit(1)
    p0 = PROMPTS[0]
    emb = run(["-f", p0, "--no-display-prompt"] + base)
    check("no -m: runs the built-in model", emb.returncode == 0 and len(emb.stdout) > 0, emb.stderr.decode(errors="replace")[-300:])
    ext = run(["-m", GGUF, "-f", p0, "--no-display-prompt"] + base)
    check("no -m gives exactly the output of -m tools/train/default-q8_0.gguf",
          ext.returncode == 0 and ext.stdout == emb.stdout, f"{emb.stdout[:80]!r} vs {ext.stdout[:80]!r}")
    if os.path.exists(DENSE):
        other = run(["-m", DENSE, "-p", "def main():", "--no-display-prompt"] + base)
        other_builtin = run(["-p", "def main():", "--no-display-prompt"] + base)
        check("-m overrides the built-in model", other.returncode == 0 and other.stdout != other_builtin.stdout)
    code = run(["-f", SAMPLE, "--no-display-prompt", "--seed", "1", "-t", "2", "-n", "120"])
    text = code.stdout.decode("utf-8", errors="replace")
    ok, why = python_like(text)
    check("its text at the default temperature looks like its corpus (Python source)", ok, why + " " + repr(text[:200]))

    check("drafts come from a 4-bit copy of the head by default",
          b"drafting from a 4-bit copy of the head" in emb.stderr, emb.stderr.decode(errors="replace")[-300:])
    for p in PROMPTS[:2]:
        outs = [run(["-f", p, "--no-display-prompt", "--temp", "0", "-t", "2", "-n", "200"] + extra).stdout
                for extra in (["--no-mtp"], ["--draft-max", "16"], ["--draft-exact", "--draft", "3"])]
        check(f"greedy output with the draft copy and with --draft-exact = --no-mtp's [{os.path.basename(p)}]",
              len(outs[0]) > 0 and outs[0] == outs[1] == outs[2], repr([o[-60:] for o in outs]))

    rates = {}
    for name, extra in (("copy", []), ("exact", ["--draft-exact"])):
        acc = tested = 0
        per = []
        for p in PROMPTS:
            s = stats_of(f"mtp run on {os.path.basename(p)} {extra}",
                         ["-f", p, "-n", "256", "--temp", "0", "-t", "2", "--draft", "1"] + extra)
            if s is None:
                continue
            acc += s["accepted"]
            tested += s["tested"]
            per.append(f"{os.path.basename(p)[:12]}={s['accepted']}/{s['tested']}")
        rates[name] = (acc, tested, acc / tested if tested else 0.0)
        print(f"# acceptance by prompt ({name}): " + " ".join(per))
    acc, tested, rate = rates["copy"]
    check(f"greedy MTP acceptance at K=1 on held-out prompts >= {MIN_ACCEPT:.2f}", rate >= MIN_ACCEPT,
          f"{acc}/{tested} = {rate:.3f}")
    check("the draft copy's acceptance is within 0.02 of the head's own", rate >= rates["exact"][2] - 0.02,
          f"copy {rate:.3f}, exact {rates['exact'][2]:.3f}")
    adaptive_depth()
    print(f"# test_default_model: acceptance {acc}/{tested} = {rate:.3f}, {time.time() - t0:.1f} s", flush=True)
    print(f"{passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
