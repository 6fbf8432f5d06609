// cuda_emu.h: lets g++/clang++ (C++20) compile CUDA C kernel sources for the CPU.
//
// Force-included (-include cuda_emu.h) before a kernel source by the Python
// loader (invconv.emulator), which also generates the launch wrappers.
//
// What kernels may use: threadIdx, blockIdx, blockDim, gridDim, warpSize,
// dim3; __global__, __device__, __host__, __forceinline__, __noinline__,
// __restrict__, __launch_bounds__, __align__, __constant__ (initialised
// only), __shared__ (static declarations; dynamic shared memory comes from
// cuemu::dynamic_shared_memory(), as `extern __shared__` cannot be expressed);
// __syncthreads[_count|_and|_or], __threadfence[_block|_system], __trap;
// atomicAdd/Sub/Exch/Min/Max/And/Or/Xor/Inc/Dec/CAS on the usual types;
// min/max, <cmath>, rsqrt(f), a few __intrinsics, __ldg/__ldcg/__ldcv/__stcg;
// float2..uint4; CUEMU_SPIN_UNTIL for waits on flags other blocks set.
// Warp-level primitives fail to compile with a "cuemu:" message.
//
// Blocks run one after another, so function statics model static shared
// memory.  Two engines run the threads of a block: fibers on the calling
// thread (default; a barrier is a user-space context switch), or with
// CUEMU_OS_THREADS one OS thread per CUDA thread on std::barrier (for
// ThreadSanitizer).  Each library is one translation unit, hence the internal
// linkage of all state below: loaded modules never share symbols.
#pragma once
#define INVCONV_EMULATOR 1

#include <math.h>  // libstdc++'s math.h also puts the float overloads of std:: into ::
#include <atomic>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <sys/mman.h>
#include <unistd.h>
#include <mutex>
#include <new>
#include <stdexcept>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __constant__
// The loader finds these statics in the library's symbol table and registers
// them for poisoning: g++ 12 ignores a section attribute (for __start_/__stop_
// symbols) on statics in templates, and rejects one shared by inline and
// non-inline functions ("section type conflict").
#define __shared__ static

// The fiber engine runs all CUDA threads of a launch on the calling OS thread,
// so the indices need not be thread-local there.
#ifdef CUEMU_OS_THREADS
#include <barrier>
#include <optional>
#include <thread>
#define CUEMU_TLS thread_local
#else
#define CUEMU_TLS
#endif
#ifndef CUEMU_STACK_SIZE
#define CUEMU_STACK_SIZE (256 * 1024)
#endif

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
static CUEMU_TLS dim3 threadIdx, blockIdx;
static dim3 blockDim, gridDim;
static constexpr int warpSize = 32;

#define CUEMU_VEC(T, N, A)                                                        \
  struct __align__(A) N##2 { T x, y; };                                           \
  struct N##3 { T x, y, z; };                                                     \
  struct __align__(A * 2) N##4 { T x, y, z, w; };                                 \
  static inline N##2 make_##N##2(T x, T y) { return {x, y}; }                     \
  static inline N##3 make_##N##3(T x, T y, T z) { return {x, y, z}; }             \
  static inline N##4 make_##N##4(T x, T y, T z, T w) { return {x, y, z, w}; }
CUEMU_VEC(float, float, 8)
CUEMU_VEC(double, double, 16)
CUEMU_VEC(int, int, 8)
CUEMU_VEC(unsigned, uint, 8)
#undef CUEMU_VEC

#if !defined(CUEMU_OS_THREADS) && defined(__x86_64__) && !defined(CUEMU_UCONTEXT)
// Saves the callee-saved registers on the current stack, stores its pointer in
// *save, and resumes the context whose stack pointer is `load`.  A local
// symbol: every emulated module carries its own copy.
asm(R"(
  .text
  .p2align 4
  .type cuemu_switch_stack, @function
cuemu_switch_stack:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size cuemu_switch_stack, .-cuemu_switch_stack
)");
extern "C" __attribute__((visibility("hidden"))) void cuemu_switch_stack(void** save, void* load);
#define CUEMU_ASM_FIBERS 1
#elif !defined(CUEMU_OS_THREADS)
#include <ucontext.h>
#endif

