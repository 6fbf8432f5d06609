// The solves under schedule "slices:S" (off by default: no GPU has timed it
// yet; see src/invconv/_kernels.py): S (image, group) slices a block, for
// small slices at large batch (issue 17, item 5: 100x1x28x28 spends 1.2 us a
// diagonal step with one 32-thread block a slice). A block walks the
// anti-diagonals of its S slices together, one __syncthreads() a step for
// all of them, and each thread owns fixed (slice, channel, place) lanes
// worked out once (IcSliceLanes), so a step costs no integer division. The
// maths is that of inv_conv_solve and inv_conv_solve_adjoint (forward.cu,
// backward.cu) with one channel a thread: every output sums the same terms
// in the same order. In a file of its own, compiled on first use.
//
// Arrays are contiguous (B, C, H, W); the scratch prep as in forward.cu. Shape
// and launch choices as one IcParams (see common.cuh); p.slices = S.
#include "common.cuh"

// Slice j of the B*G slices is image j / G, group j % G. Block blockIdx.x
// owns slices first = blockIdx.x * S, ..., first + count - 1 (the last block
// may own fewer). Dynamic shared layout: [the K' tables of all G groups if
// p.kp_in_smem][the block's count slices if p.slice_in_smem]; without
// p.slice_in_smem the slices are solved in place in the output (global
// writes are visible to the block after __syncthreads).
template <typename T>
struct IcSliceBlock {
    long long first;    // the block's first slice
    int count;          // its slices
    int g0;             // group of its first slice
    const T* kp;        // prep, or its copy in shared memory (see ic_prep_slot)
    T* work;            // the block's slices, slice_len apart
    long long slice_len;
};

template <typename T>
__device__ __forceinline__ IcSliceBlock<T> ic_slice_block(const T* __restrict__ prep, T* out,
                                                          T* smem, const IcParams& p) {
    IcSliceBlock<T> b;
    const long long total = (long long)p.B * p.G;
    b.first = (long long)blockIdx.x * p.slices;
    b.count = total - b.first < p.slices ? (int)(total - b.first) : p.slices;
    b.g0 = (int)(b.first % p.G);
    b.slice_len = (long long)p.cg * p.hw();
    const long long nkp = (long long)p.G * p.kh * p.kw * p.cg * p.cg;
    b.kp = prep;
    if (p.kp_in_smem) {
        for (long long e = threadIdx.x; e < nkp; e += blockDim.x) smem[e] = prep[e];
        b.kp = smem;
    }
    b.work = p.slice_in_smem ? smem + (p.kp_in_smem ? nkp : 0) : out + b.first * b.slice_len;
    return b;
}

// Thread t owns lanes t, t + blockDim, ... of a count x cg x L grid (L =
// min(H, W), the longest diagonal), slice-major: lane = (s * cg + o) * L + k
// is channel o of slice s at place k of a diagonal. The lanes are walked as
// mixed-radix digits (s, o, k): blockDim.x is split into digits once, and
// each next lane adds them with carries (each digit below its radix, so one
// carry at most per digit). The group g of slice s is carried along the same
// way (mod G), so the body never divides either.
struct IcSliceLanes {
    int s0, o0, k0, g0;   // the thread's first lane and the group of its slice
    int ds, dof, dk, dg;  // blockDim.x as digits (dg = ds mod G)
    int L;
};

__device__ __forceinline__ IcSliceLanes ic_slice_lanes(const IcParams& p, int g_first) {
    IcSliceLanes l;
    l.L = p.H < p.W ? p.H : p.W;
    const int per_slice = p.cg * l.L;
    l.s0 = threadIdx.x / per_slice;
    l.o0 = threadIdx.x % per_slice / l.L;
    l.k0 = threadIdx.x % l.L;
    l.ds = blockDim.x / per_slice;
    l.dof = blockDim.x % per_slice / l.L;
    l.dk = blockDim.x % l.L;
    l.dg = l.ds % p.G;
    l.g0 = (g_first + l.s0) % p.G;
    return l;
}

// body(s, g, o, r, c) once for every (slice, channel, pixel) of diagonal d
// (padded-corner coordinates r + c = d) of the block's count slices.
template <typename F>
__device__ __forceinline__ void ic_for_slice_diagonal(const IcParams& p, const IcSliceLanes& l,
                                                      int count, int d, F&& body) {
    const int rmin = p.diag_first(d);
    const int npix = p.diag_length(d);
    int s = l.s0, o = l.o0, k = l.k0, g = l.g0;
    while (s < count) {
        if (k < npix) body(s, g, o, rmin + k, d - rmin - k);
        s += l.ds;
        g += l.dg;
        o += l.dof;
        k += l.dk;
        if (k >= l.L) { k -= l.L; ++o; }
        if (o >= p.cg) { o -= p.cg; ++s; ++g; }
        if (g >= p.G) g -= p.G;
    }
}

