#!/usr/bin/env python3
"""mtp-gen robustness tests: limits, absurd models, memory, signals and pipes, shared model files.

Usage (from the repository root, after `make`):  python3 tests/test_robust.py
Environment: MTP_GEN=path to the mtp-gen binary (default ./mtp-gen).  With an ASan build (a name
containing "asan") the tests that limit memory or run valgrind are skipped, since ASan reserves
terabytes of shadow memory.  Python standard library only; closes with "N passed, N failed".

The error cases of tests/run.py (bad magic, truncation, absurd counts and dimensions, prompt
longer than the context, -c too large, empty -p, bad flags) are not repeated here.
"""
import hashlib, os, re, resource, select, shutil, signal, struct, subprocess, sys, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
import run as suite   # noqa: E402  (for gguf_layout; it makes a temporary directory we remove)
shutil.rmtree(suite.TMP, ignore_errors=True)

BIN = os.environ.get("MTP_GEN", os.path.join(ROOT, "mtp-gen"))
ASAN = "asan" in os.path.basename(BIN)
MODEL = os.path.join(ROOT, "tests", "fixtures", "qwen35-dense", "gguf", "model-q8_0.gguf")
VOCAB = os.path.join(ROOT, "tests", "fixtures", "tokenizer", "qwen3-vocab.gguf")
TMP = tempfile.mkdtemp(prefix="mtp-robust-")
MB = 1 << 20
RSS_LIMIT_KB = (1024 if ASAN else 96) * 1024   # what rejecting a file may cost: no big allocation

passed, failed = 0, 0


def check(name, ok, detail=""):
    global passed, failed
    if ok:
        passed += 1
    else:
        failed += 1
    print(f"{'ok  ' if ok else 'FAIL'} {name}{'  ' + detail if detail and not ok else ''}", flush=True)


def measure(args, stdin_path=None, limit_data=None, timeout=120):
    """Run mtp-gen; returns (exit status or -signal, stdout, stderr, peak RSS in KB, seconds)."""
    out, err = open(os.path.join(TMP, "out"), "w+b"), open(os.path.join(TMP, "err"), "w+b")
    stdin = open(stdin_path or os.devnull, "rb")

    def limit():
        if limit_data:
            resource.setrlimit(resource.RLIMIT_DATA, (limit_data, limit_data))
    t0 = time.time()
    p = subprocess.Popen([BIN] + args, stdin=stdin, stdout=out, stderr=err, preexec_fn=limit)
    deadline = t0 + timeout
    while True:
        pid, status, ru = os.wait4(p.pid, os.WNOHANG)
        if pid:
            break
        if time.time() > deadline:
            p.kill()
            pid, status, ru = os.wait4(p.pid, 0)
            break
        time.sleep(0.01)
    p.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.time() - t0
    out.seek(0)
    err.seek(0)
    result = p.returncode, out.read(), err.read().decode(errors="replace"), ru.ru_maxrss, seconds
    for f in (out, err, stdin):
        f.close()
    return result


def one_error(err, want):
    lines = err.strip().splitlines()
    return len(lines) == 1 and "error" in lines[0] and want in lines[0]


def gen_count(err):
    m = re.search(r"\| gen (\d+) tok", err)
    return int(m.group(1)) if m else -1


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


# ==== limits ====

def test_context_limits():
    rc, out, err, _, _ = measure(["-m", MODEL, "-p", "Hello", "-c", "32", "-n", "100", "--temp", "0", "--ignore-eos"])
    check("context full: clear message, the text so far, stats, exit 0",
          rc == 0 and "context full" in err and out.startswith(b"Hello") and len(out) > 5 and
          0 < gen_count(err) <= 32 and "error" not in err, f"exit {rc}, stderr {err[-400:]!r}")
    rc, out, err, _, _ = measure(["-m", MODEL, "-p", "Hello", "-c", "48", "-n", "100000", "--temp", "0", "--ignore-eos", "--no-mtp"])
    check("-n larger than the context: stops at the context", rc == 0 and "context full" in err and 0 < gen_count(err) <= 48,
          f"exit {rc}, stderr {err[-400:]!r}")
    rc, out, err, _, _ = measure(["-m", MODEL, "-p", "Hello", "-n", "0"])
    check("-n 0: the prompt alone, exit 0", rc == 0 and out == b"Hello", f"exit {rc}, {out!r}")