namespace cuemu {
namespace {

struct LaunchConfig {  // mirrored by ctypes in _module.py
  unsigned grid[3];
  unsigned block[3];
  unsigned long long shared_mem;
  char* error;  // receives a message when launch() returns non-zero
  unsigned long long error_size;
};

enum ArgKind : int { kInteger = 0, kFloating = 1, kPointer = 2, kOther = 3, kVoid = 4 };
struct ArgInfo {  // mirrored by ctypes in _module.py
  unsigned long long size;
  int kind;
  int pointee_kind;
  unsigned long long pointee_size;
};

namespace detail {
template <class...> inline constexpr bool dependent_false = false;

template <class T, class F>
T atomic_update(T* a, F f) {
  std::atomic_ref<T> r(*a);
  T old = r.load();
  while (!r.compare_exchange_weak(old, f(old))) {
  }
  return old;
}

struct Range {
  unsigned char* begin;
  unsigned long long size;
};
std::vector<Range> static_shared;  // registered by the loader
unsigned char* dyn_smem = nullptr;
std::atomic<int> sync_count[3];
std::vector<unsigned> sync_count_calls;  // per CUDA thread of the block
std::mutex launch_mutex;  // static shared memory allows one launch at a time

struct Launch {
  unsigned nthreads;
  unsigned long long nblocks, smem;
  void (*body)(void*);
  void* ctx;
  std::mutex error_mutex;
  std::exception_ptr error;
  std::atomic<bool> failed{false};
  bool reverse_blocks = false;
  void fail(std::exception_ptr e) {
    std::lock_guard lock(error_mutex);
    if (!error) error = e;
    failed.store(true);
  }
  void run_body() {
    try {
      body(ctx);
    } catch (...) {
      fail(std::current_exception());
    }
  }
};

// The n-th block to run: blockIdx order, or the reverse with
// INVCONV_EMULATOR_BLOCK_ORDER=reverse (read at every launch), which shows a
// kernel that relies on blocks starting in blockIdx order (a GPU promises no
// order; kernels that need one take tickets from an atomic counter).
unsigned long long block_at(const Launch& L, unsigned long long n) {
  return L.reverse_blocks ? L.nblocks - 1 - n : n;
}

// Called while no CUDA thread runs: 0xFF bytes read as NaN in float and double.
void begin_block(const Launch& L) {
  if (L.smem) std::memset(dyn_smem, 0xFF, L.smem);
  for (const Range& r : static_shared) std::memset(r.begin, 0xFF, r.size);
  for (auto& c : sync_count) c.store(0, std::memory_order_relaxed);
  sync_count_calls.assign(L.nthreads, 0);
}
void set_block_idx(unsigned long long b) {
  blockIdx = dim3(b % gridDim.x, b / gridDim.x % gridDim.y, b / (1ull * gridDim.x * gridDim.y));
}
void set_thread_idx(unsigned t) {
  threadIdx = dim3(t % blockDim.x, t / blockDim.x % blockDim.y, t / (blockDim.x * blockDim.y));
}

#ifdef CUEMU_OS_THREADS
// Engine for the race checker: one OS thread per CUDA thread, synchronised
// with std::barrier, which ThreadSanitizer understands.
std::barrier<>* sync_barrier = nullptr;
void block_sync() { sync_barrier->arrive_and_wait(); }

struct Threads {
  Launch* L;
  unsigned long long next = 0, current = 0;
  bool done = false;
  std::optional<std::barrier<>> sync;
};
// Runs on one thread while all others wait between two blocks.
struct NextBlock {
  Threads* s;
  void operator()() noexcept {
    if (s->L->failed.load() || s->next == s->L->nblocks) {
      s->done = true;
      return;
    }
    s->current = block_at(*s->L, s->next++);
    begin_block(*s->L);
    s->sync.emplace(s->L->nthreads);
    sync_barrier = &*s->sync;
  }
};

void worker(Threads* s, std::barrier<NextBlock>* step, unsigned tid) {
  set_thread_idx(tid);
  for (;;) {
    step->arrive_and_wait();
    if (s->done) return;
    set_block_idx(s->current);
    s->L->run_body();
    // Exited threads no longer count at __syncthreads, as on a GPU.
    sync_barrier->arrive_and_drop();
  }
}

void run_blocks(Launch& L) {
  Threads s{&L};
  std::barrier<NextBlock> step(L.nthreads, NextBlock{&s});
  std::vector<std::thread> threads;
  threads.reserve(L.nthreads);
  unsigned started = 0;
  try {
    for (; started < L.nthreads; ++started) threads.emplace_back(worker, &s, &step, started);
  } catch (...) {
    L.fail(std::current_exception());
    // Stand in for the threads that never started so the others can leave.
    for (unsigned i = started; i < L.nthreads; ++i) step.arrive_and_drop();
  }
  for (auto& t : threads) t.join();
  sync_barrier = nullptr;
}
#else
// Default engine: each CUDA thread is a fiber on the calling OS thread and
// __syncthreads() switches to the next one; a barrier costs two user-space
// context switches instead of an OS thread wake-up per CUDA thread.
struct Fiber {
#ifdef CUEMU_ASM_FIBERS
  void* sp;
#else
  ucontext_t uc;
#endif
  bool done;
};
Launch* fiber_launch = nullptr;
Fiber* current_fiber = nullptr;
#ifdef CUEMU_ASM_FIBERS
void* scheduler_sp = nullptr;
void switch_to_scheduler() { cuemu_switch_stack(&current_fiber->sp, scheduler_sp); }
void resume(Fiber& f) { cuemu_switch_stack(&scheduler_sp, f.sp); }
#else
ucontext_t scheduler_uc;
void switch_to_scheduler() { swapcontext(&current_fiber->uc, &scheduler_uc); }
void resume(Fiber& f) { swapcontext(&scheduler_uc, &f.uc); }
#endif
void block_sync() { switch_to_scheduler(); }

[[noreturn]] void fiber_main() {
  fiber_launch->run_body();
  current_fiber->done = true;
  switch_to_scheduler();
  __builtin_trap();  // a finished fiber is never resumed
}

void start_fiber(Fiber& f, unsigned char* stack, std::size_t size) {
  f.done = false;
#ifdef CUEMU_ASM_FIBERS
  // Six zeroed callee-saved registers, then fiber_main as return address;
  // it starts with rsp = 8 (mod 16), as after a call.
  auto top = reinterpret_cast<std::uintptr_t>(stack + size) & ~std::uintptr_t(15);
  void** sp = reinterpret_cast<void**>(top - 64);
  for (int i = 0; i < 8; ++i) sp[i] = nullptr;
  sp[6] = reinterpret_cast<void*>(&fiber_main);
  f.sp = sp;
#else
  getcontext(&f.uc);
  f.uc.uc_stack.ss_sp = stack;
  f.uc.uc_stack.ss_size = size;
  f.uc.uc_link = nullptr;
  makecontext(&f.uc, fiber_main, 0);
#endif
}

void run_blocks(Launch& L) {
  const std::size_t page = static_cast<std::size_t>(sysconf(_SC_PAGESIZE));
  const std::size_t stack = (CUEMU_STACK_SIZE + page - 1) / page * page, slot = stack + page;
  void* mem = mmap(nullptr, slot * L.nthreads, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (mem == MAP_FAILED) throw std::runtime_error("cuemu: cannot allocate fiber stacks");
  auto* base = static_cast<unsigned char*>(mem);
  // A guard page below each stack turns an overflow into a crash, not corruption.
  for (unsigned i = 0; i < L.nthreads; ++i) mprotect(base + i * slot, page, PROT_NONE);
  std::vector<Fiber> fibers(L.nthreads);
  fiber_launch = &L;
  for (unsigned long long n = 0; n < L.nblocks && !L.failed.load(); ++n) {
    const unsigned long long b = block_at(L, n);
    begin_block(L);
    set_block_idx(b);
    for (unsigned i = 0; i < L.nthreads; ++i) start_fiber(fibers[i], base + i * slot + page, stack);
    // Odd blocks run their threads in reverse order: a missing barrier then
    // shows up (as poison) whichever direction the unsynchronised access goes.
    const bool reverse = b & 1;
    for (unsigned remaining = L.nthreads; remaining;) {
      for (unsigned k = 0; k < L.nthreads; ++k) {
        unsigned i = reverse ? L.nthreads - 1 - k : k;
        if (fibers[i].done) continue;
        current_fiber = &fibers[i];
        set_thread_idx(i);
        resume(fibers[i]);
        remaining -= fibers[i].done;
      }
    }
  }
  fiber_launch = nullptr;
  current_fiber = nullptr;
  munmap(mem, slot * L.nthreads);
}
#endif

void set_error(const LaunchConfig* c, const char* msg) {
  if (c->error && c->error_size) std::snprintf(c->error, c->error_size, "%s", msg);
}

int run(const LaunchConfig* c, void (*body)(void*), void* ctx) {
  unsigned long long n = 1ull * c->block[0] * c->block[1] * c->block[2];
  unsigned long long nb = 1ull * c->grid[0] * c->grid[1] * c->grid[2];
  if (n == 0 || n > 1024 || nb == 0) return set_error(c, "cuemu: invalid launch dimensions"), 1;
  std::lock_guard lock(launch_mutex);
  blockDim = dim3(c->block[0], c->block[1], c->block[2]);
  gridDim = dim3(c->grid[0], c->grid[1], c->grid[2]);
  // Over-allocate so that the buffer can start on a 128-byte boundary.
  std::vector<unsigned char> dyn(c->shared_mem + 128);
  dyn_smem = dyn.data() + (-reinterpret_cast<std::uintptr_t>(dyn.data()) & 127);
  Launch L{static_cast<unsigned>(n), nb, c->shared_mem, body, ctx};
  const char* order = std::getenv("INVCONV_EMULATOR_BLOCK_ORDER");
  L.reverse_blocks = order && std::strcmp(order, "reverse") == 0;
  run_blocks(L);
  dyn_smem = nullptr;
  if (!L.error) return 0;
  try {
    std::rethrow_exception(L.error);
  } catch (const std::exception& e) {
    set_error(c, e.what());
  } catch (...) {
    set_error(c, "cuemu: unknown C++ exception in kernel");
  }
  return 2;
}

template <class T>
T load_arg(const void* p) {
  static_assert(std::is_trivially_copyable_v<T>, "cuemu: kernel arguments must be trivially copyable");
  alignas(T) unsigned char buf[sizeof(T)];
  std::memcpy(buf, p, sizeof(T));
  return *std::launder(reinterpret_cast<T*>(buf));
}

template <class T>
constexpr int kind_of() {
  if constexpr (std::is_void_v<T>) return kVoid;
  else if constexpr (std::is_pointer_v<T>) return kPointer;
  else if constexpr (std::is_floating_point_v<T>) return kFloating;
  else if constexpr (std::is_integral_v<T> || std::is_enum_v<T>) return kInteger;
  else return kOther;
}

template <class T>
ArgInfo arg_info() {
  using U = std::remove_cv_t<T>;
  ArgInfo a{sizeof(U), kind_of<U>(), kVoid, 0};
  if constexpr (std::is_pointer_v<U>) {
    using P = std::remove_cv_t<std::remove_pointer_t<U>>;
    a.pointee_kind = kind_of<P>();
    if constexpr (!std::is_void_v<P> && !std::is_function_v<P>) a.pointee_size = sizeof(P);
  }
  return a;
}
}  // namespace detail

inline unsigned char* dynamic_shared_memory() noexcept { return detail::dyn_smem; }

// Called by the loader with the static __shared__ variables it found.
inline void register_static_shared(const unsigned long long* addr, const unsigned long long* size, int n) {
  std::lock_guard lock(detail::launch_mutex);
  detail::static_shared.clear();
  for (int i = 0; i < n; ++i)
    detail::static_shared.push_back({reinterpret_cast<unsigned char*>(addr[i]), size[i]});
}

template <class... A>
int launch(void (*k)(A...), const LaunchConfig* cfg, void** args) noexcept {
  try {
    return [&]<std::size_t... I>(std::index_sequence<I...>) {
      std::tuple<std::remove_cv_t<A>...> vals{detail::load_arg<std::remove_cv_t<A>>(args[I])...};
      auto call = [&] { std::apply(k, vals); };
      return detail::run(cfg, [](void* c) { (*static_cast<decltype(call)*>(c))(); }, &call);
    }(std::index_sequence_for<A...>{});
  } catch (const std::exception& e) {
    detail::set_error(cfg, e.what());
  }
  return 3;
}

template <class... A>
int arg_info(void (*)(A...), ArgInfo* out, int capacity) noexcept {
  ArgInfo all[] = {detail::arg_info<A>()..., ArgInfo{}};
  for (int i = 0; i < static_cast<int>(sizeof...(A)) && i < capacity; ++i) out[i] = all[i];
  return static_cast<int>(sizeof...(A));
}
}  // namespace
}  // namespace cuemu

// ---- synchronisation -------------------------------------------------------
static inline void __syncthreads() { cuemu::detail::block_sync(); }
// Three rotating counters: the one used by call n is cleared after call n+1's
// barrier, when every thread is done reading it and none can be adding to it.
static inline int __syncthreads_count(int predicate) {
  using namespace cuemu::detail;
  unsigned n = sync_count_calls[threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z)]++;
  if (predicate) sync_count[n % 3].fetch_add(1);
  block_sync();
  sync_count[(n + 2) % 3].store(0);
  return sync_count[n % 3].load();
}
static inline int __syncthreads_and(int p) { return __syncthreads_count(!p) == 0; }
static inline int __syncthreads_or(int p) { return __syncthreads_count(p) != 0; }
static inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }
static inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
static inline void __threadfence_system() { std::atomic_thread_fence(std::memory_order_seq_cst); }
[[noreturn]] static inline void __trap() { throw std::runtime_error("cuemu: __trap() called in kernel"); }

