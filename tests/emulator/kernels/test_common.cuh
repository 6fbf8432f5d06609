// Included from basics.cu by a relative path: the source's own directory is
// on the include path.  The same macro shape as the project's IC_DYNAMIC_SHARED.
#pragma once
#ifdef INVCONV_EMULATOR
#define TEST_DYNAMIC_SHARED(T, name) T* name = reinterpret_cast<T*>(cuemu::dynamic_shared_memory())
#else
#define TEST_DYNAMIC_SHARED(T, name)                          \
  extern __shared__ __align__(16) unsigned char name##_raw[]; \
  T* name = reinterpret_cast<T*>(name##_raw)
#endif