def test_threads():
    rc, out, err, _, _ = measure(["-m", MODEL, "-p", "Hello", "-n", "4", "--temp", "0", "-t", "1024"])
    check("-t above the CPU count: a warning, and it runs", rc == 0 and "warning" in err and "CPUs" in err and len(out) > 5,
          f"exit {rc}, stderr {err[-300:]!r}")
    for bad in ("-1", "-100", "99999", "2x"):
        rc, _, err, _, _ = measure(["-m", MODEL, "-p", "Hello", "-t", bad])
        check(f"-t {bad}: one clear error", rc == 1 and one_error(err, "-t expects"), f"exit {rc}, stderr {err!r}")


def test_empty_prompt():
    path = os.path.join(TMP, "empty.txt")
    open(path, "wb").close()
    rc, _, err, _, _ = measure(["-m", MODEL, "-f", path])
    check("empty prompt file: prompt is empty", rc == 1 and one_error(err, "prompt is empty"), f"exit {rc}, stderr {err!r}")
    rc, _, err, _, _ = measure(["-m", MODEL], stdin_path=path)
    check("empty stdin: prompt is empty", rc == 1 and one_error(err, "prompt is empty"), f"exit {rc}, stderr {err!r}")


def test_huge_prompts():
    line = b"The quick brown fox jumps over the lazy dog. " * 23000   # 1 MB, one line
    one_mb = os.path.join(TMP, "line.txt")
    with open(one_mb, "wb") as f:
        f.write(line)
    rc, _, err, rss, secs = measure(["-m", MODEL, "-n", "4"], stdin_path=one_mb)
    check("1 MB line on stdin: a clear error about the context, at once",
          rc == 1 and one_error(err, "cannot fit in a context") and secs < 20, f"exit {rc} in {secs:.1f} s, stderr {err!r}")
    big = os.path.join(TMP, "big.txt")
    with open(big, "wb") as f:
        for _ in range(100):
            f.write(line)
    rc, _, err, rss, secs = measure(["-m", MODEL, "-f", big, "-n", "4"])
    check("100 MB prompt file: a clear error, in seconds and no more memory than the text",
          rc == 1 and one_error(err, "cannot fit in a context") and secs < 30 and rss < 400 * 1024 + RSS_LIMIT_KB,
          f"exit {rc} in {secs:.1f} s, peak RSS {rss} KB, stderr {err!r}")
    os.unlink(big)

    # --tokenize has no context: the whole line is tokenised, and long texts' piece cache must give
    # the ids each sentence gets alone
    def ids(text):
        path = os.path.join(TMP, "part.txt")
        with open(path, "wb") as f:
            f.write(text)
        rc, out, err, _, _ = measure(["-m", VOCAB, "--tokenize", "-f", path], timeout=300)
        return out.split() if rc == 0 else [f"exit {rc}: {err}"]
    sentence = b"The quick brown fox jumps over the lazy dog."
    want = ids(sentence) + ids(b" " + sentence) * 22999 + ids(b" ")
    t0 = time.time()
    got = ids(line)
    check("1 MB line with --tokenize: the ids its sentences get alone", got == want and time.time() - t0 < 60,
          f"{time.time() - t0:.1f} s, {len(got)} ids, want {len(want)}: {got[:3]}")


# ==== absurd models: rejected before anything big is allocated ====

