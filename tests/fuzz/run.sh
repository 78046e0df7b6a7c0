#!/bin/sh
# tests/fuzz/run.sh [SECONDS]: build every libFuzzer harness in tests/fuzz with ASan + UBSan and
# run each for SECONDS (default 60) from its seed corpus in tests/fuzz/corpus/TARGET.  Prints one
# line per target with its executions, then "N passed, N failed" (a target passes with no
# finding).  A crash, leak, timeout or out-of-memory input is copied to tests/fuzz/findings/TARGET/
# with the fuzzer's log, and the script exits non-zero.  Replay one with
#   $FUZZ_DIR/TARGET tests/fuzz/findings/TARGET/crash-...
# Needs clang with libFuzzer (Debian: clang libclang-rt-14-dev); CC=... picks another clang,
# FUZZ_TARGETS="gguf json" runs only those.
cd "$(dirname "$0")/../.." || exit 1
secs=${1:-60}
cc=${CC:-clang}
work=${FUZZ_DIR:-${TMPDIR:-/tmp}/mtp-fuzz}
flags="-g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer"
warn="-Wall -Wextra -Wshadow -Wno-unused-parameter -Wno-unused-function"
mkdir -p "$work"

if ! echo 'int LLVMFuzzerTestOneInput(const char *d, unsigned long n) { return 0; }' |
        $cc $flags -x c - -o "$work/probe" 2>/dev/null; then
    echo "fuzz: $cc cannot build libFuzzer targets (apt-get install clang libclang-rt-14-dev)"
    echo "0 passed, 1 failed"
    exit 1
fi

# target, maximum input length, sources besides the harness
targets="gguf:262144:kernels vocab:65536:kernels tokenizer:8192:kernels cli:1024:kernels json:16384: safetensors:32768:"
pass=0
fail=0
total=0
for spec in $targets; do
    t=${spec%%:*}
    case " ${FUZZ_TARGETS:-$t} " in *" $t "*) ;; *) continue ;; esac
    rest=${spec#*:}
    max_len=${rest%%:*}
    srcs=""
    [ "${rest#*:}" = kernels ] && srcs="kernels/scalar.c kernels/avx2.c kernels/avx512.c kernels/neon.c"
    if ! $cc $flags $warn -o "$work/$t" "tests/fuzz/$t.c" $srcs -lm -lpthread 2>"$work/$t.build"; then
        cat "$work/$t.build"
        echo "fuzz $t: build failed"
        fail=$((fail + 1))
        continue
    fi
    [ -s "$work/$t.build" ] && cat "$work/$t.build"   # warnings
    rm -rf "$work/$t.corpus" "$work/$t.out"
    mkdir -p "$work/$t.corpus" "$work/$t.out"
    # the first corpus directory takes new inputs, so the committed seeds stay as they are
    "$work/$t" -max_total_time="$secs" -max_len="$max_len" -timeout=10 -rss_limit_mb=2048 \
        -close_fd_mask=3 -print_final_stats=1 -artifact_prefix="$work/$t.out/" \
        "$work/$t.corpus" "tests/fuzz/corpus/$t" >"$work/$t.log" 2>&1
    rc=$?
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$work/$t.log" | tail -n 1)
    found=$(ls "$work/$t.out" | grep -v '^slow-unit-' | wc -l)
    cov=$(grep -o 'cov: [0-9]*' "$work/$t.log" | tail -n 1)
    echo "fuzz $t: ${execs:-0} executions in $secs s, ${cov:-cov: ?}, $found findings (exit $rc)"
    total=$((total + ${execs:-0}))
    if [ "$rc" -ne 0 ] || [ "$found" -gt 0 ]; then
        mkdir -p "tests/fuzz/findings/$t"
        cp "$work/$t.out"/* "$work/$t.log" "tests/fuzz/findings/$t/" 2>/dev/null
        grep -A 30 -E '^==[0-9]+==|runtime error|check failed|deadly signal' "$work/$t.log" | head -n 60
        fail=$((fail + 1))
    else
        pass=$((pass + 1))
    fi
done
echo "fuzz: $total executions in all"
echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]
