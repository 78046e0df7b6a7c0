#!/usr/bin/env python3
"""Chat tests: mtp-gen's REPL driven through a pseudo-terminal (os.forkpty).

Covers: a turn costs only its new tokens and continues exactly as a one-shot
run on the whole conversation; /save then /load in a new process continues
identically (greedy and sampled); another model's file is refused; Ctrl-C
stops a reply and the conversation goes on; Ctrl-C / Ctrl-D at an empty prompt
exit; line editing (cursor, history, Ctrl-A/E/U/W/K, UTF-8, continuation lines,
bracketed paste); thinking shown faint or hidden; template detection; full
context with and without --ctx-shift; /mtp; plain stdin keeps the pipe
behaviour.

Usage: python3 tests/test_repl.py   (after `make`; MTP_GEN / MTP_RUNNER as in tests/run.py)
Python standard library only.  Prints `N passed, N failed` last.
"""
import fcntl, json, os, re, select, struct, subprocess, sys, tempfile, termios, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "tests", "fixtures")
BIN = os.environ.get("MTP_GEN", os.path.join(ROOT, "mtp-gen"))
RUNNER = os.environ.get("MTP_RUNNER", "").split()
DENSE = os.path.join(FIX, "qwen35-dense", "gguf", "model-q8_0.gguf")
MOE = os.path.join(FIX, "qwen35-moe", "gguf", "model-q8_0.gguf")
TMP = tempfile.mkdtemp(prefix="mtp-repl-")
SLOW = 20 if RUNNER or "asan" in os.path.basename(BIN) else 1   # timeouts scale under emulation / sanitizers
BASE = ["-t", "1", "--temp", "0", "-c", "512", "-n", "12"]

passed, failed = 0, 0


def check(name, ok, detail=""):
    global passed, failed
    passed += bool(ok)
    failed += not ok
    print(f"{'ok  ' if ok else 'FAIL'} {name}{'  ' + detail if detail and not ok else ''}", flush=True)


ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]")
PROMPT = rb"\x1b\[J> "


class Session:
    """mtp-gen in a pseudo-terminal; expect() reads until a pattern shows up."""

    def __init__(self, args, cols=200):
        self.pid, self.fd = os.forkpty()
        if self.pid == 0:
            os.environ["TERM"] = "xterm"
            argv = RUNNER + [BIN] + args
            try:
                os.execvp(argv[0], argv)
            finally:
                os._exit(127)
        fcntl.ioctl(self.fd, termios.TIOCSWINSZ, struct.pack("HHHH", 40, cols, 0, 0))
        self.out, self.pos, self.status = b"", 0, None

    def _read(self, timeout):
        r, _, _ = select.select([self.fd], [], [], timeout)
        if not r:
            return False
        try:
            data = os.read(self.fd, 65536)
        except OSError:
            data = b""
        if not data:
            raise EOFError
        self.out += data
        return True

    def expect(self, pattern, timeout=30):
        rx = re.compile(pattern, re.S)
        deadline = time.time() + timeout * SLOW
        while True:
            m = rx.search(self.out, self.pos)
            if m:
                self.pos = m.end()
                return m
            left = deadline - time.time()
            if left <= 0:
                raise TimeoutError(f"waiting for {pattern!r}; last output {self.out[-400:]!r}")
            self._read(left)

    def send(self, data):
        os.write(self.fd, data.encode() if isinstance(data, str) else data)

    def prompt(self):
        self.expect(PROMPT)

    def turn(self, text):
        """Send a message; return (reply bytes as displayed, prompt tokens of the turn, raw reply)."""
        self.send(text + "\r")
        m = self.expect(rb"\r\n(.*?)(?:\x1b\[2m)?\[prompt (\d+) tok[^\]]*\]")
        raw = m.group(1)
        self.prompt()
        return displayed(raw), int(m.group(2)), raw

    def command(self, text, answer):
        self.send(text + "\r")
        m = self.expect(answer)
        self.prompt()
        return m

    def finish(self, timeout=30):
        deadline = time.time() + timeout * SLOW
        try:
            while time.time() < deadline:
                self._read(deadline - time.time())
        except EOFError:
            pass
        _, status = os.waitpid(self.pid, 0)
        os.close(self.fd)
        self.status = os.waitstatus_to_exitcode(status)
        return self.status

    def kill(self):
        if self.status is None:
            try:
                os.kill(self.pid, 9)
                os.waitpid(self.pid, 0)
                os.close(self.fd)
            except OSError:
                pass


