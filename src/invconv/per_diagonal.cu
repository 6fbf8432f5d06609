// Baseline for the benchmarks, not part of the package: the inverse and its
// adjoint with the same maths as kernels/forward.cu and backward.cu, but
// scheduled as the published FInC Flow and Inverse-Flow code schedules it,
// one launch per anti-diagonal (H + W - 1 launches per op). Threads cover
// every (image, group, pixel of the diagonal, channel).
#include "common.cuh"

// x = L^-1 y (the same-pixel block's inverse), one thread per element.
template <typename T>
__global__ void diag_lower_solve(const T* __restrict__ y, const T* __restrict__ prep,
                                 T* __restrict__ x, const IcParams s) {
    const int B = s.B, C = s.C;
    const long long hw = s.hw(), total = (long long)B * C * hw;
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < total;
         e += (long long)gridDim.x * blockDim.x) {
        const long long p = e % hw;
        const int c = (int)((e / hw) % C);
        const int g = c / s.cg, o = c % s.cg;
        const T* linv = prep + ic_prep_slot(s, g, 0);
        const T* ys = y + (e / hw - o) * hw + p;
        T acc = T(0);
        for (int i = 0; i <= o; ++i) acc += linv[o * s.cg + i] * ys[i * hw];
        x[e] = acc;
    }
}

// One anti-diagonal d of the forward solve, in place on x (holding L^-1 y).
template <typename T>
__global__ void diag_solve_step(const T* __restrict__ prep, T* __restrict__ x, const IcParams s,
                                int d) {
    const int B = s.B, C = s.C, H = s.H, W = s.W, kh = s.kh, kw = s.kw, rs = s.rs, cs = s.cs;
    const int rmin = s.diag_first(d);
    const int npix = s.diag_length(d);
    const long long hw = s.hw(), total = (long long)B * C * npix;
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < total;
         e += (long long)gridDim.x * blockDim.x) {
        const int r = rmin + (int)(e % npix);
        const int ch = (int)((e / npix) % C);
        const long long b = e / ((long long)npix * C);
        const int g = ch / s.cg, o = ch % s.cg;
        const int c = d - r;
        const int h = s.image_row(r);
        const int col = s.image_col(c);
        T* slice = x + (b * C + (long long)g * s.cg) * hw;
        const T* kp = prep + ic_prep_slot(s, g, 0);
        T acc = slice[o * hw + (long long)h * W + col];
        const int dumax = r < kh - 1 ? r : kh - 1;
        const int dvmax = c < kw - 1 ? c : kw - 1;
        for (int du = 0; du <= dumax; ++du)
            for (int dv = du == 0 ? 1 : 0; dv <= dvmax; ++dv) {
                const T* k = kp + ((du * kw + dv) * s.cg + o) * s.cg;
                const T* src = slice + (long long)(h - rs * du) * W + (col - cs * dv);
                for (int i = 0; i < s.cg; ++i) acc -= k[i] * src[i * hw];
            }
        slice[o * hw + (long long)h * W + col] = acc;
    }
}

// One anti-diagonal d of the adjoint solve, in place on g (holding grad_x).
template <typename T>
__global__ void diag_adjoint_step(const T* __restrict__ prep, T* __restrict__ gw, const IcParams s,
                                int d) {
    const int B = s.B, C = s.C, H = s.H, W = s.W, kh = s.kh, kw = s.kw, rs = s.rs, cs = s.cs;
    const int rmin = s.diag_first(d);
    const int npix = s.diag_length(d);
    const long long hw = s.hw(), total = (long long)B * C * npix;
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < total;
         e += (long long)gridDim.x * blockDim.x) {
        const int r = rmin + (int)(e % npix);
        const int ch = (int)((e / npix) % C);
        const long long b = e / ((long long)npix * C);
        const int g = ch / s.cg, i = ch % s.cg;
        const int c = d - r;
        const int h = s.image_row(r);
        const int col = s.image_col(c);
        T* slice = gw + (b * C + (long long)g * s.cg) * hw;
        const T* kp = prep + ic_prep_slot(s, g, 0);
        T acc = slice[i * hw + (long long)h * W + col];
        const int dumax = H - 1 - r < kh - 1 ? H - 1 - r : kh - 1;
        const int dvmax = W - 1 - c < kw - 1 ? W - 1 - c : kw - 1;
        for (int du = 0; du <= dumax; ++du)
            for (int dv = du == 0 ? 1 : 0; dv <= dvmax; ++dv) {
                const T* k = kp + (du * kw + dv) * s.cg * s.cg + i;
                const T* src = slice + (long long)(h + rs * du) * W + (col + cs * dv);
                for (int o = 0; o < s.cg; ++o) acc -= k[o * s.cg] * src[o * hw];
            }
        slice[i * hw + (long long)h * W + col] = acc;
    }
}

// grad_y = L^-T g_hat, one thread per element (reads g_hat, writes gy).
template <typename T>
__global__ void diag_upper_solve(const T* __restrict__ ghat, const T* __restrict__ prep,
                                 T* __restrict__ gy, const IcParams s) {
    const int B = s.B, C = s.C;
    const long long hw = s.hw(), total = (long long)B * C * hw;
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < total;
         e += (long long)gridDim.x * blockDim.x) {
        const long long p = e % hw;
        const int c = (int)((e / hw) % C);
        const int g = c / s.cg, i = c % s.cg;
        const T* linv = prep + ic_prep_slot(s, g, 0);
        const T* gs = ghat + (e / hw - i) * hw + p;
        T acc = T(0);
        for (int o = i; o < s.cg; ++o) acc += linv[o * s.cg + i] * gs[o * hw];
        gy[e] = acc;
    }
}