// ---- atomics (return the old value, as in CUDA) ----------------------------
#define CUEMU_FETCH(NAME, OP, T) \
  static inline T NAME(T* a, T v) { return std::atomic_ref<T>(*a).OP(v); }
#define CUEMU_UPDATE(NAME, T, EXPR) \
  static inline T NAME(T* a, T v) { return cuemu::detail::atomic_update(a, [v](T o) { return EXPR; }); }
CUEMU_FETCH(atomicAdd, fetch_add, int)
CUEMU_FETCH(atomicAdd, fetch_add, unsigned)
CUEMU_FETCH(atomicAdd, fetch_add, unsigned long long)
CUEMU_FETCH(atomicAdd, fetch_add, float)
CUEMU_FETCH(atomicAdd, fetch_add, double)
CUEMU_FETCH(atomicSub, fetch_sub, int)
CUEMU_FETCH(atomicSub, fetch_sub, unsigned)
CUEMU_FETCH(atomicExch, exchange, int)
CUEMU_FETCH(atomicExch, exchange, unsigned)
CUEMU_FETCH(atomicExch, exchange, unsigned long long)
CUEMU_FETCH(atomicExch, exchange, float)
CUEMU_FETCH(atomicAnd, fetch_and, int)
CUEMU_FETCH(atomicAnd, fetch_and, unsigned)
CUEMU_FETCH(atomicOr, fetch_or, int)
CUEMU_FETCH(atomicOr, fetch_or, unsigned)
CUEMU_FETCH(atomicXor, fetch_xor, int)
CUEMU_FETCH(atomicXor, fetch_xor, unsigned)
CUEMU_UPDATE(atomicMin, int, v < o ? v : o)
CUEMU_UPDATE(atomicMin, unsigned, v < o ? v : o)
CUEMU_UPDATE(atomicMin, long long, v < o ? v : o)
CUEMU_UPDATE(atomicMin, unsigned long long, v < o ? v : o)
CUEMU_UPDATE(atomicMax, int, v > o ? v : o)
CUEMU_UPDATE(atomicMax, unsigned, v > o ? v : o)
CUEMU_UPDATE(atomicMax, long long, v > o ? v : o)
CUEMU_UPDATE(atomicMax, unsigned long long, v > o ? v : o)
CUEMU_UPDATE(atomicInc, unsigned, o >= v ? 0u : o + 1)
CUEMU_UPDATE(atomicDec, unsigned, (o == 0 || o > v) ? v : o - 1)
#undef CUEMU_FETCH
#undef CUEMU_UPDATE
#define CUEMU_CAS(T)                                    \
  static inline T atomicCAS(T* a, T expected, T desired) { \
    std::atomic_ref<T>(*a).compare_exchange_strong(expected, desired); \
    return expected;                                    \
  }
