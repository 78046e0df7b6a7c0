/* avx512.c - kernels for x86-64 with AVX-512 F, BW and VL. */
#include "kn_impl.h"

#ifdef KN_ISA_AVX512
void kn_matmul(int wtype, const void *w, size_t w_row_bytes, int64_t n_in, int64_t i0, int64_t i1,
               const void *act, size_t act_stride, int nr, float *y, int64_t y_stride)
{
    kn_avx2_matmul(wtype, w, w_row_bytes, n_in, i0, i1, act, act_stride, nr, y, y_stride);
}

float kn_dot(const float *a, const float *b, int64_t n) { return kn_sc_dot(a, b, n); }
void  kn_axpy(float *y, float a, const float *x, int64_t n) { kn_sc_axpy(y, a, x, n); }
void  kn_scale(float *y, float a, int64_t n) { kn_sc_scale(y, a, n); }
void  kn_rmsnorm(float *out, const float *x, const float *w, int64_t n, float eps) { kn_sc_rmsnorm(out, x, w, n, eps); }
void  kn_swiglu(float *out, const float *gate, const float *up, int64_t n) { kn_sc_swiglu(out, gate, up, n); }

void kn_delta_step(float *S, const float *q, const float *k, const float *v,
                   float decay, float beta, float *out, int dk, int dv)
{
    kn_sc_delta_step(S, q, k, v, decay, beta, out, dk, dv);
}
#endif
