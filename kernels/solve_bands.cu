// The solves under schedule "bands:R" (off by default: no GPU has timed it
// yet; see src/invconv/_kernels.py): a pipelined band wavefront for large
// images at small batch (issue 17, item 4: 1x3x1024x1024 spends 12.4 us a
// diagonal step with one block a slice, its slice in global memory). Each
// (image, group) slice is cut into bands of R rows (of the walk coordinates
// below), one block a band; a block walks its band's anti-diagonals with the
// band's rows in shared memory and publishes after every step how many
// columns of the band are complete; the band below waits only for the
// columns it needs next, so bands run about R + 1 steps apart and the
// critical path stays near H + W - 1 steps (plus about one a band), not tile
// diagonals x tile steps as in the removed "tiled" schedule. The maths is
// that of inv_conv_solve and inv_conv_solve_adjoint (forward.cu,
// backward.cu) with one channel a thread. In a file of its own, compiled on
// first use.
//
// Walk coordinates (a, b): the padded-corner coordinates (r, c) for the
// forward solve, (H-1-r, W-1-c) for the adjoint; in both, pixel (a, b) reads
// pixels (a - du, b - dv), 0 <= du < kh, 0 <= dv < kw. So the dependency
// rule: a pixel of band k at walk column b needs, from the bands above, only
// the kh - 1 walk rows just above the band at columns <= b. The launcher
// makes R >= kh - 1 (R = max(R, kh - 1)), so those rows all lie in band
// k - 1, and every band but the last has R rows.
//
// Synchronisation (rule 4 of common.cuh, the one wait between blocks):
// - flags[0] is a ticket counter; ticket t is band t / (B*G) of slice
//   t % (B*G), so band k - 1 of a slice always holds an earlier ticket than
//   band k: a block waits only for a block that is running or done, whatever
//   order the GPU starts blocks in (the emulator runs them one after another;
//   there the band above is done and every wait passes at once).
// - flags[1 + slice * bands + k] is band k's progress: its rows are complete
//   at walk columns < flags[...]. After local diagonal d (rows lr, columns
//   d - lr) the last row, the slowest, is complete up to column d - rows + 1,
//   so the band publishes min(max(d - rows + 2, 0), W), W at the end.
// - A band passes on its last kh - 1 rows through `edge` (per (slice, band),
//   cg x (kh-1) x W values): the thread that computes a value there writes
//   it; after the step's barrier one thread fences and publishes the
//   progress (the pattern of a grid barrier: bar.sync, then one thread's
//   fence and flag). The band below keeps the halo (those kh - 1 rows) in
//   shared memory, one column ahead: during its step d it loads halo column
//   d + 1 with __ldcg (from L2, never a stale L1 line), which thread 0 waited
//   for (flag >= d + 2, then a fence) before the barrier that ends step
//   d - 1. So a dependent step reads shared memory only; the step's global
//   reads (its halo column, the flag) are issued before its arithmetic and
//   consumed after it.
// - Lag: band k computes local diagonal d once band k - 1 has published
//   d + 2 columns, i.e. finished its local diagonal d + R; so bands run
//   R + 1 steps apart (plus a fence and a flag's trip through L2) and a
//   slice takes about H + W - 1 + bands steps.
//
// Arrays are contiguous (B, C, H, W); the scratch prep as in forward.cu.
// Shape and launch choices as one IcParams (see common.cuh); p.band_rows = R,
// p.bands = ceil(H / R). Dynamic shared layout: [ticket, 16 bytes][the
// group's K' table if p.kp_in_smem][the band: cg x (kh - 1 + R) x W values,
// halo rows first]; the launcher uses this schedule only where the band
// fits.
#include "common.cuh"

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