def test_absurd_models():
    with open(MODEL, "rb") as f:
        good = f.read()
    kvs, tensors = suite.gguf_layout(good)
    ffn = tensors["blk.0.ffn_up.weight"]

    def variant(name, *patches):
        data = bytearray(good)
        for at, fmt, value in patches:
            struct.pack_into(fmt, data, at, value)
        path = os.path.join(TMP, name + ".gguf")
        with open(path, "wb") as f:
            f.write(data)
        return path
    cases = [
        ("vocabulary of 2^40 tokens", [(kvs["tokenizer.ggml.tokens"] + 4, "<Q", 1 << 40)], "truncated or corrupt"),
        ("2^40 tensors", [(8, "<Q", 1 << 40)], "counts larger than the file"),
        ("tensor of 2^80 elements", [(ffn["dims"], "<Q", 1 << 40), (ffn["dims"] + 8, "<Q", 1 << 40)], "tensor shape"),
        ("block_count 2^20", [(kvs["qwen35.block_count"], "<I", 1 << 20)], "implausible block_count"),
        ("context_length 2^30", [(kvs["qwen35.context_length"], "<I", 1 << 30)], "implausible context_length"),
        ("head_count 2^30", [(kvs["qwen35.attention.head_count"], "<I", 1 << 30)], "implausible attention.head_count"),
        ("ssm.inner_size 2^31", [(kvs["qwen35.ssm.inner_size"], "<I", 1 << 31)], "implausible ssm.inner_size"),
        ("feed_forward_length 2^31", [(kvs["qwen35.feed_forward_length"], "<I", 1 << 31)], "implausible feed_forward_length"),
        ("token types as floats", [(kvs["tokenizer.ggml.token_type"], "<I", 6)], "token_type must be"),
    ]
    for name, patches, want in cases:
        rc, _, err, rss, secs = measure(["-m", variant(name.split()[0], *patches), "-p", "x"])
        check(f"absurd model, {name}: rejected, small RSS", rc == 1 and one_error(err, want) and rss < RSS_LIMIT_KB,
              f"exit {rc}, peak RSS {rss} KB, stderr {err!r}")


# ==== memory ====

def test_memory_limits():
    """Under a growing data limit (RLIMIT_DATA: malloc and thread stacks, not the stack or the model's
    read-only mapping) every allocation failure must be a one-line error, never a crash."""
    if ASAN:
        check("allocation failures: skipped under ASan", True)
        return
    bad, outcomes = [], []
    for kb in list(range(256, 24 * 1024, 256)) + [64 * 1024]:
        rc, out, err, _, _ = measure(["-m", MODEL, "-p", "Hello", "-n", "8", "--temp", "0", "-q"], limit_data=kb * 1024)
        outcomes.append(rc)
        if not (rc == 0 or (rc == 1 and one_error(err, "mtp-gen: error:"))):
            bad.append((kb, rc, err[-200:]))
    check("data limits of 256 KB to 24 MB: each run succeeds or fails with one error line", not bad, str(bad[:3]))
    check("data limits: the smallest fail, 64 MB runs", outcomes[0] == 1 and outcomes[-1] == 0 and 0 in outcomes, str(outcomes[::8]))


def test_valgrind():
    if ASAN or not shutil.which("valgrind"):
        check("valgrind: skipped (ASan build or no valgrind)", True)
        return
    for name, args in (("generation", ["-p", "Hello", "-n", "6", "--temp", "0", "-t", "2"]),
                       ("an error exit", ["-p", "Hello", "-c", "999999"])):
        log = os.path.join(TMP, "vg.log")
        r = subprocess.run(["valgrind", "--leak-check=full", "--errors-for-leak-kinds=definite,indirect",
                            "--error-exitcode=99", f"--log-file={log}", BIN, "-m", MODEL] + args,
                           capture_output=True, timeout=300)
        with open(log) as f:
            report = f.read()
        clean = r.returncode != 99 and "ERROR SUMMARY: 0 errors" in report
        check(f"valgrind: {name} has no memory errors or leaks", clean, report[-600:])


