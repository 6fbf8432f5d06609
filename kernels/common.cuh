// invconv kernels: helpers shared by forward.cu and backward.cu.
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
//  4. Only __syncthreads() synchronises, and every thread of the block reaches
//     every __syncthreads() (barrier loops have block-uniform bounds). No warp
//     shuffles, votes, __syncwarp, cooperative groups, spin-waits on other
//     threads, and nothing that depends on the warp size or on threads running
//     in lockstep: the emulator runs a block's threads as fibers switched at
//     barriers (or as OS threads under its ThreadSanitizer race check).
//  5. Kernel arguments are pointers and int; sizes and offsets that can pass
//     2^31 are computed in long long.
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

// The operator in offset form (see src/invconv/_api.py): output pixel (h, w)
// reads input pixel (h - rs*du, w - cs*dv) for 0 <= du < kh, 0 <= dv < kw,
// with rs = +1 when the top is padded (-1: bottom) and cs = +1 when the left
// is padded (-1: right). Offset (0, 0) is the same-pixel tap.
struct ConvShape {
    int B, C, H, W, G, cg, kh, kw, rs, cs, unit;

    __device__ ConvShape(int B_, int C_, int H_, int W_, int G_, int kh_, int kw_,
                         int rs_, int cs_, int unit_)
        : B(B_), C(C_), H(H_), W(W_), G(G_), cg(C_ / G_), kh(kh_), kw(kw_),
          rs(rs_), cs(cs_), unit(unit_) {}

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
__device__ __forceinline__ T ic_weight(const T* w, const ConvShape& s, int o, int il,
                                       int du, int dv) {
    if (du == 0 && dv == 0) {
        int ol = o % s.cg;
        if (il > ol) return T(0);
        if (il == ol && s.unit) return T(1);
    }
    return w[((long long)(o * s.cg + il) * s.kh + s.tap_u(du)) * s.kw + s.tap_v(dv)];
}

// True where the convention ignores weight entry (o, il, u, v).
__device__ __forceinline__ bool ic_ignored(const ConvShape& s, int o, int il, int u, int v) {
    if (u != s.tap_u(0) || v != s.tap_v(0)) return false;
    int ol = o % s.cg;
    return il > ol || (il == ol && s.unit);
}

// Scratch of the solves, written by inv_conv_lower_inverse and
// inv_conv_fold_taps; per group g: slot 0 holds L^-1 (the inverse of the
// same-pixel block), slot off = du*kw + dv > 0 holds K'_off = L^-1 K_off;
// each slot is a cg x cg row-major matrix.
__device__ __forceinline__ long long ic_prep_slot(const ConvShape& s, int g, int off) {
    return ((long long)g * s.kh * s.kw + off) * s.cg * s.cg;
}