// The band solve, forward (ADJ = false: x = M^-1 y, rhs = y, out = x) or
// adjoint (ADJ = true: grad_y = M^-T grad_x, rhs = grad_x, out = grad_y; the
// band solves g_hat = (I + N'^T)^-1 grad_x and writes L^-T g_hat).
template <typename T, bool ADJ>
__device__ __forceinline__ void ic_solve_bands(const T* __restrict__ rhs,
                                               const T* __restrict__ prep, T* __restrict__ out,
                                               T* edge, int* flags, const IcParams& p) {
    IC_DYNAMIC_SHARED(T, shared);
    int* ticket = reinterpret_cast<int*>(shared);
    T* smem = shared + (16 + sizeof(T) - 1) / sizeof(T);
    const int cg = p.cg, kh = p.kh, kw = p.kw, W = p.W, R = p.band_rows, halo = kh - 1;
    const long long hw = p.hw();
    const long long nkp = (long long)kh * kw * cg * cg;
    const long long slices = (long long)p.B * p.G;

    if (threadIdx.x == 0) *ticket = atomicAdd(flags, 1);
    __syncthreads();
    const long long t = *ticket;
    const int band = (int)(t / slices);
    const long long slice = t % slices;
    const int a0 = band * R;
    const int rows = p.H - a0 < R ? p.H - a0 : R;
    const bool waits = band > 0 && halo > 0;
    const bool passes = band < p.bands - 1 && halo > 0;  // someone reads its edge
    int* progress = flags + 1 + slice * p.bands + band;
    const int* above = progress - 1;
    const long long edge_len = (long long)cg * halo * W;
    T* my_edge = edge + (slice * p.bands + band) * edge_len;
    const T* above_edge = my_edge - edge_len;

    const T* kp = prep + ic_prep_slot(p, (int)(slice % p.G), 0);
    if (p.kp_in_smem) {
        for (long long e = threadIdx.x; e < nkp; e += blockDim.x) smem[e] = kp[e];
        kp = smem;
    }
    T* work = smem + (p.kp_in_smem ? nkp : 0);
    const int tall = halo + R;                 // rows of the band in shared memory
    const long long plane = (long long)tall * W;
    const long long slice_offset = slice * cg * hw;
    // Image offset of walk pixel (a, b).
    auto pixel = [&](int a, int b) -> long long {
        const int h = ((p.rs > 0) != ADJ) ? a : p.H - 1 - a;
        const int w = ((p.cs > 0) != ADJ) ? b : p.W - 1 - b;
        return (long long)h * W + w;
    };
    // Halo column col (kh - 1 rows x cg channels) from the band above.
    auto load_halo = [&](int col) {
        if (col >= W) return;
        for (int e = threadIdx.x; e < halo * cg; e += blockDim.x) {
            const int ch = e / halo, q = e % halo;
            work[ch * plane + (long long)q * W + col] =
                __ldcg(above_edge + ((long long)ch * halo + q) * W + col);
        }
    };
    __syncthreads();  // kp
    // The band's right-hand side, L^-1 y (forward) or grad_x (adjoint),
    // before any wait: every band loads its own at once.
    const long long area = (long long)rows * W;
    for (long long e = threadIdx.x; e < cg * area; e += blockDim.x) {
        const int ch = (int)(e / area);
        const long long q = e % area;
        const int lr = (int)(q / W), b = (int)(q % W);
        const long long pix = slice_offset + pixel(a0 + lr, b);
        T acc;
        if (ADJ) {
            acc = rhs[pix + ch * hw];
        } else {
            acc = T(0);
            for (int i = 0; i <= ch; ++i) acc += kp[ch * cg + i] * rhs[pix + i * hw];
        }
        work[ch * plane + (long long)(lr + halo) * W + b] = acc;
    }
    if (threadIdx.x == 0 && waits) {  // halo columns 0 and 1
        IC_SPIN_UNTIL(ic_load_flag(above) >= (W < 2 ? W : 2));
        __threadfence();
    }
    __syncthreads();  // thread 0's wait
    if (waits) load_halo(0);
    __syncthreads();

    // Per step d: the publisher (the last thread, so that thread 0's wait
    // and its own pixels do not queue behind its fence) publishes step d - 1
    // (fence after the barrier, then the flag: the grid-barrier pattern, one
    // fence a step for the block); every thread issues its share of halo
    // column d + 1 into a register before computing and stores it after, so
    // the L2 latency overlaps the step's arithmetic; thread 0 issues its read
    // of the flag early too, and reads it again (spins) only while the
    // progress it knows falls short of the next step's need.
    const bool publisher = threadIdx.x == blockDim.x - 1;
    int known = W < 2 ? W : 2;   // thread 0: progress seen (and fenced) so far
    const int steps = rows + W - 1;
    for (int d = 0; d < steps; ++d) {
        if (publisher && passes && d >= rows) {  // step d - 1 completed column d - rows
            __threadfence();
            atomicExch(progress, d + 1 - rows);
        }
        const int need = d + 3 < W ? d + 3 : W;  // halo column d + 2, loaded in step d + 1
        const bool check = threadIdx.x == 0 && waits && known < need;
        const int seen = check ? ic_load_flag(above) : known;
        // Halo column d + 1, read from step d + 1 on (step d reads columns <= d).
        const bool fetch = waits && d + 1 < W && threadIdx.x < halo * cg;
        T pre = T(0);
        if (fetch) {
            const int ch = threadIdx.x / halo, q = threadIdx.x % halo;
            pre = __ldcg(above_edge + ((long long)ch * halo + q) * W + d + 1);
        }
        if (waits && d + 1 < W) {   // the rest, where the block has fewer threads
            for (int e = threadIdx.x + blockDim.x; e < halo * cg; e += blockDim.x) {
                const int ch = e / halo, q = e % halo;
                work[ch * plane + (long long)q * W + d + 1] =
                    __ldcg(above_edge + ((long long)ch * halo + q) * W + d + 1);
            }
        }
        const int first = d - (W - 1) > 0 ? d - (W - 1) : 0;
        const int len = (d < rows - 1 ? d : rows - 1) - first + 1;
        for (int e = threadIdx.x; e < len * cg; e += blockDim.x) {
            const int ch = e / len;
            const int lr = first + e % len, b = d - lr;
            const int a = a0 + lr;
            T* cell = work + ch * plane + (long long)(lr + halo) * W + b;
            T acc = *cell;
            const int dumax = a < halo ? a : halo;
            const int dvmax = b < kw - 1 ? b : kw - 1;
            for (int du = 0; du <= dumax; ++du) {
                for (int dv = du == 0 ? 1 : 0; dv <= dvmax; ++dv) {
                    const int off = du * kw + dv;
                    // Row ch of K'_off (forward) or its column ch (adjoint).
                    const T* k = ADJ ? kp + (long long)off * cg * cg + ch
                                     : kp + ((long long)off * cg + ch) * cg;
                    const long long kstride = ADJ ? cg : 1;
                    const T* src = cell - ch * plane - (long long)du * W - dv;
                    for (int m = 0; m < cg; ++m) acc -= k[m * kstride] * src[m * plane];
                }
            }
            *cell = acc;
            if (passes && lr >= rows - halo)
                my_edge[((long long)ch * halo + lr - (rows - halo)) * W + b] = acc;
        }
        if (fetch) {
            const int ch = threadIdx.x / halo, q = threadIdx.x % halo;
            work[ch * plane + (long long)q * W + d + 1] = pre;
        }
        if (check) {
            known = seen;
            if (known < need) IC_SPIN_UNTIL((known = ic_load_flag(above)) >= need);
            __threadfence();
        }
        __syncthreads();
    }
    if (publisher && passes) {
        __threadfence();
        atomicExch(progress, W);
    }

    for (long long e = threadIdx.x; e < cg * area; e += blockDim.x) {
        const int ch = (int)(e / area);
        const long long q = e % area;
        const int lr = (int)(q / W), b = (int)(q % W);
        const T* cell = work + ch * plane + (long long)(lr + halo) * W + b;
        const long long pix = slice_offset + pixel(a0 + lr, b) + ch * hw;
        if (ADJ) {
            // grad_y[ch] = sum_{o >= ch} L^-1[o, ch] g_hat[o]
            T acc = T(0);
            for (int o = ch; o < cg; ++o) acc += kp[o * cg + ch] * cell[(o - ch) * plane];
            out[pix] = acc;
        } else {
            out[pix] = *cell;
        }
    }
}

// x = M^-1 y, one block a (slice, band). edge: scratch of B*G*bands*cg*(kh-1)*W
// values (any, at least one); flags: 1 + B*G*bands zeros.
template <typename T>
__global__ void inv_conv_solve_bands(const T* __restrict__ y, const T* __restrict__ prep,
                                     T* __restrict__ x, T* edge, int* flags, const IcParams p) {
    ic_solve_bands<T, false>(y, prep, x, edge, flags, p);
}

// grad_y = M^-T grad_x, one block a (slice, band), walking the reverse
// order (walk coordinates (H-1-r, W-1-c)) with the transposed taps; edge and
// flags as above.
template <typename T>
__global__ void inv_conv_solve_adjoint_bands(const T* __restrict__ gx,
                                             const T* __restrict__ prep, T* __restrict__ gy,
                                             T* edge, int* flags, const IcParams p) {
    ic_solve_bands<T, true>(gx, prep, gy, edge, flags, p);
}