CUEMU_CAS(int)
CUEMU_CAS(unsigned)
CUEMU_CAS(unsigned long long)
#undef CUEMU_CAS
#define atomicAdd_block atomicAdd
#define atomicAdd_system atomicAdd

// ---- min/max and math -------------------------------------------------------
#define CUEMU_MINMAX(R, A, B)                                     \
  static inline R min(A a, B b) { return (R)a < (R)b ? (R)a : (R)b; } \
  static inline R max(A a, B b) { return (R)a > (R)b ? (R)a : (R)b; }
CUEMU_MINMAX(int, int, int)
CUEMU_MINMAX(unsigned, unsigned, unsigned)
CUEMU_MINMAX(unsigned, int, unsigned)
CUEMU_MINMAX(unsigned, unsigned, int)
CUEMU_MINMAX(long, long, long)
CUEMU_MINMAX(unsigned long, unsigned long, unsigned long)
CUEMU_MINMAX(long long, long long, long long)
CUEMU_MINMAX(unsigned long long, unsigned long long, unsigned long long)
#undef CUEMU_MINMAX
// Floating min/max follow fmin/fmax (a NaN operand is ignored), as in CUDA.
static inline float min(float a, float b) { return fminf(a, b); }
static inline float max(float a, float b) { return fmaxf(a, b); }
static inline double min(double a, double b) { return fmin(a, b); }
static inline double max(double a, double b) { return fmax(a, b); }
static inline double min(float a, double b) { return fmin(a, b); }
static inline double max(float a, double b) { return fmax(a, b); }
static inline double min(double a, float b) { return fmin(a, b); }
static inline double max(double a, float b) { return fmax(a, b); }

