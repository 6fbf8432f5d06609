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
//     depends on the warp size or on threads running in lockstep: the emulator
//     runs a block's threads as fibers switched at barriers (or as OS threads
//     under its ThreadSanitizer race check). Between blocks: one thread may
//     wait (IC_SPIN_UNTIL) for a flag that a block holding an earlier ticket
//     of an atomic counter sets, never for one that a later block sets; see
//     the tiled solves below.
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
    int slice_in_smem;       // untiled solves: the slice is worked on in shared memory
    int nsplit;              // weight gradient: partial sums per weight entry
    int lanes;               // untiled solves: threads own fixed (channel, place) lanes
    int tile_h, tile_w;      // tiled solves: tile size in pixels
    int tiles_h, tiles_w;    // tiled solves: tiles per slice
    int w_in_smem;           // convolutions, schedule smem: the slab's weights sit in shared memory

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

// ---- The untiled solves: one block per (image, group) slice -----------------

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

// ---- The tiled solves: several blocks per slice ------------------------------
//
// The slice is cut into tiles of tile_h x tile_w pixels (at least kh-1 x kw-1,
// so a tile reads only its up-left neighbours). Blocks take tiles through an
// atomic ticket (flags[0]) in dependency order: tile anti-diagonal first, then
// the tile, then the slice, so every tile a block waits for has a smaller
// ticket and is held by a block that is running or done: no deadlock, whatever
// order the GPU starts blocks in. A finished tile writes its values, fences,
// and sets its ready flag (flags[1 + slice * tiles + tile]); a block waits for
// the flags of the tiles it reads, fences, and reads their values with __ldcg
// (from L2: its L1 may hold a stale line from before they were written).
//
// The solves walk coordinates (a, b) in which every pixel reads pixels up and
// to the left, (a - du, b - dv): the padded-corner coordinates (r, c) for the
// forward solve, (H-1-r, W-1-c) for the adjoint.
//
// Waiting on another block is the one spin-wait the kernels have (see rule 4).
// The emulator runs blocks one after another, so there a flag is set already
// or never will be, and its CUEMU_SPIN_UNTIL fails instead of hanging.
#ifdef INVCONV_EMULATOR
#define IC_SPIN_UNTIL(cond) CUEMU_SPIN_UNTIL(cond)
#else
#define IC_SPIN_UNTIL(cond) \
    do {                    \
        while (!(cond)) {   \
        }                   \
    } while (0)
#endif

__device__ __forceinline__ int ic_load_flag(const int* flag) {
    return *reinterpret_cast<const volatile int*>(flag);
}

struct IcTile {
    int slice;        // b * G + g
    int ti, tj;       // tile row and column
    int a0, b0;       // walk coordinates of its first pixel
    int rows, cols;   // its size (the last row and column of tiles may be smaller)
};

__device__ __forceinline__ IcTile ic_tile_of_ticket(const IcParams& p, long long ticket) {
    const long long slices = (long long)p.B * p.G;
    IcTile t;
    for (int D = 0;; ++D) {  // tile anti-diagonals: there are tiles_h + tiles_w - 1
        const int first = D - (p.tiles_w - 1) > 0 ? D - (p.tiles_w - 1) : 0;
        const int last = D < p.tiles_h - 1 ? D : p.tiles_h - 1;
        const long long n = (long long)(last - first + 1) * slices;
        if (ticket < n || D == p.tiles_h + p.tiles_w - 2) {
            t.ti = first + (int)(ticket / slices);
            t.tj = D - t.ti;
            t.slice = (int)(ticket % slices);
            break;
        }
        ticket -= n;
    }
    t.a0 = t.ti * p.tile_h;
    t.b0 = t.tj * p.tile_w;
    t.rows = p.H - t.a0 < p.tile_h ? p.H - t.a0 : p.tile_h;
    t.cols = p.W - t.b0 < p.tile_w ? p.W - t.b0 : p.tile_w;
    return t;
}

