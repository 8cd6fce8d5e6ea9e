"""Builds deeplab_fast._C, the custom-op library, with torch.utils.cpp_extension.

Environment:
  FORCE_CUDA=1   build the CUDA kernels even when torch or this machine has no CUDA (needs nvcc).
  DEBUG=1        build with -O0 -g and assertions.
  SANITIZE=1     build the C++ (host) code with AddressSanitizer and UndefinedBehaviorSanitizer
                 (-fsanitize=address,undefined -fno-omit-frame-pointer, -O1 -g unless DEBUG=1; linked with them
                 too). CUDA kernels are not instrumented (use compute-sanitizer). Load it with
                 LD_PRELOAD="$(gcc -print-file-name=libasan.so)" ASAN_OPTIONS=detect_leaks=0.
  CUDA_HOME      the CUDA toolkit (torch's guess when unset: CUDA_PATH, else the folder above the nvcc on PATH,
                 else /usr/local/cuda). See find_cuda_toolkit() for what is tried when it has no headers.
  CUTLASS_PATH   a CUTLASS checkout (its include/ is used); default: the headers of the nvidia-cutlass wheel
                 (`pip install nvidia-cutlass`, found through its cutlass_library package).
  MAX_JOBS       parallel compile jobs (default: ninja's, the number of cores + 2).
CUDA sources (csrc/**/cuda/*.cu) are compiled only when torch is a CUDA build and a CUDA toolkit is found, or with
FORCE_CUDA=1; otherwise the build is CPU-only and says so. The CUDA build needs the CUTLASS headers.

Progress: the build prints a line per stage and per compiled unit, and its total time, as "deeplab_fast: ..."
lines. pip keeps a build's output to itself unless -v is given, so these lines also go to the terminal pip runs
in (/dev/tty), when there is one. With ninja (pip install ninja) the units compile in parallel; without it torch
compiles them one at a time, several times slower, and the build says so.
"""
import contextlib
import glob
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time

import torch
import torch.utils.cpp_extension as cpp_extension
from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
# Where a CUDA toolkit lives when nothing else says so (tried last, in this order).
STANDARD_CUDA_HOMES = ("/usr/local/cuda",)


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern), recursive=True))


def cutlass_include_dir():
    """CUTLASS's include/ folder: $CUTLASS_PATH/include, else the nvidia-cutlass wheel's copy, else None."""
    path = os.environ.get("CUTLASS_PATH")
    if path:
        inc = os.path.join(path, "include")
        return inc if os.path.isfile(os.path.join(inc, "cutlass", "cutlass.h")) else None
    try:
        import cutlass_library
    except ImportError:
        return None
    inc = os.path.join(os.path.dirname(cutlass_library.__file__), "source", "include")
    return inc if os.path.isfile(os.path.join(inc, "cutlass", "cutlass.h")) else None


# ---- the CUDA toolkit ----


def is_cuda_toolkit(home):
    """A CUDA toolkit: <home>/include/cuda_runtime.h and an executable <home>/bin/nvcc."""
    return bool(home) and os.path.isfile(os.path.join(home, "include", "cuda_runtime.h")) and os.access(
        os.path.join(home, "bin", "nvcc"), os.X_OK)


def _wrapped_nvccs(path):
    """The absolute paths of an nvcc named inside a small text file (a wrapper script: `exec /x/bin/nvcc "$@"`)."""
    try:
        if os.path.getsize(path) > 64 * 1024:
            return []
        with open(path, "rb") as f:
            text = f.read()
    except OSError:
        return []
    if not text.startswith(b"#!") or b"\0" in text:
        return []
    return [m.decode() for m in re.findall(rb"(/[^\s'\"`;|&<>()$]*/nvcc)(?![\w.-])", text)]


