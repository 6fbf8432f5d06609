// Backward direction: the adjoints M^T g and M^-T g, and the weight gradient
// shared by both vector-Jacobian products.
//
// Arrays are contiguous (B, C, H, W); weight is contiguous (C, C/G, kh, kw).
// Shape and launch choices as one IcParams, as in forward.cu (see common.cuh).
#include "common.cuh"

// grad_x[b, i, h, w] = sum_{ol, du, dv} W_eff[g*cg + ol, il, du, dv] * g[b, g*cg + ol, h + rs*du, w + cs*dv]
// (i = g*cg + il): the transpose of masked_conv_forward, the same body with
// CH input channels a thread (see ic_masked_conv in common.cuh).
template <typename T, int CH>
__global__ void masked_conv_adjoint(const T* __restrict__ g, const T* __restrict__ w,
                                    T* __restrict__ gx, const IcParams p) {
    ic_masked_conv<T, CH, true>(g, w, gx, p);
}

// grad_y = M^-T grad_x = L^-T (I + N'^T)^-1 grad_x, with the scratch of
// inv_conv_lower_inverse and inv_conv_fold_taps. One block per (image, group) walks the anti-diagonals in
// reverse:  g_hat_q = grad_x_q - sum_{off != 0} K'^T_off g_hat_{q + off},
// then grad_y_q = L^-T g_hat_q. Shared memory, and CH channels a thread, as in
// inv_conv_solve.
template <typename T, int CH>
__global__ void inv_conv_solve_adjoint(const T* __restrict__ gx, const T* __restrict__ prep,
                                       T* __restrict__ gy, const IcParams p) {
    IC_DYNAMIC_SHARED(T, smem);
    const IcSolveSlice<T> s = ic_solve_begin(prep, gy, smem, p);
    const T* kp = s.kp;
    T* work = s.work;
    const int cg = p.cg, kh = p.kh, kw = p.kw, H = p.H, W = p.W;
    const long long hw = p.hw();
    for (long long e = threadIdx.x; e < cg * hw; e += blockDim.x)
        work[e] = gx[s.offset + e];
    __syncthreads();

    const IcLanes lanes = ic_lanes(p);
    const int units = (cg + CH - 1) / CH;
    for (int d = H + W - 2; d >= 0; --d) {
        ic_for_diagonal(p, lanes, units, d, [&](int unit, int r, int c) {
            const int i0 = unit * CH;
            const int h = p.image_row(r);
            const int col = p.image_col(c);
            const long long idx = i0 * hw + (long long)h * W + col;
            T acc[CH];
            for (int j = 0; j < CH; ++j) acc[j] = i0 + j < cg ? work[idx + j * hw] : T(0);
            const int dumax = H - 1 - r < kh - 1 ? H - 1 - r : kh - 1;
            const int dvmax = W - 1 - c < kw - 1 ? W - 1 - c : kw - 1;
            for (int du = 0; du <= dumax; ++du) {
                for (int dv = du == 0 ? 1 : 0; dv <= dvmax; ++dv) {
                    const T* k = kp + (du * kw + dv) * cg * cg + i0;  // columns i0.. of K'_off
                    const T* src = work + (long long)(h + p.rs * du) * W + (col + p.cs * dv);
                    for (int o = 0; o < cg; ++o) {
                        const T v = src[o * hw];
                        for (int j = 0; j < CH; ++j)
                            if (i0 + j < cg) acc[j] -= k[o * cg + j] * v;
                    }
                }
            }
            for (int j = 0; j < CH; ++j)
                if (i0 + j < cg) work[idx + j * hw] = acc[j];
        });
        __syncthreads();
    }

    // grad_y_q[i] = sum_{o >= i} L^-1[o, i] g_hat_q[o], one thread per pixel.
    // Ascending i reads only g_hat entries not yet overwritten, so this is
    // safe in place (work == gy) as well as from shared memory.
    T* out = gy + s.offset;
    for (long long q = threadIdx.x; q < hw; q += blockDim.x) {
        for (int i = 0; i < cg; ++i) {
            T acc = T(0);
            for (int o = i; o < cg; ++o) acc += kp[o * cg + i] * work[o * hw + q];
            out[i * hw + q] = acc;
        }
    }
}

