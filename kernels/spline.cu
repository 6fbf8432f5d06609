// invconv kernels: the monotone rational-quadratic spline of flows.SplineActivation
// (Durkan et al., 2019), fused: value, inverse, log-derivative and backward.
//
// Follows the rules of common.cuh (templates over T, grid-stride loops,
// shared memory only through IC_DYNAMIC_SHARED, every thread at every
// barrier). The launcher is src/invconv/_spline.py; the truth the kernels are
// tested against is SplineActivation's torch code (tests/test_spline.py).
//
// Per channel c the spline is given by one knot table, knots (3, C, K+1):
// knots[0, c] the x knots, knots[1, c] the y knots, knots[2, c] the
// derivatives at the knots (1 at both ends: linear tails), K = bins. The
// tables are computed from the parameters in torch (C x (K+1) numbers,
// differentiable there), so the kernels see only them and return gradients
// with respect to them.
//
// Element t of channel c (images (B, C, H*W)) is transformed when
// -bound < t < bound (strictly), else passed on unchanged with log-derivative
// 0. NaN is "outside" (passed on). As in the torch code, the formula is still
// evaluated at t clamped to [-bound, bound] (NaN stays NaN) and enters the
// knot gradients with weight 0, so a NaN input makes the knot gradients of its
// bin NaN exactly where torch's autograd does (0 * NaN).
#include "common.cuh"

// Everything a spline kernel knows besides its pointers and the bound: all
// int, in the order of SPLINE_PARAM_FIELDS in src/invconv/_spline.py.
struct SplineParams {
    int B, C, HW;   // images (B, C, H*W)
    int bins;       // K: the knot table has K + 1 entries per channel and kind
    int inverse;    // 0: x -> y, 1: y -> x (the quadratic solve)
    int nsplit;     // blocks sharing one reduction row (a sample, or a channel)
};

__device__ __forceinline__ float sp_sqrt(float v) { return sqrtf(v); }
__device__ __forceinline__ double sp_sqrt(double v) { return sqrt(v); }
__device__ __forceinline__ float sp_log(float v) { return logf(v); }
__device__ __forceinline__ double sp_log(double v) { return log(v); }

// torch.clamp's semantics: NaN stays NaN (fmin/fmax would drop it).
template <typename T>
__device__ __forceinline__ T sp_clamp(T v, T lo, T hi) {
    return v < lo ? lo : (v > hi ? hi : v);
}

// The bin of t and its numbers, read from the knot table.
template <typename T>
struct SpBin {
    int k;                  // bin index: inner knots below t (searchsorted, left)
    T x0, w, y0, h, d0, d1; // left knot, width, bottom, height, end derivatives
    T s;                    // h / w
};

template <typename T>
__device__ __forceinline__ SpBin<T> sp_bin(const T* __restrict__ knots, const SplineParams& p,
                                           int c, T t) {
    const int K1 = p.bins + 1;
    const T* xk = knots + (long long)c * K1;
    const T* yk = knots + ((long long)p.C + c) * K1;
    const T* dk = knots + (2LL * p.C + c) * K1;
    const T* search = p.inverse ? yk : xk;
    SpBin<T> b;
    b.k = 0;
    for (int j = 1; j < p.bins; ++j) b.k += t > search[j] ? 1 : 0;
    b.x0 = xk[b.k];
    b.w = xk[b.k + 1] - xk[b.k];
    b.y0 = yk[b.k];
    b.h = yk[b.k + 1] - yk[b.k];
    b.d0 = dk[b.k];
    b.d1 = dk[b.k + 1];
    b.s = b.h / b.w;
    return b;
}

// The spline at t (inside or clamped): its output, log-derivative and the
// bin coordinate xi in [0, 1]; xi_free is false where xi was clamped (then,
// as for torch.clamp, no derivative flows through it).
template <typename T>
struct SpValue {
    T out, logd, xi;
    bool xi_free;
};