def _nvcc_homes(nvcc, notes, depth=0):
    """Toolkit candidates for one nvcc: its folder's parent, the same after following links, those of the nvccs a
    wrapper script runs, and the toolkit nvcc itself reports (`nvcc --dryrun`: TOP=<home>/bin/..)."""
    homes = [os.path.dirname(os.path.dirname(nvcc))]
    real = os.path.realpath(nvcc)
    if real != nvcc:
        notes.append(f"{nvcc} is a link to {real}")
        homes.append(os.path.dirname(os.path.dirname(real)))
    if depth < 4:
        for inner in _wrapped_nvccs(real):
            if os.path.realpath(inner) != real:
                notes.append(f"{real} is a wrapper script that runs {inner}")
                homes += _nvcc_homes(inner, notes, depth + 1)
    if depth == 0:
        try:
            out = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-E", os.devnull, "-o", os.devnull],
                                 capture_output=True, text=True, timeout=60).stderr
        except (OSError, subprocess.SubprocessError) as e:
            notes.append(f"`{nvcc} --dryrun` failed: {e}")
            out = ""
        m = re.search(r"^#\$ TOP=(.+)$", out, re.M)
        if m:
            top = os.path.normpath(m.group(1).strip())
            notes.append(f"`{nvcc} --dryrun` says TOP={top}")
            homes.append(top)
    return homes


def find_cuda_toolkit(cuda_home, which_nvcc=shutil.which, standard=None, cuda_version=None):
    """The CUDA toolkit to build with, as (home, how it was found, notes), or (None, None, notes).

    In order: cuda_home (torch's CUDA_HOME); the real nvcc behind $CUDA_HOME/bin/nvcc and behind the nvcc on PATH
    (links followed, wrapper scripts read, and nvcc asked: a wrapper such as /usr/local/bin/nvcc makes torch guess
    /usr/local, which has no headers); then the standard locations (/usr/local/cuda, /usr/local/cuda-<torch's
    CUDA version>; standard: default STANDARD_CUDA_HOMES). A toolkit is a folder with include/cuda_runtime.h and
    bin/nvcc. notes says what was tried.
    """
    standard = STANDARD_CUDA_HOMES if standard is None else standard
    notes = []
    tried = []

    def candidate(home, how):
        home = os.path.normpath(home)
        if home in tried:
            return None
        tried.append(home)
        if is_cuda_toolkit(home):
            return home, how
        notes.append(f"{home} ({how}): no include/cuda_runtime.h or bin/nvcc")
        return None

    if cuda_home:
        found = candidate(cuda_home, "torch's CUDA_HOME")
        if found:
            return found + (notes,)
    nvccs = []
    if cuda_home and os.access(os.path.join(cuda_home, "bin", "nvcc"), os.X_OK):
        nvccs.append((os.path.join(cuda_home, "bin", "nvcc"), "CUDA_HOME's bin/nvcc"))
    on_path = which_nvcc("nvcc")
    if on_path:
        nvccs.append((os.path.abspath(on_path), "the nvcc on PATH"))
    else:
        notes.append("no nvcc on PATH")
    seen = set()
    for nvcc, what in nvccs:
        if os.path.realpath(nvcc) in seen:
            continue
        seen.add(os.path.realpath(nvcc))
        for home in _nvcc_homes(nvcc, notes):
            found = candidate(home, f"from {what}, {nvcc}")
            if found:
                return found + (notes,)
    homes = list(standard) + ([f"{h}-{cuda_version}" for h in standard] if cuda_version else [])
    for home in homes:
        if not os.path.isdir(home):
            notes.append(f"{home} (a standard location): not there")
            continue
        found = candidate(home, "a standard location")
        if found:
            return found + (notes,)
    return None, None, notes


