/* avx512_emu.h - test-only: the AVX-512 intrinsics avx512.c uses, in plain C.
 *
 * avx512.c cannot run on a machine without AVX-512, yet it must not go
 * untested.  Force-included ahead of everything, this header pulls in the
 * real <immintrin.h> (for the AVX2 half of the build and the 512-bit
 * types), then redirects each 512-bit intrinsic to a lane-by-lane C
 * version, and finally claims the target macros so kn_impl.h selects the
 * AVX-512 kernels.  Undefined upper halves of casts are filled with junk so
 * a kernel that relies on them fails.  Build and run with
 *
 *   cc -O1 -march=native -w -include kernels/avx512_emu.h [-DEMU_VNNI] \
 *      -o test_kernels-emu512 tests/test_kernels.c kernels/*.c -lm -lpthread
 *   ./test_kernels-emu512          (prints "kernels: avx512")
 *
 * The CPU check is told the features are there.
 */
#ifndef AVX512_EMU_H
#define AVX512_EMU_H
#include <immintrin.h>
#include <string.h>
#include <math.h>
#include <stdint.h>
/* ==== Lanes ==== */
typedef union { __m512i v; int8_t b[64]; uint8_t ub[64]; int16_t h[32]; uint16_t uh[32]; int32_t i[16]; int64_t q[8]; uint64_t uq[8]; float f[16]; } EU;
static inline EU eu_i(__m512i v) { EU u; memcpy(&u, &v, 64); return u; }
static inline EU eu_f(__m512 v) { EU u; memcpy(&u, &v, 64); return u; }
static inline __m512i ei(EU u) { __m512i v; memcpy(&v, &u, 64); return v; }
static inline __m512 ef(EU u) { __m512 v; memcpy(&v, &u, 64); return v; }
static inline EU junk(void) { EU u; memset(&u, 0xA7, 64); return u; }
/* ==== Intrinsics ==== */
#define DEFI(name, args, ...) static inline __m512i emu_##name args { EU r; __VA_ARGS__; return ei(r); }
#define DEFF(name, args, ...) static inline __m512 emu_##name args { EU r; __VA_ARGS__; return ef(r); }
#define _mm512_loadu_si512 emu_loadu_si512
DEFI(loadu_si512, (const void *p), memcpy(&r, p, 64))
#define _mm512_storeu_si512 emu_storeu_si512
static inline void emu_storeu_si512(void *p, __m512i a) { memcpy(p, &a, 64); }
#define _mm512_mask_storeu_ps emu_mask_storeu_ps
static inline void emu_mask_storeu_ps(void *p, __mmask16 m, __m512 a) { EU x = eu_f(a); for (int k = 0; k < 16; k++) if (m >> k & 1) memcpy((float *)p + k, &x.f[k], 4); }
#define _mm512_loadu_ps emu_loadu_ps
DEFF(loadu_ps, (const float *p), memcpy(&r, p, 64))
#define _mm512_set1_epi8 emu_set1_epi8
DEFI(set1_epi8, (char c), memset(&r, c, 64))
#define _mm512_set1_epi16 emu_set1_epi16
DEFI(set1_epi16, (short c), for (int k = 0; k < 32; k++) r.h[k] = c)
#define _mm512_set1_epi32 emu_set1_epi32
DEFI(set1_epi32, (int c), for (int k = 0; k < 16; k++) r.i[k] = c)
#define _mm512_set4_epi32 emu_set4_epi32
DEFI(set4_epi32, (int d, int c, int b, int a), int t[4] = {a, b, c, d}; for (int k = 0; k < 16; k++) r.i[k] = t[k % 4])
#define _mm512_set1_ps emu_set1_ps
DEFF(set1_ps, (float c), for (int k = 0; k < 16; k++) r.f[k] = c)
#define _mm512_setzero_si512 emu_setzero_si512
DEFI(setzero_si512, (void), memset(&r, 0, 64))
#define _mm512_setzero_ps emu_setzero_ps
DEFF(setzero_ps, (void), memset(&r, 0, 64))
#define _mm512_set_epi32 emu_set_epi32
DEFI(set_epi32, (int e15, int e14, int e13, int e12, int e11, int e10, int e9, int e8, int e7, int e6, int e5, int e4, int e3, int e2, int e1, int e0),
     int t[16] = {e0, e1, e2, e3, e4, e5, e6, e7, e8, e9, e10, e11, e12, e13, e14, e15}; memcpy(r.i, t, 64))