def displayed(raw):
    """What a reply looks like as text: no escape sequences, newlines back from the terminal's CRLF."""
    text = ANSI.sub(b"", raw).replace(b"\r\n", b"\n")
    return text[:-1] if text.endswith(b"\n") else text


def run(args, stdin=None, timeout=60):
    return subprocess.run(RUNNER + [BIN] + args, input=stdin, capture_output=True, timeout=timeout * SLOW)


def tokenize(text):
    return [int(x) for x in run(["-m", DENSE, "--tokenize", "-p", text]).stdout.split()]


def read_save(path):
    """The conversation text and token ids of a /save file (layout in mtp.c, 'saving a conversation')."""
    with open(path, "rb") as f:
        d = f.read()
    fields = struct.unpack_from("<8sIIQQiiiiiiiiQQ64s", d, 0)
    n_toks, text_bytes = fields[5], fields[14]
    text = d[144:144 + text_bytes]
    toks = list(struct.unpack_from(f"<{n_toks}i", d, 144 + text_bytes))
    return text, toks


def session(args, model=DENSE):
    s = Session(["-m", model] + BASE + args)
    s.prompt()
    return s


# ---- GGUF with another chat template ----

def gguf_with_template(src, dst, template):
    """Copy a GGUF, replacing tokenizer.chat_template (the data section moves to the new alignment)."""
    with open(src, "rb") as f:
        d = f.read()
    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
    pos = 24
    n_tensors, n_kv = struct.unpack_from("<QQ", d, 8)

    def string():
        nonlocal pos
        (n,) = struct.unpack_from("<Q", d, pos)
        pos += 8 + n
        return d[pos - n:pos]

    def skip(t):
        nonlocal pos
        if t == 8:
            string()
        elif t == 9:
            et, n = struct.unpack_from("<IQ", d, pos)
            pos += 12
            for _ in range(n):
                skip(et) if et in (8, 9) else None
            if et not in (8, 9):
                pos += n * sizes[et]
        else:
            pos += sizes[t]

    alignment, span = 32, None
    for _ in range(n_kv):
        start = pos
        key = string()
        (t,) = struct.unpack_from("<I", d, pos)
        pos += 4
        if key == b"general.alignment":
            (alignment,) = struct.unpack_from("<I", d, pos)
        skip(t)
        if key == b"tokenizer.chat_template":
            span = (start, pos)
    for _ in range(n_tensors):
        string()
        (nd,) = struct.unpack_from("<I", d, pos)
        pos += 4 + 8 * nd + 4 + 8
    data = (pos + alignment - 1) // alignment * alignment
    key, value = b"tokenizer.chat_template", template.encode()
    kv = struct.pack("<Q", len(key)) + key + struct.pack("<IQ", 8, len(value)) + value
    head = d[:span[0]] + kv + d[span[1]:pos]
    head += b"\0" * (-len(head) % alignment)
    with open(dst, "wb") as f:
        f.write(head + d[data:])


QWEN35_TAIL = ("{%- for message in messages %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
               "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
               "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}"
               "{%- else %}{{- '<think>\\n' }}{%- endif %}{%- endif %}")
OTHER = "{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}"


# ---- the tests ----

def test_two_turns():
    s = session(["-i", "--no-think"])
    r1, n1, _ = s.turn("Hello there")
    r2, n2, _ = s.turn("How are you")
    save = os.path.join(TMP, "two.chat")
    s.command(f"/save {save}", rb"\[saved (\d+) tokens")
    s.send("\x04")
    check("repl: Ctrl-D at an empty prompt exits 0", s.finish() == 0, f"status {s.status}")
    text, toks = read_save(save)
    first = "<|im_start|>user\nHello there<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    check("repl: turn 1 prompt is the ChatML turn with an empty think block", n1 == len(tokenize(first)), f"{n1}")
    turn2 = text[text.rindex(b"<|im_end|>\n<|im_start|>user\nHow are you"):]
    turn2 = turn2[:turn2.index(b"</think>\n\n") + 10]
    n_turn2 = len(tokenize(turn2.decode("utf-8", "surrogateescape")))
    check("repl: turn 2 processes only its own tokens", n2 == n_turn2 and n2 < len(toks) // 2,
          f"turn 2 counted {n2}, its text has {n_turn2}, conversation {len(toks)}")
    check("repl: replies hide template tokens", b"<|im" not in r1 + r2 and b"think>" not in r1 + r2)
    check("repl: conversation text re-tokenises to the same ids", tokenize(text.decode("utf-8", "surrogateescape")) == toks)
    whole = text[:text.rindex(b"</think>\n\n") + 10]
    path = os.path.join(TMP, "whole.txt")
    with open(path, "wb") as f:
        f.write(whole)
    one = run(["-m", DENSE, "-f", path, "--no-display-prompt", "-q"] + BASE)
    check("repl: turn 2 equals a one-shot run on the whole conversation", one.stdout == r2, f"{one.stdout!r} vs {r2!r}")
    ids = run(["-m", DENSE, "-f", path, "-q", "--ids"] + BASE).stdout.split()
    check("repl: turn 2 tokens equal the one-shot's", [int(x) for x in ids] == toks[len(toks) - len(ids):])
    return r1, r2