def nvcc_version(home):
    try:
        out = subprocess.run([os.path.join(home, "bin", "nvcc"), "--version"], capture_output=True, text=True,
                             timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return "?"
    m = re.search(r"release (\S+?),", out)
    return m.group(1) if m else "?"


def use_cuda_toolkit(home):
    """Points torch.utils.cpp_extension (which read CUDA_HOME once, at import) and the compiler processes at home."""
    cpp_extension.CUDA_HOME = home
    os.environ["CUDA_HOME"] = home


# ---- progress lines ----


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


class Progress:
    """The build's progress lines, "deeplab_fast: ...": printed to stdout (the build log, which pip shows with -v)
    and, when stdout is not a terminal (pip captures it), also to the controlling terminal, so that a plain
    ``pip install`` shows them. Without a terminal (CI, a script), the log alone has them."""

    def __init__(self, tty_path="/dev/tty"):
        self.start = time.monotonic()
        self.log_fd = None  # set while fd 1 is ninja_status_lines' pipe: the lines go to the log itself
        self.tty = None
        if not _isatty(sys.stdout):
            try:
                self.tty = open(tty_path, "w")  # noqa: SIM115 - kept for the whole build
            except OSError:
                self.tty = None

    def elapsed(self) -> str:
        return _duration(time.monotonic() - self.start)

    def line(self, text: str, log_detail: str = "") -> None:
        """Prints "deeplab_fast: text" (+ log_detail in the build log only)."""
        msg = f"deeplab_fast: {text}"
        if self.log_fd is not None:
            # Not through fd 1: on ninja_status_lines' reading thread a write into the pipe it drains would block
            # forever once ninja's output has filled the pipe (a unit with many compiler warnings).
            sys.stdout.flush()
            os.write(self.log_fd, (msg + log_detail + "\n").encode())
        else:
            print(msg + log_detail, flush=True)
        if self.tty is not None:
            try:  # \r and erase-line: start clean after pip's spinner character
                self.tty.write(f"\r\033[K{msg}\n")
                self.tty.flush()
            except OSError:
                self.tty = None


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


NINJA_STATUS = re.compile(rb"^\[(\d+)/(\d+)\] (.*)$")


SOURCE_SUFFIXES = (".cpp", ".cc", ".cxx", ".c", ".cu")


def compiled_source(command) -> str:
    """The source file that a compile command (a string or an argument list) compiles: its last argument with a
    source suffix, relative to the working folder (the source tree, as pip builds) when inside it; the command
    itself, shortened, when there is none."""
    args = shlex.split(command) if isinstance(command, str) else [str(a) for a in command]
    sources = [a for a in args if a.endswith(SOURCE_SUFFIXES) and not a.startswith("-")]
    if not sources:
        return " ".join(args)[:80]
    path = sources[-1]
    rel = os.path.relpath(path, os.getcwd()) if os.path.isabs(path) else path
    return path if rel.startswith("..") else rel


class _Tee:
    """The reading side of ninja_status_lines: echoes each line to the saved log descriptor and reports ninja's
    status lines; sync() waits until everything written to fd 1 so far has been read."""

    SYNC = b"\0deeplab_fast-sync\0\n"

    def __init__(self, read_end: int, log_fd: int, on_unit):
        self.read_end, self.log_fd, self.on_unit = read_end, log_fd, on_unit
        self.synced = threading.Event()
        self.thread = threading.Thread(target=self._pump, name="ninja-status", daemon=True)
        self.thread.start()

    def _pump(self):
        with os.fdopen(self.read_end, "rb") as lines:
            for raw in lines:
                if raw == self.SYNC:
                    self.synced.set()
                    continue
                os.write(self.log_fd, raw)
                m = NINJA_STATUS.match(raw.rstrip(b"\r\n"))
                if m:
                    self.on_unit(int(m.group(1)), int(m.group(2)), m.group(3).decode(errors="replace"))

    def sync(self, timeout: float = 10.0):
        sys.stdout.flush()
        self.synced.clear()
        os.write(1, self.SYNC)
        self.synced.wait(timeout)


@contextlib.contextmanager
def ninja_status_lines(on_unit):
    """Copies file descriptor 1 through a pipe for the duration: every byte still reaches the build log, and each
    of ninja's status lines ("[k/N] command", printed as each unit finishes when ninja's output is not a terminal)
    calls on_unit(k, N, command). Yields the reader (its sync() waits until it has caught up)."""
    sys.stdout.flush()
    saved = os.dup(1)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 1)
    os.close(write_end)
    tee = _Tee(read_end, saved, on_unit)
    try:
        yield tee
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)  # the pipe's last write end closes: the reader sees its end
        tee.thread.join()
        os.close(saved)


