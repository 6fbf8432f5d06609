"""Run CUDA C kernel sources on the CPU, with the call shape of CuPy's RawModule.

The kernel source is compiled by a host C++ compiler (``g++ -std=c++20``, or
the compiler named by ``$CXX``) with ``cuda_emu.h`` force-included, into a
shared library that is cached on disk and loaded with :mod:`ctypes`.

Usage
-----
>>> from invconv.emulator import EmulatedModule
>>> mod = EmulatedModule(path="kernels/foo.cu", options=("-DX=1",),
...                      name_expressions=["my_kernel<float>"])
>>> k = mod.get_function("my_kernel<float>")
>>> k((blocks,), (threads,), (x, y, np.int32(n)), shared_mem=nbytes)

Arrays are passed as pointers to their data (any :class:`numpy.ndarray`; its
layout is the caller's business, as with CuPy); scalars must be NumPy scalars
of the kernel parameter's size, and a struct parameter takes a one-element
array of its size (a structured dtype mirroring the struct), as CuPy does.
Launches are synchronous.

Semantics
---------
* Blocks run one after another.  By default the CUDA threads of a block are
  fibers on the calling thread, switched at ``__syncthreads()`` (fast and
  deterministic; odd-numbered blocks run their threads in reverse order so an
  unsynchronised access shows up whichever way it goes).  ``engine="threads"``
  runs each CUDA thread on its own OS thread instead.
  ``INVCONV_EMULATOR_BLOCK_ORDER=reverse`` runs the blocks in reverse.
* Blocks may wait for flags that blocks which ran before them set
  (``CUEMU_SPIN_UNTIL``); a wait that could only spin fails the launch.
* Before every block, dynamic and static shared memory is filled with 0xFF
  bytes (NaN as float or double), so reads of unwritten shared memory show.
* ``race_check=True`` (or ``INVCONV_EMULATOR_RACE_CHECK=1``) builds with
  ThreadSanitizer on the OS-thread engine; run the program through
  ``python -m invconv.emulator.racecheck``.
* Warp-level primitives and cooperative groups fail at compile time.

Environment
-----------
``CXX`` (compiler, default ``g++``), ``INVCONV_EMULATOR_CACHE`` (cache
directory, default ``$XDG_CACHE_HOME/invconv/emulator``, ``~/.cache/...``),
``INVCONV_EMULATOR_RACE_CHECK``, ``INVCONV_EMULATOR_ENGINE``
(``fibers`` or ``threads``).

The cache
---------
A cache entry is a manifest (``<key>.json``: the library's file name, size
and SHA-256, and the hashes of the headers it included) and the library.
An entry is used only when all of these still match, so a truncated or
overwritten library is rebuilt rather than loaded (mapping a truncated
library kills the process with SIGBUS).  Entries are written by rename, so
concurrent builders agree.  A cache that is only readable still serves the
entries it holds.  Problems with the cache directory or the compiler are a
:class:`RuntimeError` naming ``INVCONV_EMULATOR_CACHE`` or ``CXX``.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import json
import os
import re
import shlex
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

import numpy as np

HEADER = Path(__file__).with_name("cuda_emu.h")
STUB_INCLUDE = Path(__file__).with_name("include")
MAX_THREADS_PER_BLOCK = 1024
MAX_BLOCK_DIM = (1024, 1024, 64)
MAX_GRID_DIM = (2**31 - 1, 65535, 65535)
DEFAULT_DYNAMIC_SHARED = 48 * 1024
MAX_DYNAMIC_SHARED_OPTIN = 227 * 1024  # H100/H200 per-block opt-in
ENGINES = ("fibers", "threads")
_GENERATOR_VERSION = "1"
_MAX_ARGS = 256
_KINDS = {0: "integer", 1: "floating-point", 2: "pointer", 3: "struct", 4: "void"}

#: Number of compilations run by this process (tests use it to see cache hits).
compile_count = 0


class _LaunchConfig(ctypes.Structure):  # cuemu::LaunchConfig
    _fields_ = [("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3),
                ("shared_mem", ctypes.c_ulonglong), ("error", ctypes.c_char_p),
                ("error_size", ctypes.c_ulonglong)]


class _ArgInfo(ctypes.Structure):  # cuemu::ArgInfo
    _fields_ = [("size", ctypes.c_ulonglong), ("kind", ctypes.c_int),
                ("pointee_kind", ctypes.c_int), ("pointee_size", ctypes.c_ulonglong)]


def _truthy(value):
    return str(value or "").strip().lower() not in ("", "0", "false", "no", "off")


def _compiler():
    """The compiler command line: ``$CXX`` split as a shell would, or ``g++``."""
    try:
        cxx = shlex.split(os.environ.get("CXX") or "")
    except ValueError as e:
        raise RuntimeError(f"cuemu: CXX={os.environ['CXX']!r} is not a valid command "
                           f"line ({e}); set CXX to a C++ compiler such as g++") from None
    return cxx or ["g++"]


def _compiler_named(cxx):
    """How messages name the compiler: by ``CXX`` when that chose it."""
    if os.environ.get("CXX", "").strip():
        return f"the C++ compiler CXX={os.environ['CXX']!r}"
    return f"the C++ compiler {cxx[0]!r} (the default; set CXX to choose another)"


def _run_compiler(cxx, args, **kwargs):
    try:
        return subprocess.run([*cxx, *args], capture_output=True, text=True,
                              env=_compiler_env(), **kwargs)
    except OSError as e:  # missing program, not executable, ...
        raise RuntimeError(f"cuemu: cannot run {_compiler_named(cxx)}: "
                           f"{e.strerror or e}") from None


@functools.lru_cache(maxsize=None)
def _compiler_version(cxx):
    return _run_compiler(cxx, ["--version"]).stdout


def _compiler_env():
    # A race-check run preloads libtsan into this process; the compiler
    # driver must not inherit it (non-instrumented programs may crash).
    env = dict(os.environ)
    kept = [p for p in env.get("LD_PRELOAD", "").split() if "tsan" not in p]
    env["LD_PRELOAD"] = " ".join(kept)
    if not kept:
        del env["LD_PRELOAD"]
    return env


def tsan_loaded():
    """Whether the ThreadSanitizer runtime is loaded in this process."""
    return hasattr(ctypes.CDLL(None), "__tsan_init")


def cache_dir():
    """The directory holding compiled modules (an absolute path)."""
    # Absolute: the compiler runs in a temporary directory, where a relative
    # cache path would point elsewhere.
    if os.environ.get("INVCONV_EMULATOR_CACHE"):
        return Path(os.environ["INVCONV_EMULATOR_CACHE"]).expanduser().absolute()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return (base / "invconv" / "emulator").absolute()


@contextlib.contextmanager
def _writing_to(cache):
    """Turn an OSError while writing into `cache` into one RuntimeError naming the setting."""
    try:
        yield
    except OSError as e:
        why = e.strerror or str(e)
        if cache.exists() and not cache.is_dir():
            why = "it is a file, not a directory"
        elif isinstance(e, (FileExistsError, NotADirectoryError)):
            why = "a component of the path is a file, not a directory"
        source = ("INVCONV_EMULATOR_CACHE" if os.environ.get("INVCONV_EMULATOR_CACHE")
                  else "the default; set INVCONV_EMULATOR_CACHE to choose another")
        raise RuntimeError(f"cuemu: cannot write compiled kernels to the emulator cache "
                           f"{cache} ({source}): {why}") from None


def _file_digest(path):
    """(size, SHA-256 hex digest) of a file's contents."""
    data = Path(path).read_bytes()
    return len(data), hashlib.sha256(data).hexdigest()