// The arithmetic follows SplineActivation._spline operation by operation, so
// on the emulator (no fused multiply-adds) the values agree with torch's to
// the last bits; the GPU contracts to FMAs and differs by rounding.
template <typename T>
__device__ __forceinline__ SpValue<T> sp_value(const SpBin<T>& b, T t, bool inverse) {
    SpValue<T> v;
    const T sum = b.d1 + b.d0 - T(2) * b.s;
    T xi;
    if (!inverse) {
        xi = (t - b.x0) / b.w;
    } else {
        const T dy = t - b.y0;
        const T qa = b.h * (b.s - b.d0) + dy * sum;
        const T qb = b.h * b.d0 - dy * sum;
        const T qc = -b.s * dy;
        T disc = qb * qb - T(4) * qa * qc;
        disc = disc < T(0) ? T(0) : disc;
        xi = (T(2) * qc) / (-qb - sp_sqrt(disc));
    }
    v.xi_free = xi >= T(0) && xi <= T(1);
    xi = sp_clamp(xi, T(0), T(1));
    const T den = b.s + sum * xi * (T(1) - xi);
    if (!inverse)
        v.out = b.y0 + b.h * (b.s * xi * xi + b.d0 * xi * (T(1) - xi)) / den;
    else
        v.out = b.x0 + xi * b.w;
    const T deriv = b.s * b.s *
                    (b.d1 * xi * xi + T(2) * b.s * xi * (T(1) - xi) +
                     b.d0 * ((T(1) - xi) * (T(1) - xi))) / (den * den);
    v.logd = sp_log(deriv);
    v.xi = xi;
    return v;
}

// Gradients of one element: gy (of the output) and gl (of the log-derivative)
// in, the gradient of t and of the six table entries of its bin out
// (g[0..5]: x[k], x[k+1], y[k], y[k+1], d[k], d[k+1]).
//
// With xi the bin coordinate, q = xi (1 - xi), S = d0 + d1 - 2s,
// num = s xi^2 + d0 q, den = s + S q, P = d1 xi^2 + 2 s q + d0 (1 - xi)^2:
//   F(xi) = y0 + h num / den        (the forward map), dF/dxi = w * deriv,
//   L     = log deriv = 2 log s + log P - 2 log den.
// Forward direction: xi = (t - x0) / w.  Inverse direction: xi solves F = t,
// so dxi = (dt - dF|xi fixed) / F_xi (implicit function) and x = x0 + xi w.
template <typename T>
__device__ __forceinline__ T sp_grad(const SpBin<T>& b, T t, bool inverse, T gy, T gl, T* g) {
    const SpValue<T> v = sp_value(b, t, inverse);
    const T xi = v.xi, one_m = T(1) - xi;
    const T q = xi * one_m;
    const T S = b.d1 + b.d0 - T(2) * b.s;
    const T num = b.s * xi * xi + b.d0 * q;
    const T den = b.s + S * q;
    const T P = b.d1 * xi * xi + T(2) * b.s * q + b.d0 * one_m * one_m;
    const T den2 = den * den;
    const T one_m2xi = T(1) - T(2) * xi;
    // Partial derivatives of F (times den^2 / h where noted) and of L.
    const T F_xi = b.h * ((T(2) * b.s * xi + b.d0 * one_m2xi) * den - num * S * one_m2xi) / den2;
    const T F_s = b.h * (xi * xi * den - num * (T(1) - T(2) * q)) / den2;
    const T F_h = num / den;
    const T F_d0 = b.h * q * (den - num) / den2;
    const T F_d1 = -b.h * num * q / den2;
    const T L_xi = (T(2) * b.d1 * xi + T(2) * b.s * one_m2xi - T(2) * b.d0 * one_m) / P
                   - T(2) * S * one_m2xi / den;
    const T L_s = T(2) / b.s + T(2) * q / P - T(2) * (T(1) - T(2) * q) / den;
    const T L_d0 = one_m * one_m / P - T(2) * q / den;
    const T L_d1 = xi * xi / P - T(2) * q / den;
    T g_t, g_x0, g_w, g_y0, g_h, g_d0, g_d1;
    if (!inverse) {
        const T a = v.xi_free ? gy * F_xi + gl * L_xi : T(0);   // d loss / d xi
        const T g_s = gy * F_s + gl * L_s;
        g_t = a / b.w;
        g_x0 = -a / b.w;
        g_w = -a * xi / b.w - g_s * b.s / b.w;
        g_y0 = gy;
        g_h = gy * F_h + g_s / b.w;
        g_d0 = gy * F_d0 + gl * L_d0;
        g_d1 = gy * F_d1 + gl * L_d1;
    } else {
        const T r = v.xi_free ? (gy * b.w + gl * L_xi) / F_xi : T(0);   // d loss / d t
        const T g_s = -r * F_s + gl * L_s;
        g_t = r;
        g_x0 = gy;
        g_w = gy * xi - g_s * b.s / b.w;
        g_y0 = -r;
        g_h = -r * F_h + g_s / b.w;
        g_d0 = -r * F_d0 + gl * L_d0;
        g_d1 = -r * F_d1 + gl * L_d1;
    }
    g[0] = g_x0 - g_w;
    g[1] = g_w;
    g[2] = g_y0 - g_h;
    g[3] = g_h;
    g[4] = g_d0;
    g[5] = g_d1;
    return g_t;
}