class BuildWithProgress(BuildExtension):
    """torch's BuildExtension, with a progress line per compiled unit, the link, and the total time."""

    progress = None

    def build_extensions(self):
        progress = self.progress or Progress()
        units = sum(len(e.sources) for e in self.extensions)
        started = time.monotonic()
        jobs = os.environ.get("MAX_JOBS")
        if self.use_ninja:
            progress.line(f"compiling {units} units with ninja, "
                          + (f"{jobs} at a time (MAX_JOBS)" if jobs else f"ninja's default of {(os.cpu_count() or 1) + 2} at a time"))
        else:
            progress.line(f"ninja not found: compiling {units} units one at a time, which takes several times longer "
                          "(pip install ninja, then build again)")
        count = [0]
        compiler = self.compiler
        originals = {name: getattr(compiler, name) for name in ("spawn", "call", "link") if hasattr(compiler, name)}

        def run_command(original):  # setuptools runs each compile through compiler.call (older ones: spawn)
            def run(cmd, *args, **kwargs):
                if not self.use_ninja and "-c" in [str(c) for c in cmd]:
                    count[0] += 1
                    progress.line(f"[{count[0]}/{units}] compiling {compiled_source(cmd)} ({progress.elapsed()})")
                return original(cmd, *args, **kwargs)
            return run

        tee = None

        def link(target_desc, objects, output_filename, *args, **kwargs):
            if tee is not None:
                tee.sync()  # the last units' lines first
            progress.line(f"linking {os.path.basename(output_filename)} ({progress.elapsed()})")
            return originals["link"](target_desc, objects, output_filename, *args, **kwargs)

        def on_unit(k, n, command):
            progress.line(f"[{k}/{n}] compiled {compiled_source(command)} ({progress.elapsed()})")

        for name in ("spawn", "call"):
            if name in originals:
                setattr(compiler, name, run_command(originals[name]))
        compiler.link = link
        try:
            with ninja_status_lines(on_unit) if self.use_ninja else contextlib.nullcontext() as tee:
                progress.log_fd = tee.log_fd if tee is not None else None
                super().build_extensions()
        finally:
            progress.log_fd = None
            for name, original in originals.items():
                setattr(compiler, name, original)
        progress.line(f"built {', '.join(e.name for e in self.extensions)} in "
                      f"{_duration(time.monotonic() - started)} ({units} units; the whole build so far "
                      f"{progress.elapsed()})")