def _translate_options(options):
    """Keep the NVRTC options that mean something to a host compiler."""
    out, opts = [], list(options)
    prefixes = {"-I": "-I", "--include-path=": "-I", "-D": "-D",
                "--define-macro=": "-D", "-U": "-U", "--undefine-macro=": "-U"}
    while opts:
        opt = str(opts.pop(0))
        for prefix, flag in prefixes.items():
            if opt.startswith(prefix):
                value = opt[len(prefix):] or (str(opts.pop(0)) if opts else "")
                if flag == "-I":
                    value = os.path.abspath(value)
                out.append(flag + value)
                break
        # Anything else (-std=, --use_fast_math, -arch, ...) is NVRTC's.
    return out


def _file_hash(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _parse_depfile(text):
    text = text.replace("\\\n", " ")
    _, _, deps = text.partition(": ")
    return [d.replace("\\ ", " ").replace("$$", "$")
            for d in re.split(r"(?<!\\)\s+", deps) if d]


def _static_shared_symbols(path):
    """(offset, size) of the function-static variables of a compiled module.

    ``__shared__`` expands to ``static`` and cannot have an initialiser, so
    the zero-initialised (``.bss``) function statics (``_ZZ...``) outside the
    standard library and the emulator are taken for shared memory: an
    ordinary zero-initialised ``static`` local in kernel code would be
    poisoned too.  Returns also the offset of ``cuemu_register_static_shared``
    to relocate the others.
    """
    data = Path(path).read_bytes()
    if data[:6] != b"\x7fELF\x02\x01":  # 64-bit little-endian ELF only
        return [], None
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize)
                for i in range(shnum)]
    found, anchor = set(), None
    skip = ("_ZZNSt", "_ZZNKSt", "_ZZSt", "_ZZN9__gnu_cxx", "_ZZNK9__gnu_cxx",
            "_ZZN5cuemu", "_ZZNK5cuemu")
    for _, sh_type, _, _, off, size, link, _, _, entsize in sections:
        if sh_type != 2:  # SHT_SYMTAB
            continue
        stroff = sections[link][4]
        for i in range(size // entsize):
            name_off, info, _, shndx, value, sym_size = struct.unpack_from(
                "<IBBHQQ", data, off + i * entsize)
            end = data.index(b"\0", stroff + name_off)
            name = data[stroff + name_off:end].decode("ascii", "replace")
            if name == "cuemu_register_static_shared":
                anchor = value
            elif (info & 0xF == 1 and sym_size and name.startswith("_ZZ")
                  and not name.startswith(skip) and 0 < shndx < len(sections)
                  and sections[shndx][1] == 8):  # SHT_NOBITS
                found.add((value, sym_size))
    return sorted(found), anchor


def _normalise_dims(dims, what):
    if isinstance(dims, (int, np.integer)):
        dims = (dims,)
    if not isinstance(dims, (tuple, list)) or not 1 <= len(dims) <= 3 or not all(
            isinstance(d, (int, np.integer)) for d in dims):
        raise TypeError(f"{what} must be an int or a tuple of 1 to 3 ints, got {dims!r}")
    dims = tuple(int(d) for d in dims) + (1,) * (3 - len(dims))
    for axis, d in zip("xyz", dims):
        if d < 1:
            raise ValueError(f"{what} dimension {axis} is {d}; it must be at least 1")
    return dims


class EmulatedModule:
    """A CUDA C source compiled for the CPU; the analogue of ``cupy.RawModule``.

    Parameters
    ----------
    code : str, optional
        Kernel source text (give exactly one of `code` and `path`).
    path : str or os.PathLike, optional
        Kernel source file; its directory is on the include path.
    options : sequence of str
        NVRTC-style options.  ``-I``, ``-D`` and ``-U`` (and their long
        forms) are passed on; the others are NVRTC-specific and ignored.
    name_expressions : sequence of str, optional
        Kernels to export, e.g. ``"my_kernel<float>"``.  A name given later
        to :meth:`get_function` that is not listed triggers a rebuild (with
        none, the build waits for the first :meth:`get_function`).
    race_check : bool
        Build with ThreadSanitizer (also forced by
        ``INVCONV_EMULATOR_RACE_CHECK=1``); the process must have libtsan
        loaded, see :mod:`invconv.emulator.racecheck`.
    engine : {"fibers", "threads"}, optional
        How CUDA threads run (default ``$INVCONV_EMULATOR_ENGINE`` or
        fibers; race checking always uses threads).
    backend, translate_cucomplex, jitify
        Accepted for compatibility with ``cupy.RawModule`` and ignored.
    enable_cooperative_groups : bool
        Must be False: cooperative groups cannot be emulated.

    Raises
    ------
    RuntimeError
        If compilation fails (the message holds the compiler's output), the
        compiler (``CXX``) cannot be run or builds nothing, the cache
        directory (``INVCONV_EMULATOR_CACHE``) cannot be written when a build
        is needed, or race checking is requested without libtsan in the
        process.
    """

    def __init__(self, code=None, *, path=None, options=(), name_expressions=None,
                 race_check=False, engine=None, backend="nvrtc",
                 translate_cucomplex=False, enable_cooperative_groups=False,
                 jitify=False):
        if (code is None) == (path is None):
            raise TypeError("give exactly one of code and path")
        if enable_cooperative_groups:
            raise NotImplementedError("cuemu: cooperative groups are not supported by the emulator")
        self.race_check = bool(race_check) or _truthy(os.environ.get("INVCONV_EMULATOR_RACE_CHECK"))
        engine = engine or os.environ.get("INVCONV_EMULATOR_ENGINE") or "fibers"
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
        self.engine = "threads" if self.race_check else engine
        if self.race_check and not tsan_loaded():
            raise RuntimeError(
                "cuemu: race checking needs the ThreadSanitizer runtime preloaded into "
                "the process; run the program as "
                "`python -m invconv.emulator.racecheck SCRIPT [ARGS...]`")
        self.path = None if path is None else Path(path).resolve()
        self.code = self.path.read_text() if code is None else code
        self.options = tuple(options)
        self._flags = _translate_options(self.options)
        self._names = list(dict.fromkeys(name_expressions or ()))
        self._index, self.library_path, self.static_shared_bytes = {}, None, 0
        if self._names:  # else wait for get_function: a library without kernels is no use
            self._build()

    def _build(self):
        cxx = _compiler()
        flags = ["-std=c++20", "-shared", "-fPIC", "-pthread", "-fvisibility=hidden",
                 "-I" + str(STUB_INCLUDE)]
        flags += ["-fsanitize=thread", "-g", "-O1"] if self.race_check else ["-O2"]
        if self.engine == "threads":
            flags.append("-DCUEMU_OS_THREADS")
        if self.path is not None:
            flags.append("-I" + str(self.path.parent))
        flags += self._flags
        tu = self._translation_unit()
        key = hashlib.sha256(json.dumps(
            [_GENERATOR_VERSION, HEADER.read_text(), self.code, str(self.path), tu,
             flags, cxx, _compiler_version(tuple(cxx))]).encode()).hexdigest()[:40]
        cache = cache_dir()
        self.library_path = self._lookup(cache, key) or self._compile(cache, key, cxx, flags, tu)
        try:
            self._lib = ctypes.CDLL(str(self.library_path))
        except OSError as e:
            raise RuntimeError(f"cuemu: cannot load {self.library_path}, built by "
                               f"{_compiler_named(cxx)}: {e}") from None
        self._register_static_shared()
        self._index = {name: i for i, name in enumerate(self._names)}

    def _translation_unit(self):
        source = "cuemu_source.cu" if self.path is None else str(self.path)
        lines = [f"#include {json.dumps(source)}", "#define CUEMU_EXPORT extern \"C\" "
                 "__attribute__((visibility(\"default\")))",
                 "CUEMU_EXPORT void cuemu_register_static_shared(const unsigned long long* a, "
                 "const unsigned long long* s, int n) { cuemu::register_static_shared(a, s, n); }"]
        for i, name in enumerate(self._names):
            lines += [
                f"static constexpr auto cuemu_kernel_{i} = &{name};",
                f"CUEMU_EXPORT int cuemu_launch_{i}(const void* c, void** a) {{ return "
                f"cuemu::launch(cuemu_kernel_{i}, static_cast<const cuemu::LaunchConfig*>(c), a); }}",
                f"CUEMU_EXPORT int cuemu_info_{i}(void* o, int n) {{ return "
                f"cuemu::arg_info(cuemu_kernel_{i}, static_cast<cuemu::ArgInfo*>(o), n); }}"]
        return "\n".join(lines) + "\n"

    @staticmethod
    def _lookup(cache, key):
        """The cached library for `key` if it is intact and up to date, else None.

        The key covers everything but the included headers, whose contents
        were recorded from the compiler's dependency list at build time.  The
        library is checked against its recorded size and hash before it is
        loaded: dlopen of a truncated library is a SIGBUS, not an error.  A
        damaged library is left for the rebuild to replace: removing it here
        could race with another process that has just rebuilt it.
        """
        try:
            manifest = json.loads((cache / f"{key}.json").read_text())
            name, size, digest = manifest["library"], manifest["size"], manifest["sha256"]
            if not isinstance(name, str) or Path(name).name != name or not name.endswith(".so"):
                return None
            if not all(_file_hash(p) == h for p, h in manifest["deps"].items()):
                return None  # a header changed: a new entry, this one stays for others
            library = cache / name
            if library.stat().st_size == size and _file_digest(library) == (size, digest):
                return library
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pass
        return None

    def _compile(self, cache, key, cxx, flags, tu):
        global compile_count
        with _writing_to(cache):
            cache.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f"tmp-{key[:8]}-", dir=cache))
        try:
            with _writing_to(cache):
                (tmp / "cuemu_source.cu").write_text(self.code)
                (tmp / "module.cpp").write_text(tu)
            args = [*flags, "-include", str(HEADER), "-MMD", "-MF", str(tmp / "module.d"),
                    "-o", str(tmp / "module.so"), str(tmp / "module.cpp")]
            proc = _run_compiler(cxx, args, cwd=tmp)
            compile_count += 1
            if proc.returncode != 0:
                output = proc.stderr or (f"{_compiler_named(cxx)} exited with status "
                                         f"{proc.returncode} and printed nothing")
                raise RuntimeError(
                    f"cuemu: compilation failed: {shlex.join([*cxx, *args])}\n{output}")
            try:
                depfile = (tmp / "module.d").read_text()
                size, digest = _file_digest(tmp / "module.so")
            except OSError:
                size = 0
            if not size:
                raise RuntimeError(
                    f"cuemu: {_compiler_named(cxx)} exited 0 but wrote no library and "
                    f"dependency file (it must accept g++'s options: -shared -MMD -MF -o)")
            deps = {os.path.abspath(os.path.join(tmp, d)): None for d in _parse_depfile(depfile)}
            deps = {d: _file_hash(d) for d in deps if not d.startswith(str(tmp) + os.sep)}
            # Content-addressed names: a rebuilt module never reuses the file
            # name of a different library this process may already have
            # loaded (dlopen would hand back the stale one), and concurrent
            # builders agree.
            library = cache / f"{key}-{digest[:16]}.so"
            with _writing_to(cache):
                os.replace(tmp / "module.so", library)
                (tmp / "manifest.json").write_text(json.dumps(
                    {"library": library.name, "size": size, "sha256": digest, "deps": deps},
                    indent=1))
                os.replace(tmp / "manifest.json", cache / f"{key}.json")
            return library
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _register_static_shared(self):
        symbols, anchor = _static_shared_symbols(self.library_path)
        fn = self._lib.cuemu_register_static_shared
        if anchor is None:
            symbols = []
        base = (ctypes.cast(fn, ctypes.c_void_p).value - anchor) if symbols else 0
        n = len(symbols)
        addrs = (ctypes.c_ulonglong * max(n, 1))(*[base + off for off, _ in symbols])
        sizes = (ctypes.c_ulonglong * max(n, 1))(*[size for _, size in symbols])
        fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
        fn(addrs, sizes, n)
        self.static_shared_bytes = sum(size for _, size in symbols)

    def get_function(self, name):
        """Return the kernel `name` (a name expression) as an :class:`EmulatedFunction`."""
        if name not in self._index:
            self._names.append(name)
            self._build()
        return EmulatedFunction(self, name, self._index[name])