// Sum red[0 .. blockDim) into red[0] for `rows` rows of blockDim values
// (row j at red[j * blockDim]); any block size (a tree folding the upper part
// onto the lower). Every thread calls it.
template <typename T>
__device__ __forceinline__ void sp_block_sum(T* red, int rows) {
    __syncthreads();
    for (int active = blockDim.x; active > 1;) {
        const int half = (active + 1) / 2;
        if ((int)threadIdx.x < active - half)
            for (int j = 0; j < rows; ++j)
                red[j * blockDim.x + threadIdx.x] += red[j * blockDim.x + threadIdx.x + half];
        active = half;
        __syncthreads();
    }
}

// y = spline(x) (or x = spline^-1(y) when p.inverse) and the log-derivative
// summed per sample. Grid (nsplit, rows): block (split, b) takes a share of
// the C*H*W elements of sample b (b striding by gridDim.y) and writes its sum
// to logdet[b * nsplit + split]: with nsplit = 1 that is the result, else
// spline_logdet_combine adds the splits (deterministic: no atomics).
// Shared: blockDim values of T.
template <typename T>
__global__ void spline_forward(const T* __restrict__ in, const T* __restrict__ knots,
                               T* __restrict__ out, T* __restrict__ logdet, T bound,
                               const SplineParams p) {
    IC_DYNAMIC_SHARED(T, red);
    const long long per_sample = (long long)p.C * p.HW;
    const long long chunk = (per_sample + p.nsplit - 1) / p.nsplit;
    const long long begin = blockIdx.x * chunk;
    const long long end = begin + chunk < per_sample ? begin + chunk : per_sample;
    for (int b = blockIdx.y; b < p.B; b += gridDim.y) {
        T acc = T(0);
        for (long long e = begin + threadIdx.x; e < end; e += blockDim.x) {
            const long long idx = (long long)b * per_sample + e;
            const int c = (int)(e / p.HW);
            const T t = in[idx];
            const bool inside = t > -bound && t < bound;
            if (inside) {
                const SpBin<T> bin = sp_bin(knots, p, c, t);
                const SpValue<T> v = sp_value(bin, t, p.inverse != 0);
                out[idx] = v.out;
                acc += v.logd;
            } else {
                out[idx] = t;
            }
        }
        red[threadIdx.x] = acc;
        sp_block_sum(red, 1);
        if (threadIdx.x == 0) logdet[(long long)b * p.nsplit + blockIdx.x] = red[0];
        __syncthreads();
    }
}