def _extension(progress=None):
    debug = os.environ.get("DEBUG", "0") == "1"
    sanitize = os.environ.get("SANITIZE", "0") == "1"
    force_cuda = os.environ.get("FORCE_CUDA", "0") == "1"
    cpu_sources = [s for s in _sources("csrc/**/*.cpp") if os.sep + "cuda" + os.sep not in s]
    cuda_sources = _sources("csrc/**/cuda/*.cu") + _sources("csrc/**/cuda/*.cpp")
    torch_cuda_home = cpp_extension.CUDA_HOME
    with_cuda = force_cuda or (torch.version.cuda is not None and torch_cuda_home is not None)
    toolkit = ""
    if with_cuda:
        home, how, notes = find_cuda_toolkit(torch_cuda_home, cuda_version=torch.version.cuda)
        if home is None:
            tried = "\n  ".join(notes) or "nothing"
            raise RuntimeError(
                "deeplab_fast: the CUDA build needs a CUDA toolkit (include/cuda_runtime.h and bin/nvcc), and none "
                f"was found. CUDA_HOME={os.environ.get('CUDA_HOME', '(unset)')!r} (torch's CUDA_HOME: "
                f"{torch_cuda_home!r}). Tried:\n  {tried}\n"
                "Set CUDA_HOME to the toolkit's folder (the one with include/cuda_runtime.h, e.g. /usr/local/cuda), "
                "or build CPU-only with a CPU build of torch.")
        if home != torch_cuda_home:
            print(f"deeplab_fast: torch's CUDA_HOME {torch_cuda_home!r} has no CUDA headers; using the toolkit in "
                  f"{home} ({how})" + "".join(f"\n  {n}" for n in notes))
        use_cuda_toolkit(home)
        toolkit = f"CUDA toolkit {home} (nvcc {nvcc_version(home)}; {how}); "
    cutlass = cutlass_include_dir() if with_cuda else None
    if with_cuda and cutlass is None:
        raise RuntimeError("deeplab_fast: the CUDA build needs the CUTLASS headers: pip install nvidia-cutlass, "
                           "or set CUTLASS_PATH to a CUTLASS checkout")

    cxx = ["-std=c++17", "-fopenmp", "-ffp-contract=off", "-fdiagnostics-color=always"]
    cxx += ["-O0", "-g"] if debug else (["-O1", "-g"] if sanitize else ["-O3", "-DNDEBUG"])
    sanitizers = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer"] if sanitize else []
    # SASS for A100 (sm_80) and H100/H200 (sm_90), plus compute_90 PTX that newer GPUs JIT-compile.
    # torch adds -D__CUDA_NO_HALF_OPERATORS__ and friends; CUTLASS's half / bfloat16 types need them undone.
    nvcc = ["-std=c++17", "--fmad=false", "--expt-relaxed-constexpr", "-gencode=arch=compute_80,code=sm_80",
            "-gencode=arch=compute_90,code=sm_90", "-gencode=arch=compute_90,code=compute_90",
            "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__", "-U__CUDA_NO_HALF2_OPERATORS__",
            "-U__CUDA_NO_BFLOAT16_CONVERSIONS__", "-U__CUDA_NO_BFLOAT16_OPERATORS__"] + (
        ["-O0", "-g", "-G"] if debug else ["-O3"])
    kwargs = dict(
        name="deeplab_fast._C",
        sources=cpu_sources + (cuda_sources if with_cuda else []),
        include_dirs=[os.path.join(ROOT, "csrc"), os.path.join(ROOT, "csrc", "include")]
        + ([cutlass] if cutlass else []),
        extra_compile_args={"cxx": cxx + sanitizers + (["-DWITH_CUDA"] if with_cuda else []), "nvcc": nvcc},
        extra_link_args=["-fopenmp"] + sanitizers,
    )
    kind = "CUDA + CPU" if with_cuda else "CPU-only"
    why = ("FORCE_CUDA=1" if force_cuda else "torch has CUDA and nvcc was found") if with_cuda else (
        "torch has no CUDA" if torch.version.cuda is None else "nvcc (CUDA_HOME) not found")
    build = "debug" if debug else ("-O1 -g" if sanitize else "release")
    if sanitize:
        build += " + ASan/UBSan (SANITIZE=1)"
    summary = (f"building {kind} extension ({why}); {toolkit}{build} build; "
               f"{'CUTLASS ' + cutlass + '; ' if cutlass else ''}{len(kwargs['sources'])} sources")
    (progress or Progress()).line(summary, f": {', '.join(kwargs['sources'])}")
    return (CUDAExtension if with_cuda else CppExtension)(**kwargs)


if __name__ == "__main__":  # also under pip (setuptools' build backend runs this file as __main__)
    BuildWithProgress.progress = Progress()
    setup(
        ext_modules=[_extension(BuildWithProgress.progress)],
        cmdclass={"build_ext": BuildWithProgress.with_options(no_python_abi_suffix=False)},
    )