#define _mm512_set_epi64 emu_set_epi64
DEFI(set_epi64, (long long e7, long long e6, long long e5, long long e4, long long e3, long long e2, long long e1, long long e0),
     long long t[8] = {e0, e1, e2, e3, e4, e5, e6, e7}; memcpy(r.q, t, 64))
#define _mm512_inserti64x4 emu_inserti64x4
DEFI(inserti64x4, (__m512i a, __m256i b, int imm), r = eu_i(a); memcpy(r.ub + 32 * (imm & 1), &b, 32))
#define _mm512_castsi256_si512 emu_castsi256_si512
DEFI(castsi256_si512, (__m256i a), r = junk(); memcpy(&r, &a, 32))
#define _mm512_castsi128_si512 emu_castsi128_si512
DEFI(castsi128_si512, (__m128i a), r = junk(); memcpy(&r, &a, 16))
#define _mm512_castps128_ps512 emu_castps128_ps512
DEFF(castps128_ps512, (__m128 a), r = junk(); memcpy(&r, &a, 16))
#define _mm512_castsi512_si256 emu_castsi512_si256
static inline __m256i emu_castsi512_si256(__m512i a) { __m256i r; memcpy(&r, &a, 32); return r; }
#define _mm512_castsi512_ps emu_castsi512_ps
DEFF(castsi512_ps, (__m512i a), r = eu_i(a))
#define _mm512_broadcast_i64x4 emu_broadcast_i64x4
DEFI(broadcast_i64x4, (__m256i a), memcpy(&r, &a, 32); memcpy(r.ub + 32, &a, 32))
#define _mm512_dpbusd_epi32 emu_dpbusd_epi32
DEFI(dpbusd_epi32, (__m512i acc, __m512i a, __m512i b), EU x = eu_i(a), y = eu_i(b); r = eu_i(acc);
     for (int k = 0; k < 64; k++) r.i[k / 4] += x.ub[k] * y.b[k])
#define _mm512_dpwssd_epi32 emu_dpwssd_epi32
DEFI(dpwssd_epi32, (__m512i acc, __m512i a, __m512i b), EU x = eu_i(a), y = eu_i(b); r = eu_i(acc);
     for (int k = 0; k < 32; k++) r.i[k / 2] += x.h[k] * y.h[k])
#define _mm512_add_epi32 emu_add_epi32
DEFI(add_epi32, (__m512i a, __m512i b), EU x = eu_i(a), y = eu_i(b); for (int k = 0; k < 16; k++) r.i[k] = x.i[k] + y.i[k])
#define _mm512_sub_epi32 emu_sub_epi32
DEFI(sub_epi32, (__m512i a, __m512i b), EU x = eu_i(a), y = eu_i(b); for (int k = 0; k < 16; k++) r.i[k] = x.i[k] - y.i[k])
#define _mm512_madd_epi16 emu_madd_epi16
DEFI(madd_epi16, (__m512i a, __m512i b), EU x = eu_i(a), y = eu_i(b);
     for (int k = 0; k < 16; k++) r.i[k] = x.h[2 * k] * y.h[2 * k] + x.h[2 * k + 1] * y.h[2 * k + 1])
#define _mm512_maddubs_epi16 emu_maddubs_epi16
DEFI(maddubs_epi16, (__m512i a, __m512i b), EU x = eu_i(a), y = eu_i(b);
     for (int k = 0; k < 32; k++) { int s = x.ub[2 * k] * y.b[2 * k] + x.ub[2 * k + 1] * y.b[2 * k + 1];
         r.h[k] = (short)(s > 32767 ? 32767 : s < -32768 ? -32768 : s); })
#define _mm512_abs_epi8 emu_abs_epi8
DEFI(abs_epi8, (__m512i a), EU x = eu_i(a); for (int k = 0; k < 64; k++) r.ub[k] = (uint8_t)(x.b[k] < 0 ? -x.b[k] : x.b[k]))
#define _mm512_movepi8_mask emu_movepi8_mask
static inline __mmask64 emu_movepi8_mask(__m512i a) { EU x = eu_i(a); __mmask64 m = 0; for (int k = 0; k < 64; k++) m |= (__mmask64)(x.b[k] < 0) << k; return m; }
#define _mm512_test_epi8_mask emu_test_epi8_mask
static inline __mmask64 emu_test_epi8_mask(__m512i a, __m512i b) { EU x = eu_i(a), y = eu_i(b); __mmask64 m = 0; for (int k = 0; k < 64; k++) m |= (__mmask64)((x.ub[k] & y.ub[k]) != 0) << k; return m; }
#define _mm512_mask_sub_epi8 emu_mask_sub_epi8
DEFI(mask_sub_epi8, (__m512i src, __mmask64 m, __m512i a, __m512i b), EU s = eu_i(src), x = eu_i(a), y = eu_i(b);
     for (int k = 0; k < 64; k++) r.b[k] = (m >> k & 1) ? (int8_t)(x.b[k] - y.b[k]) : s.b[k])