static inline double rsqrt(double x) { return 1.0 / sqrt(x); }
static inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
static inline double rcbrt(double x) { return 1.0 / cbrt(x); }
static inline float rcbrtf(float x) { return 1.0f / cbrtf(x); }
// glibc already declares these names for itself: macros avoid the clash.
#define __expf(x) expf(x)
#define __logf(x) logf(x)
#define __sinf(x) sinf(x)
#define __cosf(x) cosf(x)
#define __powf(x, y) powf(x, y)
static inline float __fdividef(float x, float y) { return x / y; }
static inline float fdividef(float x, float y) { return x / y; }
static inline float __saturatef(float x) { return x > 0.0f ? (x < 1.0f ? x : 1.0f) : 0.0f; }
static inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
static inline double __fma_rn(double a, double b, double c) { return fma(a, b, c); }
static inline float __fadd_rn(float a, float b) { return a + b; }
static inline float __fmul_rn(float a, float b) { return a * b; }
static inline float __fdiv_rn(float a, float b) { return a / b; }
static inline float __frcp_rn(float a) { return 1.0f / a; }
static inline float __fsqrt_rn(float a) { return sqrtf(a); }
static inline double __dadd_rn(double a, double b) { return a + b; }
static inline double __dmul_rn(double a, double b) { return a * b; }
static inline double __ddiv_rn(double a, double b) { return a / b; }
static inline int __float_as_int(float x) { return std::bit_cast<int>(x); }
static inline unsigned __float_as_uint(float x) { return std::bit_cast<unsigned>(x); }
static inline float __int_as_float(int x) { return std::bit_cast<float>(x); }
static inline float __uint_as_float(unsigned x) { return std::bit_cast<float>(x); }
static inline long long __double_as_longlong(double x) { return std::bit_cast<long long>(x); }
static inline double __longlong_as_double(long long x) { return std::bit_cast<double>(x); }
static inline int __popc(unsigned x) { return __builtin_popcount(x); }
static inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
static inline int __clz(int x) { return x ? __builtin_clz(static_cast<unsigned>(x)) : 32; }
static inline int __clzll(long long x) { return x ? __builtin_clzll(static_cast<unsigned long long>(x)) : 64; }
static inline int __ffs(int x) { return __builtin_ffs(x); }
static inline int __ffsll(long long x) { return __builtin_ffsll(x); }
template <class T>
static inline T __ldg(const T* p) { return *p; }
// Cache-hinted loads and stores: caches are not modelled, so plain accesses.
template <class T>
static inline T __ldcg(const T* p) { return *p; }
template <class T>
static inline T __ldcv(const T* p) { return *p; }
template <class T>
static inline void __stcg(T* p, T v) { *p = v; }

