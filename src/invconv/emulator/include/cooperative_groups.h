// Found before any CUDA toolkit header on the emulator's include path, so that
// a kernel using cooperative groups fails to compile with a clear message.
#error "cuemu: cooperative groups are not supported by the emulator"
