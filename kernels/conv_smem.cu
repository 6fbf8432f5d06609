// The convolutions under schedule "smem" (the default, as smem:1, since the
// H200 measurements of 2026-12-04; see src/invconv/_kernels.py): the masked
// convolution and its adjoint of forward.cu and backward.cu, arranged for
// data reuse. In a file of their own, compiled on first use, so a program
// that only solves does not compile their 36 instantiations.
//
// Arrays are contiguous (B, C, H, W); weight is contiguous (C, C/G, kh, kw).
// Shape and launch choices as one IcParams (see common.cuh).
#include "common.cuh"

// The sums of ic_masked_conv (common.cuh). A block works on one slab at a
// time, group g and CH consecutive own channels c0.. of it (slabs by
// blockIdx.y, grid-stride), with the CH x cg x kh x kw weights the slab reads
// staged in shared memory when p.w_in_smem (else read from w), laid out so
// that the CH weights of one (offset, summed channel) are adjacent:
// slab[((du*kw + dv) * cg + m) * CH + j]. Each thread computes P positions
// (image, pixel) of the slab, so every weight read feeds P sums and every
// input value CH. Blocks take tiles of P * blockDim consecutive positions
// (by blockIdx.x, grid-stride); thread t owns positions t, t + blockDim, ...,
// t + (P-1) blockDim of a tile, so each of its P reads is coalesced across a
// warp. Every output sums the same terms in the same order as ic_masked_conv,
// the ignored same-pixel taps skipped alike.

// The weight coupling own channel c0 + j with summed channel m at offset
// (du, dv): W_eff[own, m] (forward) or W_eff[m, own] (adjoint); ignored
// entries read as 0 without touching w.
template <typename T, bool ADJ>
__device__ __forceinline__ T ic_slab_weight(const T* w, const IcParams& s, int gbase, int c0,
                                            int j, int m, int du, int dv) {
    return ADJ ? ic_weight(w, s, gbase + m, c0 + j, du, dv)
               : ic_weight(w, s, gbase + c0 + j, m, du, dv);
}

// One slab; wts is the staged slab (STAGED) or w itself.
template <typename T, int CH, int P, bool ADJ, bool STAGED>
__device__ __forceinline__ void ic_conv_slab(const T* __restrict__ in, const T* wts,
                                             T* __restrict__ out, const IcParams& s,
                                             int gbase, int c0) {
    const long long hw = s.hw();
    const long long n = (long long)s.B * hw;            // positions of the slab
    const long long span = (long long)P * blockDim.x;   // positions of a tile
    // A thread's next position is blockDim.x further: that step as (images,
    // rows, columns), added with carries instead of divided out per position.
    const long long step_b = blockDim.x / hw;
    const int step_row = (int)(blockDim.x % hw) / s.W, step_col = (int)(blockDim.x % hw) % s.W;
    const int own_hi = s.cg - c0 < CH ? s.cg - c0 : CH;   // own channels of the slab
    for (long long tile = blockIdx.x; tile * span < n; tile += gridDim.x) {
        long long q = tile * span + threadIdx.x;
        long long b = q / hw;
        int row = (int)(q % hw) / s.W, col = (int)(q % hw) % s.W;
        long long base[P];   // channel 0 of the group in the position's image
        int rows[P], cols[P];
        bool live[P];
        for (int k = 0; k < P; ++k) {
            live[k] = q < n;
            base[k] = (b * s.C + gbase) * hw;
            rows[k] = row;
            cols[k] = col;
            q += blockDim.x;
            b += step_b;
            row += step_row;
            col += step_col;
            if (col >= s.W) { col -= s.W; ++row; }
            if (row >= s.H) { row -= s.H; ++b; }
        }
        T acc[CH][P];
        for (int j = 0; j < CH; ++j)
            for (int k = 0; k < P; ++k) acc[j][k] = T(0);
        for (int du = 0; du < s.kh; ++du) {
            for (int dv = 0; dv < s.kw; ++dv) {
                long long src[P];   // the input pixel of channel 0 of the group
                bool ok[P];         // inside the image, for a live position
                bool any = false;
                for (int k = 0; k < P; ++k) {
                    const int sh = ADJ ? rows[k] + s.rs * du : rows[k] - s.rs * du;
                    const int sw = ADJ ? cols[k] + s.cs * dv : cols[k] - s.cs * dv;
                    ok[k] = live[k] && sh >= 0 && sh < s.H && sw >= 0 && sw < s.W;
                    src[k] = base[k] + (long long)sh * s.W + sw;
                    any = any || ok[k];
                }
                if (!any) continue;
                const T* wt = wts + (long long)(du * s.kw + dv) * s.cg * CH;  // STAGED only
                // Summed channels: all, but for the lower-triangular same-pixel
                // block (see ic_masked_conv) only m <= own (forward) or m >= own
                // (adjoint); the rest is skipped, not multiplied by 0.
                const bool same = du == 0 && dv == 0;
                const int mlo = same && ADJ ? c0 : 0;
                const int mhi = same && !ADJ ? c0 + own_hi : s.cg;
                for (int m = mlo; m < mhi; ++m) {
                    T v[P];
                    for (int k = 0; k < P; ++k) v[k] = ok[k] ? in[src[k] + m * hw] : T(0);
                    for (int j = 0; j < CH; ++j) {
                        if (j >= own_hi || (same && (ADJ ? m < c0 + j : m > c0 + j))) continue;
                        const T wj = STAGED ? wt[m * CH + j]
                                            : ic_slab_weight<T, ADJ>(wts, s, gbase, c0, j, m, du, dv);
                        for (int k = 0; k < P; ++k)
                            if (ok[k]) acc[j][k] += wj * v[k];
                    }
                }
            }
        }
        for (int k = 0; k < P; ++k) {
            if (!live[k]) continue;
            T* op = out + base[k] + (long long)c0 * hw + (long long)rows[k] * s.W + cols[k];
            for (int j = 0; j < CH; ++j)
                if (j < own_hi) op[j * hw] = acc[j][k];
        }
    }
}

