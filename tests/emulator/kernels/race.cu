// Block sum in shared memory; reduce<false> lacks the barrier between the
// writes of one step and the reads of the next: a data race.
template <bool Sync>
__global__ void reduce(const float* x, float* out, int n) {
  __shared__ float buf[256];
  unsigned t = threadIdx.x;
  unsigned i = blockIdx.x * blockDim.x + t;
  buf[t] = i < n ? x[i] : 0.0f;
  __syncthreads();
  for (unsigned w = blockDim.x / 2; w > 0; w /= 2) {
    if (t < w) buf[t] += buf[t + w];
    if (Sync) __syncthreads();
  }
  if (t == 0) out[blockIdx.x] = buf[0];
}