#define _mm512_maskz_loadu_epi8 emu_maskz_loadu_epi8
DEFI(maskz_loadu_epi8, (__mmask64 m, const void *p), for (int k = 0; k < 64; k++) r.ub[k] = (m >> k & 1) ? ((const uint8_t *)p)[k] : 0)
#define _mm512_maskz_mov_epi8 emu_maskz_mov_epi8
DEFI(maskz_mov_epi8, (__mmask64 m, __m512i a), EU x = eu_i(a); for (int k = 0; k < 64; k++) r.ub[k] = (m >> k & 1) ? x.ub[k] : 0)
#define _mm_maskz_loadu_ps emu_mm_maskz_loadu_ps
static inline __m128 emu_mm_maskz_loadu_ps(__mmask8 m, const void *p) { float t[4]; for (int k = 0; k < 4; k++) t[k] = (m >> k & 1) ? ((const float *)p)[k] : 0; return _mm_loadu_ps(t); }
#define _mm512_permutexvar_epi16 emu_permutexvar_epi16
DEFI(permutexvar_epi16, (__m512i idx, __m512i a), EU ix = eu_i(idx), x = eu_i(a); for (int k = 0; k < 32; k++) r.h[k] = x.h[ix.uh[k] & 31])
#define _mm512_permutexvar_ps emu_permutexvar_ps
DEFF(permutexvar_ps, (__m512i idx, __m512 a), EU ix = eu_i(idx), x = eu_f(a); for (int k = 0; k < 16; k++) r.f[k] = x.f[ix.i[k] & 15])
#define _mm512_and_si512 emu_and_si512
DEFI(and_si512, (__m512i a, __m512i b), EU x = eu_i(a), y = eu_i(b); for (int k = 0; k < 8; k++) r.uq[k] = x.uq[k] & y.uq[k])
#define _mm512_andnot_si512 emu_andnot_si512
DEFI(andnot_si512, (__m512i a, __m512i b), EU x = eu_i(a), y = eu_i(b); for (int k = 0; k < 8; k++) r.uq[k] = ~x.uq[k] & y.uq[k])
#define _mm512_ternarylogic_epi32 emu_ternarylogic_epi32
DEFI(ternarylogic_epi32, (__m512i a, __m512i b, __m512i c, int imm), EU x = eu_i(a), y = eu_i(b), z = eu_i(c);
     for (int k = 0; k < 512; k++) { int i = k / 64, s = k % 64, v = imm >> ((x.uq[i] >> s & 1) << 2 | (y.uq[i] >> s & 1) << 1 | (z.uq[i] >> s & 1)) & 1;
         r.uq[i] = (r.uq[i] & ~(1ull << s)) | (uint64_t)v << s; })
#define _mm512_shuffle_epi8 emu_shuffle_epi8
DEFI(shuffle_epi8, (__m512i a, __m512i b), EU x = eu_i(a), y = eu_i(b);
     for (int k = 0; k < 64; k++) r.ub[k] = y.ub[k] & 0x80 ? 0 : x.ub[(k & ~15) | (y.ub[k] & 15)])
