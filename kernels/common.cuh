// invconv kernels: helpers shared by forward.cu, backward.cu and conv_smem.cu.
//
// Rules for every file in kernels/. The same sources are compiled by NVRTC
// (through cupy.RawModule) and by the host C++ compiler for the CPU emulator
// (src/invconv/emulator), so they keep to what both accept:
//  1. No #include other than "common.cuh": no standard or CUDA headers.
//  2. Kernels are templates over the float type T (float, double), named from
//     Python by name expressions such as "inv_conv_solve<float>"; no extern "C",
//     no host code, no printf/assert, no recursion, no dynamic allocation.
//  3. Shared memory only through IC_DYNAMIC_SHARED (one dynamic buffer per
//     launch, poisoned with NaN bytes by the emulator before every block);
//     no static __shared__ arrays.
//  4. Inside a block only __syncthreads() synchronises, and every thread of
//     the block reaches every __syncthreads() (barrier loops have
//     block-uniform bounds). No warp shuffles, votes, __syncwarp, cooperative
//     groups, spin-waits on other threads of the block, and nothing that
//     depends on the warp size or on threads running in lockstep: the
//     emulator runs a block's threads as fibers switched at barriers (or as
//     OS threads under its ThreadSanitizer race check), and a grid's blocks
//     one after another, in either order. Between blocks: one thread may wait
//     (IC_SPIN_UNTIL) for a flag that a block holding an earlier ticket of an
//     atomic counter sets, never for one that a later block sets; only the
//     band solves (solve_bands.cu) do.
//  5. Kernel arguments are pointers, one IcParams (below) and, where needed,
//     a float of type T; sizes and offsets that can pass 2^31 are computed in
//     long long.
//  6. Grid and block sizes are whatever the launcher chose: loops stride by
//     blockDim/gridDim, so any block size (1, 7, 33, ...) must give the same
//     result.
#pragma once

#ifdef INVCONV_EMULATOR
#define IC_DYNAMIC_SHARED(T, name) \
    T* name = reinterpret_cast<T*>(cuemu::dynamic_shared_memory())
#else
#define IC_DYNAMIC_SHARED(T, name)                                     \
    extern __shared__ __align__(16) unsigned char ic_dynamic_shared_[]; \
    T* name = reinterpret_cast<T*>(ic_dynamic_shared_)
#endif

// Everything a kernel knows besides its pointers (and the weight gradient's
// float scale): one struct passed by value, built on the host in one place,
// kernel_params() in src/invconv/_kernels.py, whose PARAM_FIELDS lists these
// members in this order. All are int, so the layout has no padding.
//
// The operator in offset form (see src/invconv/_api.py): output pixel (h, w)
// reads input pixel (h - rs*du, w - cs*dv) for 0 <= du < kh, 0 <= dv < kw,
// with rs = +1 when the top is padded (-1: bottom) and cs = +1 when the left
// is padded (-1: right). Offset (0, 0) is the same-pixel tap.
struct IcParams {
    int B, C, H, W;          // images (B, C, H, W)
    int G, cg;               // groups, channels per group
    int kh, kw;              // kernel size
    int rs, cs;              // corner signs
    int unit;                // unit diagonal
    int kp_in_smem;          // solves: the K' table sits in shared memory
    int slice_in_smem;       // solves: the slice is worked on in shared memory
    int nsplit;              // weight gradient: partial sums per weight entry
    int lanes;               // solves: threads own fixed (channel, place) lanes
    int w_in_smem;           // convolutions, schedule smem: the slab's weights sit in shared memory
    int slices;              // solves, schedule slices: (image, group) slices a block
    int band_rows, bands;    // solves, schedule bands: rows a band, bands a slice

    // Weight tap index (u, v) of offset (du, dv).
    __device__ __forceinline__ int tap_u(int du) const { return rs > 0 ? kh - 1 - du : du; }
    __device__ __forceinline__ int tap_v(int dv) const { return cs > 0 ? kw - 1 - dv : dv; }
    __device__ __forceinline__ long long hw() const { return (long long)H * W; }

    // The wavefront works in padded-corner coordinates (r, c): distances from
    // the padded rows and columns. Anti-diagonal d holds the pixels with
    // r + c = d, rows r in [diag_first(d), diag_first(d) + diag_length(d)).
    __device__ __forceinline__ int diag_first(int d) const { return d - (W - 1) > 0 ? d - (W - 1) : 0; }
    __device__ __forceinline__ int diag_length(int d) const {
        return (d < H - 1 ? d : H - 1) - diag_first(d) + 1;
    }
    __device__ __forceinline__ int image_row(int r) const { return rs > 0 ? r : H - 1 - r; }
    __device__ __forceinline__ int image_col(int c) const { return cs > 0 ? c : W - 1 - c; }
};