// x = M^-1 y for S slices a block: y_hat = L^-1 y, then on each diagonal
//   x_p = y_hat_p - sum_{off != 0} K'_off x_{p - off}.
template <typename T>
__global__ void inv_conv_solve_slices(const T* __restrict__ y, const T* __restrict__ prep,
                                      T* __restrict__ x, const IcParams p) {
    IC_DYNAMIC_SHARED(T, smem);
    const IcSliceBlock<T> blk = ic_slice_block(prep, x, smem, p);
    const int cg = p.cg, kh = p.kh, kw = p.kw, W = p.W;
    const long long hw = p.hw(), len = blk.slice_len;
    __syncthreads();

    const T* ys = y + blk.first * len;
    for (long long e = threadIdx.x; e < blk.count * len; e += blockDim.x) {
        const long long s = e / len;
        const int o = (int)(e % len / hw);
        const long long q = e % hw;
        const T* linv = blk.kp + ic_prep_slot(p, (int)((blk.first + s) % p.G), 0);
        T acc = T(0);
        for (int i = 0; i <= o; ++i) acc += linv[o * cg + i] * ys[s * len + i * hw + q];
        blk.work[e] = acc;
    }
    __syncthreads();

    const IcSliceLanes lanes = ic_slice_lanes(p, blk.g0);
    for (int d = 0; d < p.H + W - 1; ++d) {
        ic_for_slice_diagonal(p, lanes, blk.count, d, [&](int s, int g, int o, int r, int c) {
            T* ws = blk.work + s * len;
            const T* kp = blk.kp + ic_prep_slot(p, g, 0);
            const int h = p.image_row(r);
            const int col = p.image_col(c);
            const long long idx = o * hw + (long long)h * W + col;
            T acc = ws[idx];
            const int dumax = r < kh - 1 ? r : kh - 1;
            const int dvmax = c < kw - 1 ? c : kw - 1;
            for (int du = 0; du <= dumax; ++du) {
                for (int dv = du == 0 ? 1 : 0; dv <= dvmax; ++dv) {
                    const T* k = kp + ((du * kw + dv) * cg + o) * cg;  // row o of K'_off
                    const T* src = ws + (long long)(h - p.rs * du) * W + (col - p.cs * dv);
                    for (int i = 0; i < cg; ++i) acc -= k[i] * src[i * hw];
                }
            }
            ws[idx] = acc;
        });
        __syncthreads();
    }

    if (p.slice_in_smem) {
        T* xs = x + blk.first * len;
        for (long long e = threadIdx.x; e < blk.count * len; e += blockDim.x) xs[e] = blk.work[e];
    }
}

// grad_y = M^-T grad_x for S slices a block: on each diagonal in reverse
//   g_hat_q = grad_x_q - sum_{off != 0} K'^T_off g_hat_{q + off},
// then grad_y_q = L^-T g_hat_q.
template <typename T>
__global__ void inv_conv_solve_adjoint_slices(const T* __restrict__ gx,
                                              const T* __restrict__ prep, T* __restrict__ gy,
                                              const IcParams p) {
    IC_DYNAMIC_SHARED(T, smem);
    const IcSliceBlock<T> blk = ic_slice_block(prep, gy, smem, p);
    const int cg = p.cg, kh = p.kh, kw = p.kw, H = p.H, W = p.W;
    const long long hw = p.hw(), len = blk.slice_len;
    const T* gxs = gx + blk.first * len;
    for (long long e = threadIdx.x; e < blk.count * len; e += blockDim.x) blk.work[e] = gxs[e];
    __syncthreads();

    const IcSliceLanes lanes = ic_slice_lanes(p, blk.g0);
    for (int d = H + W - 2; d >= 0; --d) {
        ic_for_slice_diagonal(p, lanes, blk.count, d, [&](int s, int g, int i, int r, int c) {
            T* ws = blk.work + s * len;
            const T* kp = blk.kp + ic_prep_slot(p, g, 0);
            const int h = p.image_row(r);
            const int col = p.image_col(c);
            const long long idx = i * hw + (long long)h * W + col;
            T acc = ws[idx];
            const int dumax = H - 1 - r < kh - 1 ? H - 1 - r : kh - 1;
            const int dvmax = W - 1 - c < kw - 1 ? W - 1 - c : kw - 1;
            for (int du = 0; du <= dumax; ++du) {
                for (int dv = du == 0 ? 1 : 0; dv <= dvmax; ++dv) {
                    const T* k = kp + (du * kw + dv) * cg * cg + i;  // column i of K'_off
                    const T* src = ws + (long long)(h + p.rs * du) * W + (col + p.cs * dv);
                    for (int o = 0; o < cg; ++o) acc -= k[o * cg] * src[o * hw];
                }
            }
            ws[idx] = acc;
        });
        __syncthreads();
    }

    // grad_y_q[i] = sum_{o >= i} L^-1[o, i] g_hat_q[o], one thread per (slice,
    // pixel). Ascending i reads only g_hat entries not yet overwritten, so
    // this is safe in place (work inside gy) as well as from shared memory.
    T* out = gy + blk.first * len;
    for (long long e = threadIdx.x; e < blk.count * hw; e += blockDim.x) {
        const long long s = e / hw, q = e % hw;
        const T* linv = blk.kp + ic_prep_slot(p, (int)((blk.first + s) % p.G), 0);
        const T* ws = blk.work + s * len;
        for (int i = 0; i < cg; ++i) {
            T acc = T(0);
            for (int o = i; o < cg; ++o) acc += linv[o * cg + i] * ws[o * hw + q];
            out[s * len + i * hw + q] = acc;
        }
    }
}