// ---- waiting on other blocks -------------------------------------------------
// A kernel whose blocks wait on flags in global memory that other blocks set
// (tiles taken through an atomic ticket in dependency order) spins on a GPU:
// `while (!(cond)) {}`.  Here blocks run one after another, so a flag set by a
// block that took an earlier ticket is set already, and one that is not will
// never be: CUEMU_SPIN_UNTIL(cond) fails the launch instead of hanging.
#define CUEMU_SPIN_UNTIL(cond)                                                        \
  do {                                                                                \
    if (!(cond))                                                                      \
      throw std::runtime_error("cuemu: a block waits for `" #cond "`, which no block " \
                               "that ran before it made true (it would spin forever)"); \
  } while (0)

// ---- what cannot be emulated: a compile-time error, never a hang -------------
// Templates, so that the static_assert fires only where a kernel calls them.
#define CUEMU_UNSUPPORTED(NAME, WHAT)                                             \
  template <class... T>                                                           \
  static inline unsigned NAME(T...) {                                             \
    static_assert(cuemu::detail::dependent_false<T...>,                           \
                  "cuemu: " WHAT " are not supported by the emulator (" #NAME ")"); \
    return 0;                                                                     \
  }
CUEMU_UNSUPPORTED(__shfl_sync, "warp shuffles")
CUEMU_UNSUPPORTED(__shfl_up_sync, "warp shuffles")
CUEMU_UNSUPPORTED(__shfl_down_sync, "warp shuffles")
CUEMU_UNSUPPORTED(__shfl_xor_sync, "warp shuffles")
CUEMU_UNSUPPORTED(__shfl, "warp shuffles")
CUEMU_UNSUPPORTED(__shfl_up, "warp shuffles")
CUEMU_UNSUPPORTED(__shfl_down, "warp shuffles")
CUEMU_UNSUPPORTED(__shfl_xor, "warp shuffles")
CUEMU_UNSUPPORTED(__syncwarp, "warp-level primitives")
CUEMU_UNSUPPORTED(__ballot_sync, "warp votes")
CUEMU_UNSUPPORTED(__any_sync, "warp votes")
CUEMU_UNSUPPORTED(__all_sync, "warp votes")
CUEMU_UNSUPPORTED(__activemask, "warp-level primitives")
CUEMU_UNSUPPORTED(__match_any_sync, "warp-level primitives")
CUEMU_UNSUPPORTED(__match_all_sync, "warp-level primitives")
CUEMU_UNSUPPORTED(__reduce_add_sync, "warp reductions")
CUEMU_UNSUPPORTED(__reduce_min_sync, "warp reductions")
CUEMU_UNSUPPORTED(__reduce_max_sync, "warp reductions")
#undef CUEMU_UNSUPPORTED