#define _mm512_or_si512 emu_or_si512
DEFI(or_si512, (__m512i a, __m512i b), EU x = eu_i(a), y = eu_i(b); for (int k = 0; k < 8; k++) r.uq[k] = x.uq[k] | y.uq[k])
#define _mm512_srli_epi16 emu_srli_epi16
DEFI(srli_epi16, (__m512i a, int c), EU x = eu_i(a); for (int k = 0; k < 32; k++) r.uh[k] = (uint16_t)(x.uh[k] >> c))
#define _mm512_srli_epi32 emu_srli_epi32
DEFI(srli_epi32, (__m512i a, int c), EU x = eu_i(a); for (int k = 0; k < 16; k++) r.i[k] = (int32_t)((uint32_t)x.i[k] >> c))
#define _mm512_slli_epi32 emu_slli_epi32
DEFI(slli_epi32, (__m512i a, int c), EU x = eu_i(a); for (int k = 0; k < 16; k++) r.i[k] = (int32_t)((uint32_t)x.i[k] << c))
#define _mm512_sllv_epi64 emu_sllv_epi64
DEFI(sllv_epi64, (__m512i a, __m512i c), EU x = eu_i(a), s = eu_i(c); for (int k = 0; k < 8; k++) r.uq[k] = s.uq[k] > 63 ? 0 : x.uq[k] << s.uq[k])
#define _mm512_srlv_epi64 emu_srlv_epi64
DEFI(srlv_epi64, (__m512i a, __m512i c), EU x = eu_i(a), s = eu_i(c); for (int k = 0; k < 8; k++) r.uq[k] = s.uq[k] > 63 ? 0 : x.uq[k] >> s.uq[k])
#define _mm512_cvtepi32_ps emu_cvtepi32_ps
DEFF(cvtepi32_ps, (__m512i a), EU x = eu_i(a); for (int k = 0; k < 16; k++) r.f[k] = (float)x.i[k])
#define _mm512_cvtph_ps emu_cvtph_ps
DEFF(cvtph_ps, (__m256i a), uint16_t t[16]; memcpy(t, &a, 32); for (int k = 0; k < 16; k++) r.f[k] = _cvtsh_ss(t[k]))
#define _mm512_cvtepi16_epi32 emu_cvtepi16_epi32
DEFI(cvtepi16_epi32, (__m256i a), int16_t t[16]; memcpy(t, &a, 32); for (int k = 0; k < 16; k++) r.i[k] = t[k])
#define _mm512_cvtepi8_epi32 emu_cvtepi8_epi32
DEFI(cvtepi8_epi32, (__m128i a), int8_t t[16]; memcpy(t, &a, 16); for (int k = 0; k < 16; k++) r.i[k] = t[k])
#define _mm512_cvtepu16_epi32 emu_cvtepu16_epi32
DEFI(cvtepu16_epi32, (__m256i a), uint16_t t[16]; memcpy(t, &a, 32); for (int k = 0; k < 16; k++) r.i[k] = t[k])
#define _mm512_fmadd_ps emu_fmadd_ps
DEFF(fmadd_ps, (__m512 a, __m512 b, __m512 c), EU x = eu_f(a), y = eu_f(b), z = eu_f(c); for (int k = 0; k < 16; k++) r.f[k] = fmaf(x.f[k], y.f[k], z.f[k]))
#define _mm512_fmsub_ps emu_fmsub_ps
DEFF(fmsub_ps, (__m512 a, __m512 b, __m512 c), EU x = eu_f(a), y = eu_f(b), z = eu_f(c); for (int k = 0; k < 16; k++) r.f[k] = fmaf(x.f[k], y.f[k], -z.f[k]))
#define _mm512_mul_ps emu_mul_ps
DEFF(mul_ps, (__m512 a, __m512 b), EU x = eu_f(a), y = eu_f(b); for (int k = 0; k < 16; k++) r.f[k] = x.f[k] * y.f[k])
#define _mm512_add_ps emu_add_ps
DEFF(add_ps, (__m512 a, __m512 b), EU x = eu_f(a), y = eu_f(b); for (int k = 0; k < 16; k++) r.f[k] = x.f[k] + y.f[k])
#define _mm512_sub_ps emu_sub_ps
DEFF(sub_ps, (__m512 a, __m512 b), EU x = eu_f(a), y = eu_f(b); for (int k = 0; k < 16; k++) r.f[k] = x.f[k] - y.f[k])
#define _mm512_storeu_ps emu_storeu_ps
static inline void emu_storeu_ps(void *p, __m512 a) { memcpy(p, &a, 64); }
#define _mm512_shuffle_f32x4 emu_shuffle_f32x4
DEFF(shuffle_f32x4, (__m512 a, __m512 b, int imm), EU x = eu_f(a), y = eu_f(b); for (int k = 0; k < 16; k++) r.f[k] = (k < 8 ? x : y).f[4 * ((imm >> (2 * (k / 4))) & 3) + k % 4])
#define _mm512_unpacklo_ps emu_unpacklo_ps
DEFF(unpacklo_ps, (__m512 a, __m512 b), EU x = eu_f(a), y = eu_f(b); for (int k = 0; k < 16; k++) r.f[k] = (k & 1 ? y : x).f[4 * (k / 4) + (k % 4) / 2])
#define _mm512_unpackhi_ps emu_unpackhi_ps
DEFF(unpackhi_ps, (__m512 a, __m512 b), EU x = eu_f(a), y = eu_f(b); for (int k = 0; k < 16; k++) r.f[k] = (k & 1 ? y : x).f[4 * (k / 4) + 2 + (k % 4) / 2])
#define _mm512_shuffle_ps emu_shuffle_ps
DEFF(shuffle_ps, (__m512 a, __m512 b, int imm), EU x = eu_f(a), y = eu_f(b); for (int k = 0; k < 16; k++) r.f[k] = (k % 4 < 2 ? x : y).f[4 * (k / 4) + ((imm >> (2 * (k % 4))) & 3)])
#define _mm512_castps512_ps256 emu_castps512_ps256
static inline __m256 emu_castps512_ps256(__m512 a) { __m256 r; memcpy(&r, &a, 32); return r; }
#define _mm512_setr_epi32 emu_setr_epi32
DEFI(setr_epi32, (int e0, int e1, int e2, int e3, int e4, int e5, int e6, int e7, int e8, int e9, int e10, int e11, int e12, int e13, int e14, int e15),
     int v[16] = {e0, e1, e2, e3, e4, e5, e6, e7, e8, e9, e10, e11, e12, e13, e14, e15}; memcpy(&r, v, 64))
