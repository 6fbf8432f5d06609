// Kernels for tests/emulator/test_emulator.py.
#include "test_common.cuh"

// Each block sums its own blockDim.x elements of x through dynamic shared
// memory; the tree works for any block size, powers of two or not.
template <class T>
__global__ void block_sum(const T* __restrict__ x, T* partial, int n) {
  TEST_DYNAMIC_SHARED(T, buf);
  unsigned t = threadIdx.x;
  long long i = 1ll * blockIdx.x * blockDim.x + t;
  buf[t] = i < n ? x[i] : T(0);
  __syncthreads();
  for (unsigned w = 1; w < blockDim.x; w *= 2) {
    if (t % (2 * w) == 0 && t + w < blockDim.x) buf[t] += buf[t + w];
    __syncthreads();
  }
  if (t == 0) partial[blockIdx.x] = buf[0];
}

// Eight numbers per thread, at its global linear index.
extern "C" __global__ void write_indices(unsigned* out) {
  unsigned long long block = blockIdx.x + gridDim.x * (blockIdx.y + 1ull * gridDim.y * blockIdx.z);
  unsigned long long thread = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  unsigned* o = out + 8 * (block * blockDim.x * blockDim.y * blockDim.z + thread);
  // The indices are read again after a switch to other threads (fibers).
  __syncthreads();
  o[0] = threadIdx.x; o[1] = threadIdx.y; o[2] = threadIdx.z;
  o[3] = blockIdx.x; o[4] = blockIdx.y; o[5] = blockIdx.z;
  o[6] = blockDim.x * blockDim.y * blockDim.z;
  o[7] = gridDim.x * gridDim.y * gridDim.z;
}

template <class T>
__global__ void atomic_count(T* acc, int* icount, unsigned long long* ucount, int reps) {
  for (int r = 0; r < reps; ++r) {
    atomicAdd(acc, T(1));
    atomicAdd(icount, 1);
    atomicAdd(ucount, 1ull);
  }
}

// Reads shared memory nobody wrote in this block, then writes it, so that a
// poisoning done only once per launch would show in the next block.
__device__ __forceinline__ float* helper_static_shared() {
  __shared__ float helper[64];
  return helper;
}
template <class T>
__global__ void read_unwritten(T* out_static, T* out_dynamic, float* out_helper) {
  __shared__ T st[64];
  TEST_DYNAMIC_SHARED(T, dyn);
  float* helper = helper_static_shared();
  unsigned t = threadIdx.x, b = blockIdx.x;
  out_static[b * blockDim.x + t] = st[t];
  out_dynamic[b * blockDim.x + t] = dyn[t];
  out_helper[b * blockDim.x + t] = helper[t];
  __syncthreads();
  st[t] = T(1);
  dyn[t] = T(1);
  helper[t] = 1.0f;
}

// Threads with t % 3 == 0 leave before the first barrier, threads with
// t % 3 == 1 after it; the others keep synchronising and read each other.
extern "C" __global__ void early_exit(float* out) {
  __shared__ float buf[1024];
  unsigned t = threadIdx.x, n = blockDim.x;
  float* o = out + blockIdx.x * n;
  if (t % 3 == 0) return;
  buf[t] = float(t + blockIdx.x);
  __syncthreads();
  if (t % 3 == 1) { o[t] = buf[t]; return; }
  unsigned p = t + 3 < n ? t + 3 : t;  // another t % 3 == 2 thread
  float v = buf[p];
  __syncthreads();
  buf[t] = v;
  __syncthreads();
  o[t] = buf[t];
}

extern "C" __global__ void votes(int* out) {
  unsigned t = threadIdx.x;
  int* o = out + 3 * (blockIdx.x * blockDim.x + t);
  o[0] = __syncthreads_count(t % 3 == 0);
  o[1] = __syncthreads_and(t < 1000);
  o[2] = __syncthreads_or(t == blockIdx.x);
}

// Reads its left neighbour's write without a barrier in between.
extern "C" __global__ void shift_nosync(float* out) {
  __shared__ float buf[1024];
  unsigned t = threadIdx.x;
  buf[t] = float(t);
  out[blockIdx.x * blockDim.x + t] = t > 0 ? buf[t - 1] : 0.0f;
}

extern "C" __global__ void trap_if(int flag) {
  if (flag && threadIdx.x == 1) __trap();
}

struct Pair { int a; float b; };
extern "C" __global__ void scalars(double* out, float f, double d, int i, long long l,
                                   unsigned u, Pair p) {
  out[0] = f; out[1] = d; out[2] = i; out[3] = double(l); out[4] = u; out[5] = p.a; out[6] = p.b;
}

// Blocks take tickets from an atomic counter and record who ran when; ticket
// t waits for the flag of ticket t - 1 (a chain that never spins when blocks
// run one after another), or, with `wrong`, for ticket t + 1, which no block
// that ran before it can have set.
extern "C" __global__ void ticket_chain(int* counter, int* flags, int* order, int wrong) {
  __shared__ int ticket;
  if (threadIdx.x == 0) ticket = atomicAdd(counter, 1);
  __syncthreads();
  const int t = ticket;
  const int wait_for = wrong ? t + 1 : t - 1;
  if (threadIdx.x == 0 && wait_for >= 0 && wait_for < int(gridDim.x)) {
    CUEMU_SPIN_UNTIL(*reinterpret_cast<volatile int*>(flags + wait_for) != 0);
    __threadfence();
  }
  __syncthreads();
  if (threadIdx.x == 0) order[t] = int(blockIdx.x);
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) atomicExch(flags + t, 1);
}
