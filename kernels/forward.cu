// Forward direction: the masked convolution y = M x, and its inverse x = M^-1 y.
//
// Arrays are contiguous (B, C, H, W); weight is contiguous (C, C/G, kh, kw).
// Every kernel takes the shape as (B, C, H, W, G, kh, kw, rs, cs, unit), see
// ConvShape in common.cuh.
#include "common.cuh"

// y[b, o, h, w] = sum_{il, du, dv} W_eff[o, il, du, dv] * x[b, g*cg + il, h - rs*du, w - cs*dv]
// in one launch; CH in {1, 2, 4} output channels a thread, chosen by the
// launcher from the group size (see ic_masked_conv in common.cuh).
template <typename T, int CH>
__global__ void masked_conv_forward(const T* __restrict__ x, const T* __restrict__ w,
                                    T* __restrict__ y, int B, int C, int H, int W, int G,
                                    int kh, int kw, int rs, int cs, int unit) {
    ic_masked_conv<T, CH, false>(x, w, y, ConvShape(B, C, H, W, G, kh, kw, rs, cs, unit));
}

// Scratch for the solves (see ic_prep_slot), in two launches.
// Stage 1, one block per group: L^-1 of the same-pixel block by forward
// substitution, one column per thread (slot 0).
template <typename T>
__global__ void inv_conv_lower_inverse(const T* __restrict__ w, T* __restrict__ prep, int C,
                                       int G, int kh, int kw, int rs, int cs, int unit) {
    const ConvShape s(1, C, 1, 1, G, kh, kw, rs, cs, unit);
    const int g = blockIdx.x;
    const int cg = s.cg;
    T* linv = prep + ic_prep_slot(s, g, 0);
    for (int j = threadIdx.x; j < cg; j += blockDim.x) {
        // Column j of L^-1: L[r, :] . col = delta(r, j), rows in order; the
        // thread reads back only entries it wrote itself.
        for (int r = 0; r < cg; ++r) {
            T acc = r == j ? T(1) : T(0);
            for (int k = j; k < r; ++k)
                acc -= ic_weight(w, s, g * cg + r, k, 0, 0) * linv[k * cg + j];
            linv[r * cg + j] = r < j ? T(0) : acc / ic_weight(w, s, g * cg + r, r, 0, 0);
        }
    }
}

// Stage 2, one thread per entry: K'_off = L^-1 K_off for every offset but
// (0, 0), i.e. G * (kh*kw - 1) * cg^2 independent dot products of length <= cg.
template <typename T>
__global__ void inv_conv_fold_taps(const T* __restrict__ w, T* __restrict__ prep, int C, int G,
                                   int kh, int kw, int rs, int cs, int unit) {
    const ConvShape s(1, C, 1, 1, G, kh, kw, rs, cs, unit);
    const int cg = s.cg;
    const long long per_group = (long long)(kh * kw - 1) * cg * cg;
    const long long n = per_group * G;
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < n;
         e += (long long)gridDim.x * blockDim.x) {
        const int g = (int)(e / per_group);
        const long long f = e % per_group;
        const int off = 1 + (int)(f / (cg * cg));
        const int o = (int)((f / cg) % cg);
        const int i = (int)(f % cg);
        const int du = off / kw, dv = off % kw;
        const T* linv = prep + ic_prep_slot(s, g, 0) + o * cg;
        T acc = T(0);
        for (int k = 0; k <= o; ++k) acc += linv[k] * ic_weight(w, s, g * cg + k, i, du, dv);
        prep[ic_prep_slot(s, g, off) + o * cg + i] = acc;
    }
}

// x = M^-1 y. One block per (image, group) walks the anti-diagonals of the
// padded-corner coordinates (r, c), r + c = d, with one barrier between
// diagonals: a pixel reads only strictly earlier diagonals. First
// y_hat = L^-1 y (parallel over the slice), then on each diagonal
//   x_p = y_hat_p - sum_{off != 0} K'_off x_{p - off}
// for all (pixel, channel) pairs of the diagonal in parallel.
// The slice is worked on in shared memory when slice_in_smem, else in place
// in the output (global writes are visible to the block after __syncthreads);
// the K' table sits in shared memory when kp_in_smem. Dynamic shared layout:
// [K' table if kp_in_smem][slice if slice_in_smem].
template <typename T>
__global__ void inv_conv_solve(const T* __restrict__ y, const T* __restrict__ prep,
                               T* __restrict__ x, int B, int C, int H, int W, int G, int kh,
                               int kw, int rs, int cs, int unit, int kp_in_smem,
                               int slice_in_smem) {
    const ConvShape s(B, C, H, W, G, kh, kw, rs, cs, unit);
    IC_DYNAMIC_SHARED(T, smem);
    const int g = blockIdx.x % G;
    const int cg = s.cg;
    const long long hw = s.hw();
    const long long slice_offset = (long long)blockIdx.x * cg * hw;  // (b, g) slice
    const long long nkp = (long long)kh * kw * cg * cg;

    const T* kp = prep + ic_prep_slot(s, g, 0);
    if (kp_in_smem) {
        for (long long e = threadIdx.x; e < nkp; e += blockDim.x) smem[e] = kp[e];
        kp = smem;
    }
    T* work = slice_in_smem ? smem + (kp_in_smem ? nkp : 0) : x + slice_offset;
    __syncthreads();

    const T* ys = y + slice_offset;
    for (long long e = threadIdx.x; e < cg * hw; e += blockDim.x) {
        const int o = (int)(e / hw);
        const long long p = e % hw;
        T acc = T(0);
        for (int i = 0; i <= o; ++i) acc += kp[o * cg + i] * ys[i * hw + p];
        work[e] = acc;
    }
    __syncthreads();

    for (int d = 0; d < H + W - 1; ++d) {
        const int rmin = s.diag_first(d);
        const int npix = s.diag_length(d);
        for (int e = threadIdx.x; e < npix * cg; e += blockDim.x) {
            const int o = e / npix;
            const int r = rmin + e % npix;
            const int c = d - r;
            const int h = s.image_row(r);
            const int col = s.image_col(c);
            const long long idx = o * hw + (long long)h * W + col;
            T acc = work[idx];
            const int dumax = r < kh - 1 ? r : kh - 1;
            const int dvmax = c < kw - 1 ? c : kw - 1;
            for (int du = 0; du <= dumax; ++du) {
                for (int dv = du == 0 ? 1 : 0; dv <= dvmax; ++dv) {
                    const T* k = kp + ((du * kw + dv) * cg + o) * cg;
                    const T* src = work + (long long)(h - rs * du) * W + (col - cs * dv);
                    for (int i = 0; i < cg; ++i) acc -= k[i] * src[i * hw];
                }
            }
            work[idx] = acc;
        }
        __syncthreads();
    }

    if (slice_in_smem) {
        for (long long e = threadIdx.x; e < cg * hw; e += blockDim.x)
            x[slice_offset + e] = work[e];
    }
}