// logdet[b] = sum of the nsplit partial sums of sample b; a thread per sample.
template <typename T>
__global__ void spline_logdet_combine(const T* __restrict__ partial, T* __restrict__ logdet,
                                      const SplineParams p) {
    for (long long b = (long long)blockIdx.x * blockDim.x + threadIdx.x; b < p.B;
         b += (long long)gridDim.x * blockDim.x) {
        T acc = T(0);
        for (int k = 0; k < p.nsplit; ++k) acc += partial[b * p.nsplit + k];
        logdet[b] = acc;
    }
}

// Backward of spline_forward (either direction): grad_in for every element
// and the knot-table gradients. Grid (nsplit, rows): block (split, c) takes a
// share of the B*H*W elements of channel c (c striding by gridDim.y), each
// thread summing its table gradients in its own column of shared memory
// (3 (K+1) values), then a tree over the block; the block writes
// partial[split] (a (3, C, K+1) table each): with nsplit = 1 that is the
// result, else spline_knot_grad_combine adds the splits.
// Shared: 3 (K+1) blockDim values of T.
template <typename T>
__global__ void spline_backward(const T* __restrict__ in, const T* __restrict__ grad_out,
                                const T* __restrict__ grad_logdet, const T* __restrict__ knots,
                                T* __restrict__ grad_in, T* __restrict__ partial, T bound,
                                const SplineParams p) {
    IC_DYNAMIC_SHARED(T, red);
    const int K1 = p.bins + 1;
    const int rows = 3 * K1;
    const long long n = (long long)p.B * p.HW;
    const long long chunk = (n + p.nsplit - 1) / p.nsplit;
    const long long begin = blockIdx.x * chunk;
    const long long end = begin + chunk < n ? begin + chunk : n;
    const bool inverse = p.inverse != 0;
    T* mine = red + threadIdx.x;   // this thread's column: mine[j * blockDim.x]
    for (int c = blockIdx.y; c < p.C; c += gridDim.y) {
        for (int j = 0; j < rows; ++j) mine[j * blockDim.x] = T(0);
        for (long long e = begin + threadIdx.x; e < end; e += blockDim.x) {
            const long long b = e / p.HW;
            const long long idx = (b * p.C + c) * p.HW + e % p.HW;
            const T t = in[idx];
            const T gy = grad_out[idx];
            const bool inside = t > -bound && t < bound;
            // Outside: the identity; the clamped spline still enters the knot
            // gradients with weight 0 (see the top of the file).
            const T tc = sp_clamp(t, -bound, bound);
            const SpBin<T> bin = sp_bin(knots, p, c, tc);
            T g[6];
            const T gt = sp_grad(bin, tc, inverse, inside ? gy : T(0),
                                 inside ? grad_logdet[b] : T(0), g);
            grad_in[idx] = inside ? gt : gy;
            mine[(bin.k) * blockDim.x] += g[0];
            mine[(bin.k + 1) * blockDim.x] += g[1];
            mine[(K1 + bin.k) * blockDim.x] += g[2];
            mine[(K1 + bin.k + 1) * blockDim.x] += g[3];
            mine[(2 * K1 + bin.k) * blockDim.x] += g[4];
            mine[(2 * K1 + bin.k + 1) * blockDim.x] += g[5];
        }
        sp_block_sum(red, rows);
        if (threadIdx.x == 0) {
            T* dst = partial + (long long)blockIdx.x * 3 * p.C * K1;
            for (int j = 0; j < rows; ++j)
                dst[((long long)(j / K1) * p.C + c) * K1 + j % K1] = red[j * blockDim.x];
        }
        __syncthreads();
    }
}

// grad_knots = the sum of the nsplit partial tables; a thread per entry.
template <typename T>
__global__ void spline_knot_grad_combine(const T* __restrict__ partial, T* __restrict__ grad,
                                         const SplineParams p) {
    const long long n = 3LL * p.C * (p.bins + 1);
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < n;
         e += (long long)gridDim.x * blockDim.x) {
        T acc = T(0);
        for (int k = 0; k < p.nsplit; ++k) acc += partial[k * n + e];
        grad[e] = acc;
    }
}