# ==== signals and pipes ====

def start(args, **kw):
    return subprocess.Popen([BIN] + args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def read_some(p, n, timeout):
    """Read from p's stdout until n bytes arrived or timeout passed."""
    buf, deadline = b"", time.time() + timeout
    while len(buf) < n and time.time() < deadline:
        if select.select([p.stdout], [], [], 0.1)[0]:
            chunk = os.read(p.stdout.fileno(), 4096)
            if not chunk:
                break
            buf += chunk
    return buf


LONG = ["-m", MODEL, "-p", "Hello", "-n", "3000", "--ignore-eos", "-c", "4096"]


def test_sigpipe():
    for label, extra, restore in (("SIGPIPE default", [], True), ("SIGPIPE ignored", [], False), ("-q", ["-q"], True)):
        p = start(LONG + extra, restore_signals=restore)
        read_some(p, 100, 60)
        p.stdout.close()
        t0 = time.time()
        try:
            err = p.communicate(timeout=30)[1].decode(errors="replace")
        except subprocess.TimeoutExpired:
            p.kill()
            err = p.communicate()[1].decode(errors="replace") + " [still running 30 s later]"
        quiet = "error" not in err.lower() and "broken pipe" not in err.lower() and (not extra or err == "")
        check(f"reader of stdout goes away ({label}): quiet exit 0 or 141 at once",
              p.returncode in (0, -signal.SIGPIPE) and quiet and time.time() - t0 < 10, f"exit {p.returncode}, stderr {err[-300:]!r}")


def test_sigint_and_flushing():
    p = start(LONG)
    got = read_some(p, len(b"Hello") + 20, 60)
    check("stdout to a pipe is flushed per token (text arrives while it runs)", len(got) > len(b"Hello") and p.poll() is None,
          f"{len(got)} bytes, exit {p.poll()}")
    p.send_signal(signal.SIGINT)
    try:
        out, err = p.communicate(timeout=30)
        err = err.decode(errors="replace")
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = b"", "[did not stop within 30 s]"
    n = gen_count(err)
    check("SIGINT in one-shot mode: stops, prints the stats line, exit 0",
          p.returncode == 0 and "interrupted" in err and 0 < n < 3000, f"exit {p.returncode}, stderr {err[-400:]!r}")


# ==== one model file, several processes ====

def test_shared_model():
    before = (sha256(MODEL), os.stat(MODEL).st_mtime_ns)
    args = ["-m", MODEL, "-p", "The quick brown fox", "-n", "24", "--temp", "0", "-t", "1", "-q"]
    procs = [start(args) for _ in range(4)]
    results = [p.communicate(timeout=120) for p in procs]
    alone = subprocess.run([BIN] + args, capture_output=True, timeout=120)
    check("4 processes on one model file at once: all succeed with the output of one alone",
          all(p.returncode == 0 for p in procs) and alone.returncode == 0 and all(out == alone.stdout for out, _ in results),
          str([p.returncode for p in procs]))
    check("the model file is never modified", (sha256(MODEL), os.stat(MODEL).st_mtime_ns) == before)


def main():
    if not os.path.exists(BIN):
        print(f"{BIN} is not built (run make)")
        print("0 passed, 1 failed")
        return 1
    model_before = sha256(MODEL)
    for group in (test_context_limits, test_threads, test_empty_prompt, test_huge_prompts, test_absurd_models,
                  test_memory_limits, test_valgrind, test_sigpipe, test_sigint_and_flushing, test_shared_model):
        t0 = time.time()
        group()
        print(f"     ({group.__name__}: {time.time() - t0:.1f} s)", flush=True)
    check("no test modified the model file", sha256(MODEL) == model_before)
    shutil.rmtree(TMP, ignore_errors=True)
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