// The effective weight W_eff[o, il, u, v] for offset (du, dv): the same-pixel
// block is lower-triangular (il > local o ignored) and its diagonal is 1 when
// unit; ignored entries are never read, so NaN stored there cannot leak.
template <typename T>
__device__ __forceinline__ T ic_weight(const T* w, const IcParams& s, int o, int il,
                                       int du, int dv) {
    if (du == 0 && dv == 0) {
        int ol = o % s.cg;
        if (il > ol) return T(0);
        if (il == ol && s.unit) return T(1);
    }
    return w[((long long)(o * s.cg + il) * s.kh + s.tap_u(du)) * s.kw + s.tap_v(dv)];
}

// True where the convention ignores weight entry (o, il, u, v).
__device__ __forceinline__ bool ic_ignored(const IcParams& s, int o, int il, int u, int v) {
    if (u != s.tap_u(0) || v != s.tap_v(0)) return false;
    int ol = o % s.cg;
    return il > ol || (il == ol && s.unit);
}

// The masked convolution (ADJ = false) and its adjoint (ADJ = true), one body
// for both: out[b, g*cg + c] for the thread's CH own channels c sums over the
// group's channels m
//   forward: W_eff[g*cg + c, m, du, dv] * in[b, g*cg + m, h - rs*du, w - cs*dv]
//   adjoint: W_eff[g*cg + m, c, du, dv] * in[b, g*cg + m, h + rs*du, w + cs*dv]
// One thread per (image, group, CH consecutive own channels, pixel),
// grid-stride: each input value read feeds CH accumulators. Pixels vary
// fastest, so a warp's reads and writes are coalesced and its weight reads
// uniform.
template <typename T, int CH, bool ADJ>
__device__ __forceinline__ void ic_masked_conv(const T* __restrict__ in, const T* __restrict__ w,
                                               T* __restrict__ out, const IcParams& s) {
    const int chunks = (s.cg + CH - 1) / CH;
    const long long hw = s.hw();
    const long long total = (long long)s.B * s.G * chunks * hw;
    const long long taps = (long long)s.kh * s.kw;
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < total;
         e += (long long)gridDim.x * blockDim.x) {
        const int pix = (int)(e % hw);
        const long long rest = e / hw;
        const int c0 = (int)(rest % chunks) * CH;  // first own channel in the group
        const long long bg = rest / chunks;        // b * G + g
        const int gbase = (int)(bg % s.G) * s.cg;   // first channel of the group
        const int own0 = gbase + c0;                // first own channel
        const int col = pix % s.W, row = pix / s.W;
        const T* ing = in + bg * s.cg * hw;  // channel 0 of group g of image b
        T acc[CH];
        for (int j = 0; j < CH; ++j) acc[j] = T(0);
        for (int du = 0; du < s.kh; ++du) {
            const int sh = ADJ ? row + s.rs * du : row - s.rs * du;
            if (sh < 0 || sh >= s.H) continue;
            for (int dv = 0; dv < s.kw; ++dv) {
                const int sw = ADJ ? col + s.cs * dv : col - s.cs * dv;
                if (sw < 0 || sw >= s.W) continue;
                const T* ip = ing + (long long)sh * s.W + sw;
                if (du == 0 && dv == 0) {
                    // The same-pixel block is lower-triangular: own channel c
                    // reads m <= c (forward) or m >= c (adjoint) and nothing
                    // else, not even times 0, so a NaN or Inf in an ignored
                    // position's input reaches no output.
                    const int mlo = ADJ ? c0 : 0;
                    const int mhi = ADJ ? s.cg : (c0 + CH < s.cg ? c0 + CH : s.cg);
                    for (int m = mlo; m < mhi; ++m) {
                        const T v = ip[m * hw];
                        for (int j = 0; j < CH; ++j)
                            if (c0 + j < s.cg && (ADJ ? m >= c0 + j : m <= c0 + j))
                                acc[j] += (ADJ ? ic_weight(w, s, gbase + m, c0 + j, 0, 0)
                                               : ic_weight(w, s, own0 + j, m, 0, 0)) * v;
                    }
                    continue;
                }
                // W[own c0 + j, summed m] (forward) or W[summed m, own c0 + j]
                // (adjoint) at wt[(j * cg + m) * taps] or wt[(m * cg + j) * taps]
                const T* wt = ADJ ? w + (((long long)gbase * s.cg + c0) * s.kh + s.tap_u(du)) * s.kw
                                            + s.tap_v(dv)
                                  : w + ((long long)own0 * s.cg * s.kh + s.tap_u(du)) * s.kw
                                            + s.tap_v(dv);
                for (int m = 0; m < s.cg; ++m) {
                    const T v = ip[m * hw];
                    for (int j = 0; j < CH; ++j)
                        if (c0 + j < s.cg)
                            acc[j] += wt[(ADJ ? (long long)m * s.cg + j
                                              : (long long)j * s.cg + m) * taps] * v;
                }
            }
        }
        T* op = out + (bg * s.cg + c0) * hw + pix;
        for (int j = 0; j < CH; ++j)
            if (c0 + j < s.cg) op[j * hw] = acc[j];
    }
}

