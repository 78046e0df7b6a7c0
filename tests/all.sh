#!/bin/sh
# The whole suite, as CI runs it: the native build, the same tests under
# AddressSanitizer + UBSan, the NEON kernels built with the aarch64 cross
# compiler and run under qemu-user, the AVX-512 kernels under intrinsic
# emulation (with VNNI too, on a CPU without it), the AVX2 build on an
# AVX-512 machine, and each fuzz harness for a bounded time.  Ends with one
# "N passed, N failed" line that adds up every part.
cd "$(dirname "$0")/.." || exit 1
total_pass=0
total_fail=0
part() {   # part NAME COMMAND...: run a suite, add its closing counts
    name=$1
    shift
    echo "==== $name ===="
    log=$(mktemp)
    { "$@" 2>&1; echo $? > "$log.rc"; } | tee "$log" | grep --line-buffered -v '^[0-9]* passed, [0-9]* failed$'
    rc=$(cat "$log.rc")
    line=$(grep '^[0-9]* passed, [0-9]* failed$' "$log" | tail -n 1)
    rm -f "$log" "$log.rc"
    p=$(echo "$line" | cut -d' ' -f1)
    f=$(echo "$line" | cut -d' ' -f3)
    [ -n "$p" ] || { p=0; f=1; }
    [ "$rc" -eq 0 ] || [ "$f" -gt 0 ] || f=1
    echo "$name: $p passed, $f failed"
    total_pass=$((total_pass + p))
    total_fail=$((total_fail + f))
}
part native python3 tests/run.py
native_macros=$(cc -march=native -dM -E - </dev/null)   # what this CPU has, for the parts below
if make -s test_kernels-emu512 >/dev/null; then
    part avx512-emulated ./test_kernels-emu512
else
    echo "avx512-emulated build failed"; total_fail=$((total_fail + 1))
fi
# The VNNI kernels (the packed layouts an AVX-512 VNNI CPU runs) on a CPU
# without VNNI, which the native part then never reaches.
if ! echo "$native_macros" | grep -q __AVX512VNNI__; then
    if make -s test_kernels-emu512-vnni >/dev/null; then
        part avx512-vnni-emulated ./test_kernels-emu512-vnni
    else
        echo "avx512-vnni-emulated build failed"; total_fail=$((total_fail + 1))
    fi
fi
# On an AVX-512 machine the native build runs the AVX-512 kernels; the AVX2
# ones, which most x86 CPUs run, get a build and a quick pass of their own.
if echo "$native_macros" | grep -q __AVX512F__; then
    if make -s ARCH=x86-64-v3 SUFFIX=-avx2 >/dev/null; then
        part avx2 env MTP_GEN=./mtp-gen-avx2 MTP_QUICK=1 python3 tests/run.py
    else
        echo "avx2 build failed"; total_fail=$((total_fail + 1))
    fi
fi
if make -s asan >/dev/null; then
    part asan env MTP_GEN=./mtp-gen-asan MTP_QUICK=1 ASAN_OPTIONS=detect_leaks=1 python3 tests/run.py
    part robust-asan env MTP_GEN=./mtp-gen-asan ASAN_OPTIONS=detect_leaks=1 python3 tests/test_robust.py
else
    echo "asan build failed"; total_fail=$((total_fail + 1))
fi
if command -v aarch64-linux-gnu-gcc >/dev/null && command -v qemu-aarch64 >/dev/null; then
    if make -s CROSS=aarch64 >/dev/null; then
        part neon env MTP_GEN=./mtp-gen-aarch64 MTP_RUNNER=qemu-aarch64 MTP_QUICK=1 MTP_CASES=short python3 tests/run.py
    else
        echo "aarch64 build failed"; total_fail=$((total_fail + 1))
    fi
else
    echo "neon: skipped (install gcc-aarch64-linux-gnu and qemu-user)"
fi
part fuzz sh tests/fuzz/run.sh "${FUZZ_SECONDS:-20}"
echo "$total_pass passed, $total_fail failed"
[ "$total_fail" -eq 0 ]