// The tiled solve, forward (ADJ = false: x = M^-1 y, rhs = y, out = x) or
// adjoint (ADJ = true: grad_y = M^-T grad_x, rhs = grad_x, out = grad_y).
// `done` holds the values finished tiles pass on: x itself (done == out) for
// the forward solve, g_hat = (I + N'^T)^-1 grad_x for the adjoint, whose out
// holds L^-T g_hat instead. Shared memory: [ticket][K' if kp_in_smem][tile
// with a halo of kh-1 rows and kw-1 columns, per channel].
template <typename T, bool ADJ>
__device__ __forceinline__ void ic_solve_tiled(const T* __restrict__ rhs,
                                               const T* __restrict__ prep, T* out, T* done,
                                               int* flags, const IcParams& p) {
    IC_DYNAMIC_SHARED(T, shared);
    int* ticket = reinterpret_cast<int*>(shared);
    T* smem = shared + (16 + sizeof(T) - 1) / sizeof(T);
    const int cg = p.cg;
    const long long hw = p.hw();
    const long long nkp = (long long)p.kh * p.kw * cg * cg;

    if (threadIdx.x == 0) *ticket = atomicAdd(flags, 1);
    __syncthreads();
    const IcTile t = ic_tile_of_ticket(p, *ticket);
    const int* ready = flags + 1 + (long long)t.slice * p.tiles_h * p.tiles_w;
    if (threadIdx.x == 0) {
        if (t.ti > 0) IC_SPIN_UNTIL(ic_load_flag(ready + (t.ti - 1) * p.tiles_w + t.tj) != 0);
        if (t.tj > 0) IC_SPIN_UNTIL(ic_load_flag(ready + t.ti * p.tiles_w + t.tj - 1) != 0);
        if (t.ti > 0 && t.tj > 0)
            IC_SPIN_UNTIL(ic_load_flag(ready + (t.ti - 1) * p.tiles_w + t.tj - 1) != 0);
        __threadfence();
    }
    const T* kp = prep + ic_prep_slot(p, t.slice % p.G, 0);
    if (p.kp_in_smem) {  // while thread 0 waits
        for (long long e = threadIdx.x; e < nkp; e += blockDim.x) smem[e] = kp[e];
        kp = smem;
    }
    T* work = smem + (p.kp_in_smem ? nkp : 0);
    __syncthreads();

    const int th = p.tile_h + p.kh - 1, tw = p.tile_w + p.kw - 1;  // with the halo
    const long long cell_count = (long long)th * tw;
    const long long slice_offset = (long long)t.slice * cg * hw;
    // Image offset of walk pixel (a, b).
    auto pixel = [&](int a, int b) -> long long {
        const int h = ((p.rs > 0) != ADJ) ? a : p.H - 1 - a;
        const int w = ((p.cs > 0) != ADJ) ? b : p.W - 1 - b;
        return (long long)h * p.W + w;
    };
    // The tile's right-hand side (L^-1 y for the forward solve) and the halo
    // from the finished neighbours; halo cells outside the image, or beside
    // the tile's last row or column, are never read.
    for (long long e = threadIdx.x; e < cg * cell_count; e += blockDim.x) {
        const int ch = (int)(e / cell_count);
        const int q = (int)(e % cell_count);
        const int a = t.a0 + q / tw - (p.kh - 1), b = t.b0 + q % tw - (p.kw - 1);
        if (a < 0 || b < 0 || a >= t.a0 + t.rows || b >= t.b0 + t.cols) continue;
        const long long pix = slice_offset + pixel(a, b);
        if (a >= t.a0 && b >= t.b0) {
            if (ADJ) {
                work[e] = rhs[pix + ch * hw];
            } else {
                T acc = T(0);
                for (int i = 0; i <= ch; ++i) acc += kp[ch * cg + i] * rhs[pix + i * hw];
                work[e] = acc;
            }
        } else {
            work[e] = __ldcg(done + pix + ch * hw);
        }
    }
    __syncthreads();

    // The tile's own anti-diagonals, one barrier apart.
    for (int d = 0; d < t.rows + t.cols - 1; ++d) {
        const int first = d - (t.cols - 1) > 0 ? d - (t.cols - 1) : 0;
        const int len = (d < t.rows - 1 ? d : t.rows - 1) - first + 1;
        for (int e = threadIdx.x; e < len * cg; e += blockDim.x) {
            const int ch = e / len;
            const int lr = first + e % len, lc = d - lr;
            const int a = t.a0 + lr, b = t.b0 + lc;
            T* cell = work + ch * cell_count + (long long)(lr + p.kh - 1) * tw + lc + p.kw - 1;
            T acc = *cell;
            const int dumax = a < p.kh - 1 ? a : p.kh - 1;
            const int dvmax = b < p.kw - 1 ? b : p.kw - 1;
            for (int du = 0; du <= dumax; ++du) {
                for (int dv = du == 0 ? 1 : 0; dv <= dvmax; ++dv) {
                    const int off = du * p.kw + dv;
                    // Row ch of K'_off (forward) or its column ch (adjoint).
                    const T* k = ADJ ? kp + (long long)off * cg * cg + ch
                                     : kp + ((long long)off * cg + ch) * cg;
                    const long long kstride = ADJ ? cg : 1;
                    const T* src = cell - ch * cell_count - du * tw - dv;
                    for (int m = 0; m < cg; ++m) acc -= k[m * kstride] * src[m * cell_count];
                }
            }
            *cell = acc;
        }
        __syncthreads();
    }

    const int area = t.rows * t.cols;
    for (int e = threadIdx.x; e < cg * area; e += blockDim.x) {
        const int ch = e / area;
        const int lr = (e % area) / t.cols, lc = (e % area) % t.cols;
        const T* cell = work + ch * cell_count + (long long)(lr + p.kh - 1) * tw + lc + p.kw - 1;
        const long long pix = slice_offset + pixel(t.a0 + lr, t.b0 + lc) + ch * hw;
        if (ADJ) {
            done[pix] = *cell;
            // grad_y[ch] = sum_{o >= ch} L^-1[o, ch] g_hat[o]
            T acc = T(0);
            for (int o = ch; o < cg; ++o) acc += kp[o * cg + ch] * cell[(o - ch) * cell_count];
            out[pix] = acc;
        } else {
            out[pix] = *cell;
        }
    }
    __threadfence();  // the tile's values before its flag, for every thread
    __syncthreads();
    if (threadIdx.x == 0) atomicExch(flags + 1 + (long long)t.slice * p.tiles_h * p.tiles_w
                                         + t.ti * p.tiles_w + t.tj, 1);
}