def test_save_load(r2_expected):
    save = os.path.join(TMP, "resume.chat")
    a = session(["--no-think"])
    a.turn("Hello there")
    a.command(f"/save {save}", rb"\[saved")
    a.send("\x03")
    check("repl: Ctrl-C at an empty prompt exits 0", a.finish() == 0, f"status {a.status}")
    b = session(["--no-think"])
    b.command(f"/load {save}", rb"\[loaded [^\]]*: (\d+) tokens\]")
    r2, n2, _ = b.turn("How are you")
    check("repl: /load in a new process continues identically", r2 == r2_expected, f"{r2!r} vs {r2_expected!r}")
    c = session(["--no-think"], model=MOE)
    m = c.command(f"/load {save}", rb"cannot load [^\r\n]*")
    check("repl: another model's file is refused", b"was saved with another model" in m.group(0), m.group(0).decode(errors="replace"))
    r, _, _ = c.turn("Hello there")
    check("repl: a refused load leaves the session usable", len(r) > 0)
    c.send("/quit\r")
    c.finish()
    b.send("/quit\r")
    b.finish()

    sampled = ["--temp", "0.9", "--top-k", "0", "--top-p", "1", "--min-p", "0", "--draft", "2"]
    a = session(["--no-think", "--seed", "7"] + sampled)
    a.turn("Hello there")
    a.command(f"/save {save}", rb"\[saved")
    want, _, _ = a.turn("Tell me more")
    a.send("/quit\r")
    a.finish()
    b = session(["--no-think", "--seed", "12345"] + sampled)
    b.command(f"/load {save}", rb"\[loaded")
    got, _, _ = b.turn("Tell me more")
    check("repl: /load continues a sampled conversation identically (random state saved)", got == want, f"{got!r} vs {want!r}")
    b.send("/quit\r")
    b.finish()
    with open(save, "rb") as f:
        data = f.read()
    bad = os.path.join(TMP, "truncated.chat")
    with open(bad, "wb") as f:
        f.write(data[:len(data) - 100])
    b = session(["--no-think"])
    m = b.command(f"/load {bad}", rb"cannot load [^\r\n]*")
    check("repl: a truncated file is refused", b"truncated" in m.group(0), m.group(0).decode(errors="replace"))
    b.send("/quit\r")
    b.finish()


def test_interrupt():
    s = Session(["-m", DENSE, "-t", "1", "--temp", "0", "--ignore-eos", "--no-think", "-n", "2000"])
    s.prompt()

    def interrupted(text):
        s.send(text + "\r")
        s.expect(rb"\r\n(?:\x1b\[\?2004l)?[^\r\n\x1b]{20}")    # some of the reply is out
        s.send("\x03")
        m = s.expect(rb"\[stopped\].*?\[prompt (\d+) tok, [^|]*\| reply (\d+) tok")
        s.prompt()
        return int(m.group(1)), int(m.group(2))

    _, n_reply = interrupted("Write a long story")
    check("repl: Ctrl-C stops a reply and returns to the prompt", 0 < n_reply < 2000, f"{n_reply} tokens")
    n2, _ = interrupted("Go on")
    want = len(tokenize("<|im_end|>\n<|im_start|>user\nGo on<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"))
    check("repl: after Ctrl-C the next turn closes the cut reply and continues", n2 == want, f"{n2} vs {want}")
    s.kill()