// Weight gradient, stage 1 of 2: block (pair, split) with pair = o*cg + il
// sums grad_out[b, o, h, w] * x[b, g*cg + il, h - rs*du, w - cs*dv] over its
// share of the (b, h, w) range, for IC_WG_TAPS offsets at a time, and writes
// one partial per weight entry: partial[split][pair][du*kw + dv].
#define IC_WG_TAPS 9
template <typename T>
__global__ void conv_weight_grad_partial(const T* __restrict__ gout, const T* __restrict__ x,
                                         T* __restrict__ partial, const IcParams s) {
    const int B = s.B, C = s.C, H = s.H, W = s.W, kh = s.kh, kw = s.kw, rs = s.rs, cs = s.cs;
    IC_DYNAMIC_SHARED(T, red);  // blockDim.x * IC_WG_TAPS partial sums
    const int pair = blockIdx.x;
    const int o = pair / s.cg, il = pair % s.cg;
    const int i = (o / s.cg) * s.cg + il;
    const long long hw = s.hw();
    const long long n = (long long)B * hw;
    const long long chunk = (n + gridDim.y - 1) / gridDim.y;
    const long long begin = blockIdx.y * chunk;
    const long long end = begin + chunk < n ? begin + chunk : n;
    const int ntaps = kh * kw;

    for (int t0 = 0; t0 < ntaps; t0 += IC_WG_TAPS) {
        T acc[IC_WG_TAPS];
        for (int t = 0; t < IC_WG_TAPS; ++t) acc[t] = T(0);
        // This thread's terms e = begin + threadIdx.x + k * blockDim.x, walked
        // as (image b, row, col) by carries: divisions (64-bit ones above
        // all) cost more than the multiply-adds they would index.
        long long e = begin + threadIdx.x;
        long long b = e / hw;
        int row = (int)((e % hw) / W), col = (int)((e % hw) % W);
        const long long step_b = blockDim.x / hw;
        const int step_row = (int)((blockDim.x % hw) / W), step_col = (int)((blockDim.x % hw) % W);
        for (; e < end; e += blockDim.x) {
            const long long p = (long long)row * W + col;
            const T gv = gout[(b * C + o) * hw + p];
            const T* xi = x + (b * C + i) * hw;
            int du = t0 / kw, dv = t0 % kw;
            for (int t = 0; t < IC_WG_TAPS && t0 + t < ntaps; ++t) {
                const int sh = row - rs * du, sw = col - cs * dv;
                if (sh >= 0 && sh < H && sw >= 0 && sw < W)
                    acc[t] += gv * xi[(long long)sh * W + sw];
                if (++dv == kw) { dv = 0; ++du; }
            }
            b += step_b;
            row += step_row;
            col += step_col;
            if (col >= W) { col -= W; ++row; }
            if (row >= H) { row -= H; ++b; }
        }
        for (int t = 0; t < IC_WG_TAPS; ++t) red[t * blockDim.x + threadIdx.x] = acc[t];
        __syncthreads();
        // Tree over any block size: fold the upper part onto the lower.
        for (int active = blockDim.x; active > 1;) {
            const int half = (active + 1) / 2;
            if (threadIdx.x < active - half)
                for (int t = 0; t < IC_WG_TAPS; ++t)
                    red[t * blockDim.x + threadIdx.x] += red[t * blockDim.x + threadIdx.x + half];
            active = half;
            __syncthreads();
        }
        if (threadIdx.x == 0)
            for (int t = 0; t < IC_WG_TAPS && t0 + t < ntaps; ++t)
                partial[((long long)blockIdx.y * C * s.cg + pair) * ntaps + t0 + t] = red[t * blockDim.x];
        __syncthreads();
    }
}

// Weight gradient, stage 2 of 2: grad_w[o, il, u, v] = scale * sum over
// splits, exactly 0 at ignored entries; one thread per weight entry.
template <typename T>
__global__ void conv_weight_grad_combine(const T* __restrict__ partial, T* __restrict__ gw,
                                         T scale, const IcParams s) {
    const int C = s.C, kh = s.kh, kw = s.kw, nsplit = s.nsplit;
    const int ntaps = kh * kw;
    const long long n = (long long)C * s.cg * ntaps;
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < n;
         e += (long long)gridDim.x * blockDim.x) {
        const int pair = (int)(e / ntaps);
        const int tap = (int)(e % ntaps);
        const int du = tap / kw, dv = tap % kw;
        const int u = s.tap_u(du), v = s.tap_v(dv);
        const int o = pair / s.cg, il = pair % s.cg;
        T acc = T(0);
        for (int k = 0; k < nsplit; ++k) acc += partial[(long long)k * n + e];
        gw[((long long)pair * kh + u) * kw + v] = ic_ignored(s, o, il, u, v) ? T(0) : scale * acc;
    }
}
