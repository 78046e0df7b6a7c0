# mtp-gen: one C program plus one kernel file chosen for the target ISA.
#   make                 native build (-march=native; the compiler's macros pick the kernels)
#   make ARCH=x86-64-v3  or any -march value; ARCH=scalar builds the portable kernels only
#   make CROSS=aarch64   NEON build with Debian's aarch64 cross compiler (run it under qemu-aarch64)
#   make asan            AddressSanitizer + UBSan build (mtp-gen-asan)
#   make test            build everything and run the test suite
CC      ?= cc
ARCH    ?= native
CFLAGS  ?= -O2 -g
WARN    := -Wall -Wextra -Wshadow -Wno-unused-parameter
LDLIBS  := -lm -lpthread

ifeq ($(CROSS),aarch64)
  CC := aarch64-linux-gnu-gcc
  MARCH := -march=armv8.2-a+fp16+dotprod
  SUFFIX ?= -aarch64
  LDFLAGS += -static
else ifeq ($(ARCH),scalar)
  MARCH := -DKN_FORCE_SCALAR
  SUFFIX ?= -scalar
else
  MARCH := -march=$(ARCH)
endif
SUFFIX ?=

KERNEL_SRC := kernels/scalar.c kernels/avx2.c kernels/avx512.c kernels/neon.c
HDRS := $(wildcard kernels/*.h) $(wildcard tools/*.h)

all: mtp-gen$(SUFFIX) mtp-convert$(SUFFIX) test_kernels$(SUFFIX) test_units$(SUFFIX)

# the built-in default model (tools/train/README.md), embedded with .incbin when the GGUF is there
DEFAULT_MODEL := $(wildcard tools/train/default-q8_0.gguf)
MODEL_ASM := $(if $(DEFAULT_MODEL),tools/train/model.S)

mtp-gen$(SUFFIX): mtp.c $(KERNEL_SRC) $(HDRS) $(MODEL_ASM) $(DEFAULT_MODEL)
	$(CC) $(CFLAGS) $(MARCH) $(WARN) -o $@ mtp.c $(KERNEL_SRC) $(MODEL_ASM) $(LDFLAGS) $(LDLIBS)

mtp-convert$(SUFFIX): tools/convert.c tools/quant.h
	$(CC) $(CFLAGS) $(MARCH) $(WARN) -o $@ tools/convert.c $(LDFLAGS) $(LDLIBS)

bandwidth: tools/bandwidth.c
	$(CC) -O3 $(MARCH) $(WARN) -o $@ tools/bandwidth.c $(LDLIBS)

test_kernels$(SUFFIX): tests/test_kernels.c $(KERNEL_SRC) $(HDRS)
	$(CC) $(CFLAGS) $(MARCH) $(WARN) -o $@ tests/test_kernels.c $(KERNEL_SRC) $(LDFLAGS) $(LDLIBS)

test_units$(SUFFIX): tests/test_units.c mtp.c $(KERNEL_SRC) $(HDRS)
	$(CC) $(CFLAGS) $(MARCH) $(WARN) -Wno-unused-function -o $@ tests/test_units.c $(KERNEL_SRC) $(LDFLAGS) $(LDLIBS)

ASAN_FLAGS := -O1 -g -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=all
# the AVX-512 kernels on a CPU without AVX-512: their intrinsics emulated in C (kernels/avx512_emu.h);
# -vnni also emulates VNNI, which switches on the packed sixteen-row layouts
EMU512 := $(CC) -O1 -march=native -w -Wno-psabi -include kernels/avx512_emu.h
test_kernels-emu512: tests/test_kernels.c $(KERNEL_SRC) $(HDRS)
	$(EMU512) -o $@ tests/test_kernels.c $(KERNEL_SRC) $(LDLIBS)
test_kernels-emu512-vnni: tests/test_kernels.c $(KERNEL_SRC) $(HDRS)
	$(EMU512) -DEMU_VNNI -o $@ tests/test_kernels.c $(KERNEL_SRC) $(LDLIBS)

asan:
	$(MAKE) mtp-gen-asan mtp-convert-asan test_kernels-asan test_units-asan SUFFIX=-asan CFLAGS="$(ASAN_FLAGS)"

# the whole suite: native, sanitizers, NEON under qemu (tests/all.sh)
test: all
	sh tests/all.sh

clean:
	rm -f mtp-gen mtp-gen-* bandwidth mtp-convert mtp-convert-* test_kernels test_kernels-* test_units test_units-*

.PHONY: all asan test clean