def test_editing():
    s = session([])          # no -i: a terminal on stdin and stdout and no prompt open the chat
    check("repl: mtp-gen -m MODEL on a terminal opens the chat", True)
    # cursor moves, backspace, Ctrl-W, UTF-8
    s.command("/systex\x7fm hello wörld" + "\x1b[D" * 5 + "\x17", rb"\[system prompt set")
    m = s.command("/system", rb"\[system prompt: ([^\]]*)\]")
    check("repl: editing: Left x5 over UTF-8, Ctrl-W, Backspace", m.group(1) == "wörld".encode(), repr(m.group(1)))
    # history (Up twice), Ctrl-A, Right, Ctrl-K, wide characters
    s.command("\x1b[A\x1b[A\x01" + "\x1b[C" * 8 + "\x0bünï 字", rb"\[system prompt set")
    m = s.command("/system", rb"\[system prompt: ([^\]]*)\]")
    check("repl: editing: history, Ctrl-A, Right, Ctrl-K", m.group(1) == "ünï 字".encode(), repr(m.group(1)))
    # Ctrl-U clears, Ctrl-A / Ctrl-E move, Delete
    s.command("garbage\x15tem X\x01/sys\x05\x7fY\x01\x1b[3~/", rb"\[system prompt set")
    m = s.command("/system", rb"\[system prompt: ([^\]]*)\]")
    check("repl: editing: Ctrl-U, Ctrl-A, Ctrl-E, Delete", m.group(1) == b"Y", repr(m.group(1)))
    # a trailing backslash continues the line
    s.send("/system one\\\r")
    s.expect(rb"\.\.\. ")
    s.command("two", rb"\[system prompt set")
    m = s.command("/system", rb"\[system prompt: (.*?)\]")
    check("repl: a trailing backslash continues the line", m.group(1).replace(b"\r\n", b"\n") == b"one\ntwo", repr(m.group(1)))
    # a bracketed paste keeps its newlines
    s.command("\x1b[200~/system p1\rp2\x1b[201~", rb"\[system prompt set")
    m = s.command("/system", rb"\[system prompt: (.*?)\]")
    check("repl: a bracketed paste keeps its newlines", m.group(1).replace(b"\r\n", b"\n") == b"p1\np2", repr(m.group(1)))
    s.send("some text\x03")
    s.expect(rb"\^C")
    s.prompt()
    s.send("/nope\r")
    s.expect(rb"unknown command '/nope'")
    s.prompt()
    s.send("/quit\r")
    check("repl: Ctrl-C on a line cancels it, /quit exits 0", s.finish() == 0, f"status {s.status}")


def test_thinking():
    model = os.path.join(TMP, "qwen35-think.gguf")
    gguf_with_template(DENSE, model, QWEN35_TAIL)
    s = session([], model=model)
    _, n1, raw = s.turn("Hello there")
    want = len(tokenize("<|im_start|>user\nHello there<|im_end|>\n<|im_start|>assistant\n<think>\n"))
    check("repl: a Qwen3.5 template opens the think block when thinking", n1 == want, f"{n1} vs {want}")
    check("repl: thinking is shown faint", b"\x1b[2m" in raw, repr(raw[:80]))
    s.send("/quit\r")
    s.finish()
    h = session(["--hide-think"], model=model)
    _, _, hidden = h.turn("Hello there")
    h.send("/quit\r")
    h.finish()
    shown = displayed(re.sub(rb"\x1b\[2m.*?(\x1b\[22m|$)", b"", raw, flags=re.S))
    check("repl: --hide-think hides exactly the thinking", displayed(hidden) == shown, f"{displayed(hidden)!r} vs {shown!r}")
    with open(os.path.join(FIX, "tokenizer", "qwen3-tokenizer_config.json")) as f:
        qwen3 = os.path.join(TMP, "qwen3-template.gguf")
        gguf_with_template(DENSE, qwen3, json.load(f)["chat_template"])
    s = session([], model=qwen3)
    _, n1, _ = s.turn("Hello there")
    want = len(tokenize("<|im_start|>user\nHello there<|im_end|>\n<|im_start|>assistant\n"))
    check("repl: Qwen3's template leaves the think block to the model", n1 == want, f"{n1} vs {want}")
    s.send("/quit\r")
    s.finish()
    other = os.path.join(TMP, "other-template.gguf")
    gguf_with_template(DENSE, other, OTHER)
    r = run(["-m", other, "-i"], stdin=b"hi\n")
    check("repl: a template other than ChatML is refused clearly",
          r.returncode != 0 and b"not ChatML" in r.stderr, r.stderr.decode(errors="replace")[-200:])