class EmulatedFunction:
    """A kernel of an :class:`EmulatedModule`; the analogue of ``cupy.cuda.Function``.

    Call it as ``f(grid, block, args, shared_mem=0)``.
    """

    max_threads_per_block = MAX_THREADS_PER_BLOCK

    def __init__(self, module, name, index):
        self.module, self.name = module, name
        self._launch = getattr(module._lib, f"cuemu_launch_{index}")
        self._launch.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        self._launch.restype = ctypes.c_int
        info = getattr(module._lib, f"cuemu_info_{index}")
        info.argtypes = [ctypes.c_void_p, ctypes.c_int]
        specs = (_ArgInfo * _MAX_ARGS)()
        nargs = info(specs, _MAX_ARGS)
        if nargs > _MAX_ARGS:
            raise RuntimeError(f"{name}: more than {_MAX_ARGS} kernel parameters")
        self._specs = list(specs[:nargs])
        self._max_dynamic_shared = DEFAULT_DYNAMIC_SHARED

    @property
    def max_dynamic_shared_size_bytes(self):
        """Largest `shared_mem` a launch may ask for (settable, as on a GPU)."""
        return self._max_dynamic_shared

    @max_dynamic_shared_size_bytes.setter
    def max_dynamic_shared_size_bytes(self, value):
        limit = MAX_DYNAMIC_SHARED_OPTIN - self.module.static_shared_bytes
        if not 0 <= int(value) <= limit:
            raise ValueError(f"max_dynamic_shared_size_bytes must be in [0, {limit}], got {value}")
        self._max_dynamic_shared = int(value)

    @property
    def shared_size_bytes(self):
        """Static shared memory: the whole module's, as kernels are not told apart."""
        return self.module.static_shared_bytes

    @property
    def attributes(self):
        """Kernel attributes; ``shared_size_bytes`` is the whole module's static shared memory."""
        return {"max_threads_per_block": MAX_THREADS_PER_BLOCK,
                "shared_size_bytes": self.module.static_shared_bytes,
                "max_dynamic_shared_size_bytes": self._max_dynamic_shared,
                "const_size_bytes": 0, "local_size_bytes": 0, "num_regs": 0}

    def _check_launch(self, grid, block, shared_mem):
        grid, block = _normalise_dims(grid, "grid"), _normalise_dims(block, "block")
        for what, dims, limits in (("block", block, MAX_BLOCK_DIM), ("grid", grid, MAX_GRID_DIM)):
            for axis, d, limit in zip("xyz", dims, limits):
                if d > limit:
                    raise ValueError(f"{what} dimension {axis} is {d}; the maximum is {limit}")
        threads = block[0] * block[1] * block[2]
        if threads > MAX_THREADS_PER_BLOCK:
            raise ValueError(f"block has {threads} threads; the maximum is {MAX_THREADS_PER_BLOCK}")
        shared_mem = int(shared_mem)
        if not 0 <= shared_mem <= self._max_dynamic_shared:
            raise ValueError(
                f"shared_mem is {shared_mem} bytes; the maximum is max_dynamic_shared_size_bytes"
                f" = {self._max_dynamic_shared} (raise it, up to "
                f"{MAX_DYNAMIC_SHARED_OPTIN - self.module.static_shared_bytes})")
        return grid, block, shared_mem

    def _marshal(self, args):
        if not isinstance(args, (tuple, list)):
            raise TypeError(f"{self.name}: args must be a tuple, got {type(args).__name__}")
        if len(args) != len(self._specs):
            raise TypeError(f"{self.name} takes {len(self._specs)} arguments, got {len(args)}")
        storage, pointers = [], (ctypes.c_void_p * max(len(args), 1))()
        for i, (arg, spec) in enumerate(zip(args, self._specs)):
            where = f"{self.name}: argument {i}"
            if spec.kind == 2:
                if not isinstance(arg, np.ndarray):
                    raise TypeError(f"{where} is a pointer and needs a numpy.ndarray, "
                                    f"got {type(arg).__module__}.{type(arg).__name__}")
                self._check_pointee(where, arg.dtype, spec)
                buf = ctypes.c_void_p(arg.__array_interface__["data"][0])
            elif spec.kind == 3 and isinstance(arg, np.ndarray):
                # A struct by value: as CuPy takes one, a one-element host
                # array (of a structured dtype) holding the struct's bytes.
                if arg.size != 1 or arg.nbytes != spec.size:
                    raise TypeError(f"{where} is a {spec.size}-byte struct and needs a "
                                    f"one-element array of {spec.size} bytes, got {arg.size} "
                                    f"element(s) of {arg.dtype.itemsize} bytes")
                buf = ctypes.create_string_buffer(arg.tobytes(), spec.size)
            else:
                if isinstance(arg, np.ndarray) or not isinstance(arg, np.generic):
                    what = "an array" if isinstance(arg, np.ndarray) else type(arg).__name__
                    raise TypeError(f"{where} is a {spec.size}-byte {_KINDS[spec.kind]} scalar "
                                    f"and needs a NumPy scalar (e.g. numpy.int32(...)), got {what}")
                ok_kind = {0: "iub", 1: "f"}.get(spec.kind)
                if arg.dtype.itemsize != spec.size or (ok_kind and arg.dtype.kind not in ok_kind):
                    raise TypeError(f"{where} is a {spec.size}-byte {_KINDS[spec.kind]} scalar, "
                                    f"got {arg.dtype}")
                buf = ctypes.create_string_buffer(arg.tobytes(), spec.size)
            storage.append(buf)
            pointers[i] = ctypes.addressof(buf)
        return pointers, storage

    @staticmethod
    def _check_pointee(where, dtype, spec):
        # Only plain numeric arrays against numeric pointees of more than one
        # byte: byte pointers, structs and complex data stay the caller's call.
        if spec.pointee_kind in (0, 1) and spec.pointee_size > 1 and dtype.kind in "iuf":
            if not dtype.isnative:  # a kernel would read the bytes in its own order
                raise TypeError(f"{where} is an array of {dtype.str} in non-native byte "
                                f"order; convert it with a.astype(a.dtype.newbyteorder('='))")
            if (dtype.itemsize != spec.pointee_size
                    or (dtype.kind == "f") != (spec.pointee_kind == 1)):
                raise TypeError(f"{where} points to a {spec.pointee_size}-byte "
                                f"{_KINDS[spec.pointee_kind]}, got an array of {dtype}")

    def __call__(self, grid, block, args, shared_mem=0, stream=None):
        """Launch on ``grid`` blocks of ``block`` threads; returns when done.

        Raises
        ------
        TypeError
            Wrong argument count or types.
        ValueError
            Launch dimensions or `shared_mem` beyond CUDA's limits.
        RuntimeError
            A C++ exception (or ``__trap()``) in the kernel.
        """
        grid, block, shared_mem = self._check_launch(grid, block, shared_mem)
        pointers, storage = self._marshal(args)
        error = ctypes.create_string_buffer(4096)
        cfg = _LaunchConfig((ctypes.c_uint * 3)(*grid), (ctypes.c_uint * 3)(*block), shared_mem,
                            ctypes.cast(error, ctypes.c_char_p), len(error))
        if self._launch(ctypes.byref(cfg), pointers):
            raise RuntimeError(f"{self.name}: {error.value.decode(errors='replace')}")
        del storage  # kept alive until the launch returned


def EmulatedKernel(code, name, options=(), **kwargs):
    """The analogue of ``cupy.RawKernel``: one kernel of a source."""
    return EmulatedModule(code, options=options, name_expressions=[name], **kwargs).get_function(name)