template <typename T, int CH, int P, bool ADJ>
__device__ __forceinline__ void ic_masked_conv_slabs(const T* __restrict__ in,
                                                     const T* __restrict__ w,
                                                     T* __restrict__ out, const IcParams& s) {
    IC_DYNAMIC_SHARED(T, slab);
    const int chunks = (s.cg + CH - 1) / CH;
    const long long staged = (long long)s.kh * s.kw * s.cg * CH;
    for (int e = blockIdx.y; e < s.G * chunks; e += gridDim.y) {   // block-uniform
        const int gbase = e / chunks * s.cg, c0 = e % chunks * CH;
        if (!s.w_in_smem) {
            ic_conv_slab<T, CH, P, ADJ, false>(in, w, out, s, gbase, c0);
            continue;
        }
        for (long long f = threadIdx.x; f < staged; f += blockDim.x) {
            const int j = (int)(f % CH);
            const int m = (int)(f / CH % s.cg);
            const int off = (int)(f / CH / s.cg);
            // Weights of own channels past the group's end are never read.
            if (c0 + j < s.cg)
                slab[f] = ic_slab_weight<T, ADJ>(w, s, gbase, c0, j, m, off / s.kw, off % s.kw);
        }
        __syncthreads();
        ic_conv_slab<T, CH, P, ADJ, true>(in, slab, out, s, gbase, c0);
        __syncthreads();   // every thread is done with the slab before the next one
    }
}

// y = M x, the sums of masked_conv_forward.
template <typename T, int CH, int P>
__global__ void masked_conv_forward_smem(const T* __restrict__ x, const T* __restrict__ w,
                                         T* __restrict__ y, const IcParams p) {
    ic_masked_conv_slabs<T, CH, P, false>(x, w, y, p);
}

// grad_x = M^T g, the sums of masked_conv_adjoint.
template <typename T, int CH, int P>
__global__ void masked_conv_adjoint_smem(const T* __restrict__ g, const T* __restrict__ w,
                                         T* __restrict__ gx, const IcParams p) {
    ic_masked_conv_slabs<T, CH, P, true>(g, w, gx, p);
}