// Scratch of the solves, written by inv_conv_lower_inverse and
// inv_conv_fold_taps; per group g: slot 0 holds L^-1 (the inverse of the
// same-pixel block), slot off = du*kw + dv > 0 holds K'_off = L^-1 K_off;
// each slot is a cg x cg row-major matrix.
__device__ __forceinline__ long long ic_prep_slot(const IcParams& s, int g, int off) {
    return ((long long)g * s.kh * s.kw + off) * s.cg * s.cg;
}

// ---- The solves: one block per (image, group) slice -------------------------

// What both solve kernels start with: block (b, g) finds its slice, copies the
// group's K' table into shared memory when kp_in_smem, and picks where the
// slice is worked on: shared memory when slice_in_smem, else the output in
// place (global writes are visible to the block after __syncthreads). Dynamic
// shared layout: [K' table if kp_in_smem][slice if slice_in_smem]. The caller
// synchronises before reading kp.
template <typename T>
struct IcSolveSlice {
    const T* kp;        // K' table of the group (see ic_prep_slot)
    T* work;            // the slice being solved
    long long offset;   // of the slice in the (B, C, H, W) arrays
};

template <typename T>
__device__ __forceinline__ IcSolveSlice<T> ic_solve_begin(const T* __restrict__ prep, T* out,
                                                          T* smem, const IcParams& p) {
    const long long nkp = (long long)p.kh * p.kw * p.cg * p.cg;
    IcSolveSlice<T> s;
    s.offset = (long long)blockIdx.x * p.cg * p.hw();
    s.kp = prep + ic_prep_slot(p, blockIdx.x % p.G, 0);
    if (p.kp_in_smem) {
        for (long long e = threadIdx.x; e < nkp; e += blockDim.x) smem[e] = s.kp[e];
        s.kp = smem;
    }
    s.work = p.slice_in_smem ? smem + (p.kp_in_smem ? nkp : 0) : out + s.offset;
    return s;
}

// The threads' share of one anti-diagonal: body(unit, r, c) runs once for
// every (unit, pixel) of diagonal d, a unit being CH consecutive channels
// (units = ceil(cg / CH)). By default element e = unit * npix + k is split by
// a division per element. With p.lanes, thread t owns the fixed lanes t,
// t + blockDim, ... of a units x L grid (L = min(H, W), the longest
// diagonal): unit lane / L at place lane % L, worked out once per thread
// (ic_lanes), so a diagonal costs no division; places beyond the diagonal
// idle. Both visit the same elements with the same arithmetic.
struct IcLanes {
    int u0, k0;   // the thread's first lane
    int du, dk;   // blockDim.x as (units, places)
    int L;
};

__device__ __forceinline__ IcLanes ic_lanes(const IcParams& p) {
    IcLanes l;
    l.L = p.H < p.W ? p.H : p.W;
    l.u0 = threadIdx.x / l.L;
    l.k0 = threadIdx.x % l.L;
    l.du = blockDim.x / l.L;
    l.dk = blockDim.x % l.L;
    return l;
}

template <typename F>
__device__ __forceinline__ void ic_for_diagonal(const IcParams& p, const IcLanes& lanes,
                                                int units, int d, F&& body) {
    const int rmin = p.diag_first(d);
    const int npix = p.diag_length(d);
    if (p.lanes) {
        int u = lanes.u0, k = lanes.k0;
        while (u < units) {
            if (k < npix) body(u, rmin + k, d - rmin - k);
            u += lanes.du;
            k += lanes.dk;
            if (k >= lanes.L) { k -= lanes.L; ++u; }
        }
    } else {
        for (int e = threadIdx.x; e < npix * units; e += blockDim.x) {
            const int r = rmin + e % npix;
            body(e / npix, r, d - r);
        }
    }
}