def test_context():
    s = session(["-c", "90", "--no-think"])
    for text in ["Hello there", "How are you"]:
        s.turn(text)
    s.send("Tell me more\r")
    s.expect(rb"\[the context is full: /reset")
    s.prompt()
    s.send("Again\r")
    s.expect(rb"context full \(\d+ of 90 tokens used")
    s.prompt()
    s.command("/reset", rb"\[new conversation\]")
    r, n, _ = s.turn("Hello there")
    check("repl: a full context stops the reply and refuses the next turn until /reset", n < 30 and len(r) > 0)
    s.send("/quit\r")
    s.finish()
    s = session(["-c", "90", "--no-think", "--ctx-shift"])
    for text in ["Hello there", "How are you"]:
        s.turn(text)
    s.send("Tell me more\r")
    m = s.expect(rb"\[context shift: dropped the (\d+) oldest turns? \((\d+) tokens\); reading the (\d+) kept again\]")
    m2 = s.expect(rb"\[prompt (\d+) tok")
    s.prompt()
    check("repl: --ctx-shift drops the oldest turns and re-reads the rest",
          int(m.group(1)) >= 1 and int(m2.group(1)) == int(m.group(3)) and int(m.group(3)) <= 40, m.group(0).decode())
    r, _, _ = s.turn("And then")
    check("repl: the conversation goes on after a shift", len(r) > 0)
    s.send("/quit\r")
    s.finish()


def test_mtp_commands(r1, r2):
    s = session(["--no-think", "--no-mtp"])
    a, _, raw = s.turn("Hello there")
    s.command("/mtp 5", rb"\[mtp on: 5 drafts per step\]")
    b, _, _ = s.turn("How are you")
    m = s.command("/stats", rb"mtp-gen: load .*?prompt (\d+) tok.*?\r\nmtp-gen: mtp: steps (\d+)")
    check("repl: --no-mtp then /mtp 5 gives the same greedy replies", (a, b) == (r1, r2), f"{a!r} {b!r}")
    check("repl: /stats shows the last turn with MTP on", int(m.group(2)) > 0, m.group(0)[:200].decode(errors="replace"))
    check("repl: with drafting off the turn line has no MTP part", b"mtp" not in raw)
    s.command("/mtp off", rb"\[mtp off\]")
    s.command("/think off", rb"\[thinking off\]")
    s.send("/quit\r")
    s.finish()


def test_pipes(r1, r2):
    one = run(["-m", DENSE, "-p", "Hello there", "-q"] + BASE)
    piped = run(["-m", DENSE, "-q"] + BASE, stdin=b"Hello there")
    check("pipe: stdin that is not a terminal is still a one-shot prompt", piped.returncode == 0 and piped.stdout == one.stdout)
    chat = run(["-m", DENSE, "-i", "--no-think", "-q"] + BASE, stdin=b"Hello there\nHow are you\n")
    check("pipe: -i reads plain lines as turns", chat.returncode == 0 and chat.stdout == r1 + b"\n" + r2 + b"\n",
          f"{chat.stdout!r}")
    templ = "<|im_start|>user\nHello there<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    a = run(["-m", DENSE, "-p", "Hello there", "--chat", "--no-think", "-q"] + BASE)
    b = run(["-m", DENSE, "-p", templ, "--no-display-prompt", "-q"] + BASE)
    check("--chat applies the template to a one-shot prompt", a.returncode == 0 and a.stdout == b.stdout == r1,
          f"{a.stdout!r} {b.stdout!r} {r1!r}")


def guarded(name, fn, *args):
    """Run one group; a hang or a crash of the binary fails the group instead of the suite."""
    try:
        return fn(*args)
    except (TimeoutError, EOFError, OSError, subprocess.TimeoutExpired, ValueError) as e:
        check(f"repl: {name} ran to the end", False, f"{type(e).__name__}: {e}")


def main():
    t0 = time.time()
    r1, r2 = guarded("two turns", test_two_turns) or (None, None)
    guarded("save/load", test_save_load, r2)
    guarded("interrupt", test_interrupt)
    guarded("editing", test_editing)
    guarded("thinking", test_thinking)
    guarded("context", test_context)
    guarded("mtp", test_mtp_commands, r1, r2)
    guarded("pipes", test_pipes, r1, r2)
    print(f"# test_repl: {time.time() - t0:.1f} s", flush=True)
    print(f"{passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
