// Forward direction: the masked convolution y = M x, and its inverse x = M^-1 y.
//
// Arrays are contiguous (B, C, H, W); weight is contiguous (C, C/G, kh, kw).
// Every kernel takes its shape and launch choices as one IcParams (see
// common.cuh).
#include "common.cuh"

// y[b, o, h, w] = sum_{il, du, dv} W_eff[o, il, du, dv] * x[b, g*cg + il, h - rs*du, w - cs*dv]
// in one launch; CH in {1, 2, 4} output channels a thread, chosen by the
// launcher from the group size (see ic_masked_conv in common.cuh).
template <typename T, int CH>
__global__ void masked_conv_forward(const T* __restrict__ x, const T* __restrict__ w,
                                    T* __restrict__ y, const IcParams p) {
    ic_masked_conv<T, CH, false>(x, w, y, p);
}

// Scratch for the solves (see ic_prep_slot), in two launches.
// Stage 1, one block per group: L^-1 of the same-pixel block by forward
// substitution, one column per thread (slot 0).
template <typename T>
__global__ void inv_conv_lower_inverse(const T* __restrict__ w, T* __restrict__ prep,
                                       const IcParams p) {
    const int g = blockIdx.x;
    const int cg = p.cg;
    T* linv = prep + ic_prep_slot(p, g, 0);
    for (int j = threadIdx.x; j < cg; j += blockDim.x) {
        // Column j of L^-1: L[r, :] . col = delta(r, j), rows in order; the
        // thread reads back only entries it wrote itself.
        for (int r = 0; r < cg; ++r) {
            T acc = r == j ? T(1) : T(0);
            for (int k = j; k < r; ++k)
                acc -= ic_weight(w, p, g * cg + r, k, 0, 0) * linv[k * cg + j];
            linv[r * cg + j] = r < j ? T(0) : acc / ic_weight(w, p, g * cg + r, r, 0, 0);
        }
    }
}

// Stage 2, one thread per entry: K'_off = L^-1 K_off for every offset but
// (0, 0), i.e. G * (kh*kw - 1) * cg^2 independent dot products of length <= cg
// (L^-1 is lower-triangular: its row o is read up to column o only).
template <typename T>
__global__ void inv_conv_fold_taps(const T* __restrict__ w, T* __restrict__ prep,
                                   const IcParams p) {
    const int cg = p.cg, kw = p.kw;
    const long long per_group = (long long)(p.kh * kw - 1) * cg * cg;
    const long long n = per_group * p.G;
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < n;
         e += (long long)gridDim.x * blockDim.x) {
        const int g = (int)(e / per_group);
        const long long f = e % per_group;
        const int off = 1 + (int)(f / (cg * cg));
        const int o = (int)((f / cg) % cg);
        const int i = (int)(f % cg);
        const int du = off / kw, dv = off % kw;
        const T* linv = prep + ic_prep_slot(p, g, 0) + o * cg;
        T acc = T(0);
        for (int k = 0; k <= o; ++k) acc += linv[k] * ic_weight(w, p, g * cg + k, i, du, dv);
        prep[ic_prep_slot(p, g, off) + o * cg + i] = acc;
    }
}

// x = M^-1 y. One block per (image, group) walks the anti-diagonals of the
// padded-corner coordinates (r, c), r + c = d, with one barrier between
// diagonals: a pixel reads only strictly earlier diagonals. First
// y_hat = L^-1 y (parallel over the slice), then on each diagonal
//   x_p = y_hat_p - sum_{off != 0} K'_off x_{p - off}
// for all (pixel, CH consecutive channels) of the diagonal in parallel: each
// value read from the slice feeds CH sums (CH = 1 or 2, picked by the
// launcher: see default_solve_choice in src/invconv/_kernels.py). Where the slice and the K' table live: see
// ic_solve_begin.
template <typename T, int CH>
__global__ void inv_conv_solve(const T* __restrict__ y, const T* __restrict__ prep,
                               T* __restrict__ x, const IcParams p) {
    IC_DYNAMIC_SHARED(T, smem);
    const IcSolveSlice<T> s = ic_solve_begin(prep, x, smem, p);
    const T* kp = s.kp;
    T* work = s.work;
    const int cg = p.cg, kh = p.kh, kw = p.kw, W = p.W;
    const long long hw = p.hw();
    __syncthreads();

    const T* ys = y + s.offset;
    for (long long e = threadIdx.x; e < cg * hw; e += blockDim.x) {
        const int o = (int)(e / hw);
        const long long q = e % hw;
        T acc = T(0);
        for (int i = 0; i <= o; ++i) acc += kp[o * cg + i] * ys[i * hw + q];
        work[e] = acc;
    }
    __syncthreads();

    const IcLanes lanes = ic_lanes(p);
    const int units = (cg + CH - 1) / CH;
    for (int d = 0; d < p.H + W - 1; ++d) {
        ic_for_diagonal(p, lanes, units, d, [&](int unit, int r, int c) {
            const int o0 = unit * CH;
            const int h = p.image_row(r);
            const int col = p.image_col(c);
            const long long idx = o0 * hw + (long long)h * W + col;
            T acc[CH];
            for (int j = 0; j < CH; ++j) acc[j] = o0 + j < cg ? work[idx + j * hw] : T(0);
            const int dumax = r < kh - 1 ? r : kh - 1;
            const int dvmax = c < kw - 1 ? c : kw - 1;
            for (int du = 0; du <= dumax; ++du) {
                for (int dv = du == 0 ? 1 : 0; dv <= dvmax; ++dv) {
                    const T* k = kp + ((du * kw + dv) * cg + o0) * cg;  // rows o0.. of K'_off
                    const T* src = work + (long long)(h - p.rs * du) * W + (col - p.cs * dv);
                    for (int i = 0; i < cg; ++i) {
                        const T v = src[i * hw];
                        for (int j = 0; j < CH; ++j)
                            if (o0 + j < cg) acc[j] -= k[j * cg + i] * v;
                    }
                }
            }
            for (int j = 0; j < CH; ++j)
                if (o0 + j < cg) work[idx + j * hw] = acc[j];
        });
        __syncthreads();
    }

    if (p.slice_in_smem) {
        for (long long e = threadIdx.x; e < cg * hw; e += blockDim.x) x[s.offset + e] = work[e];
    }
}