#define _mm512_reduce_add_ps emu_reduce_add_ps
static inline float emu_reduce_add_ps(__m512 a) { EU x = eu_f(a); float s = 0; for (int k = 0; k < 16; k++) s += x.f[k]; return s; }

#define _mm512_castps_si512 emu_castps_si512
DEFI(castps_si512, (__m512 a), r = eu_f(a))
#define _mm512_max_epu32 emu_max_epu32
DEFI(max_epu32, (__m512i a, __m512i b), EU x = eu_i(a), y = eu_i(b); for (int k = 0; k < 16; k++) r.i[k] = (uint32_t)x.i[k] > (uint32_t)y.i[k] ? x.i[k] : y.i[k])
#define _mm512_reduce_max_epu32 emu_reduce_max_epu32
static inline unsigned emu_reduce_max_epu32(__m512i a) { EU x = eu_i(a); uint32_t m = 0; for (int k = 0; k < 16; k++) m = (uint32_t)x.i[k] > m ? (uint32_t)x.i[k] : m; return m; }
#define _mm512_reduce_add_epi32 emu_reduce_add_epi32
static inline int emu_reduce_add_epi32(__m512i a) { EU x = eu_i(a); uint32_t s = 0; for (int k = 0; k < 16; k++) s += (uint32_t)x.i[k]; return (int)s; }
#define _mm512_cvttps_epi32 emu_cvttps_epi32   /* in range only, as the kernels use it */
DEFI(cvttps_epi32, (__m512 a), EU x = eu_f(a); for (int k = 0; k < 16; k++) r.i[k] = (int32_t)x.f[k])
#define _mm512_cvtepi32_epi8 emu_cvtepi32_epi8
static inline __m128i emu_cvtepi32_epi8(__m512i a) { EU x = eu_i(a); int8_t t[16]; for (int k = 0; k < 16; k++) t[k] = (int8_t)x.i[k]; return _mm_loadu_si128((const __m128i *)t); }
#define _mm512_cmp_ps_mask emu_cmp_ps_mask     /* the predicate the kernels use: _CMP_LT_OQ */
static inline __mmask16 emu_cmp_ps_mask(__m512 a, __m512 b, int pred) { EU x = eu_f(a), y = eu_f(b); __mmask16 m = 0; (void)pred; for (int k = 0; k < 16; k++) m |= (__mmask16)(x.f[k] < y.f[k]) << k; return m; }
#define _mm512_mask_blend_ps emu_mask_blend_ps
DEFF(mask_blend_ps, (__mmask16 m, __m512 a, __m512 b), EU x = eu_f(a), y = eu_f(b); for (int k = 0; k < 16; k++) r.f[k] = (m >> k & 1 ? y : x).f[k])

/* ==== Claim the target ==== */
#define KN_EMULATE_AVX512 1
#define __builtin_cpu_supports(feature) 1
#define __AVX512F__ 1
#define __AVX512BW__ 1
#define __AVX512VL__ 1
#ifdef EMU_VNNI
#define __AVX512VNNI__ 1
#endif
#endif
