"""The reference for the gradient of mean-field inference: Philipp Krähenbühl's own ``DenseCRF::gradient``
(densecrf 2.2), which ships inside the pydensecrf2 1.1 sdist but which pydensecrf does not wrap.

``krahenbuhl_gradient(unary, terms, iterations, grad_output)`` runs his mean-field (Q0 = softmax(-unary), then
Q <- softmax(-unary - sum_k pairwise_k(Q))), evaluates the objective sum(grad_output .* Q_final) and
backpropagates it with his code: so its gradients are the vector-Jacobian products with grad_output.
numpy only (no torch), one image. Sign conventions are his (pydensecrf's): a Potts weight w is the matrix
compatibility -w I (PottsCompatibility::apply is -w Q), while diagonal and matrix compatibilities are added to the
energy as given (DiagonalCompatibility(v) is the matrix diag(v), whatever its header comment says).

Kernel gradients (kernel_grad=True): DenseCRF's as shipped is NOT the derivative, because
Permutohedral::gradient(a, b) returns d(b^T K a)/df where d(a^T K b)/df is documented and used, and the lattice
filter K is not symmetric. A second library, "fixed", has that argument order corrected (see _FIX) and gives
the (almost-everywhere) derivative; everything else in it is identical.

The library: tests/cpp/krahenbuhl_gradient.cpp (a C entry point, a unary whose parameters are the energies, the
weighted-sum objective) compiled with the sdist's densecrf sources and its bundled Eigen (``g++ -O2 -shared``;
nothing of the sdist is copied into this repository), loaded with ctypes. It is cached in
``$DEEPLAB_FAST_REFERENCE_CACHE`` (default ``$XDG_CACHE_HOME/deeplab_fast/krahenbuhl``, ``~/.cache/...``) under a
hash of the driver source, the sdist, the compiler and its flags, so it builds once (both variants: about half a
minute on two cores);
concurrent builds (pytest-xdist) are serialised by a file lock and published by an atomic rename.

The sdist (``pydensecrf_sdist()``), first found of: ``$DEEPLAB_FAST_PYDENSECRF_SDIST`` (the tarball, or an
extracted copy), ``<repo>/.whl/pydensecrf2-1.1.tar.gz``, a download in the cache folder (``pip download
--no-binary :all: --no-deps pydensecrf2==1.1``, made on first use). A tarball must have the PyPI sha256.
When none is found or the build fails, ``ReferenceUnavailable`` is raised: tests that use the reference FAIL
(``require_reference()``), unless ``DEEPLAB_FAST_SKIP_REFERENCE_BUILD=1``, which makes them skip.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from numbers import Number
from pathlib import Path

import numpy as np

__all__ = ["krahenbuhl_gradient", "lattice_gradient", "pydensecrf_sdist", "library_path", "require_reference",
           "ReferenceUnavailable", "SDIST_SHA256"]

REPO = Path(__file__).resolve().parents[1]
DRIVER = REPO / "tests" / "cpp" / "krahenbuhl_gradient.cpp"
SDIST_NAME = "pydensecrf2-1.1.tar.gz"
SDIST_SHA256 = "c39b0b544e74256fade1a294db9df39ee408b07ac398cd96036f37ed19843139"  # PyPI's pydensecrf2-1.1.tar.gz
# The densecrf sources DenseCRF::gradient needs (not the L-BFGS optimisation, not util.cpp).
SOURCES = ["densecrf.cpp", "unary.cpp", "pairwise.cpp", "permutohedral.cpp", "objective.cpp", "labelcompatibility.cpp"]
# -ffp-contract=off: no FMA contraction (as the repo's CPU CRF; a no-op on x86-64 without -march); -DNDEBUG as a
# Python extension build (pydensecrf2's wheel) has it.
CXXFLAGS = ["-O2", "-std=c++14", "-fPIC", "-ffp-contract=off", "-DNDEBUG", "-w"]

COMPAT_POTTS, COMPAT_DIAGONAL, COMPAT_MATRIX = 0, 1, 2


class ReferenceUnavailable(RuntimeError):
    """The pydensecrf2 sdist could not be found / downloaded, or the reference library did not build."""


# ------------------------------------------------------------------------------------------------------------
# Finding the sdist


def cache_dir() -> Path:
    env = os.environ.get("DEEPLAB_FAST_REFERENCE_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "deeplab_fast" / "krahenbuhl"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_tarball(path: Path, where: str) -> str:
    digest = _sha256(path)
    if digest != SDIST_SHA256:
        raise ReferenceUnavailable(f"{path} ({where}) is not PyPI's {SDIST_NAME}: sha256 {digest}, "
                                   f"expected {SDIST_SHA256}")
    return str(path)


def pydensecrf_sdist() -> str:
    """The path of the pydensecrf2 1.1 sdist tarball (or, from $DEEPLAB_FAST_PYDENSECRF_SDIST, an extracted copy)."""
    env = os.environ.get("DEEPLAB_FAST_PYDENSECRF_SDIST")
    if env:
        p = Path(env)
        if p.is_dir():
            if not _densecrf_root(p).is_dir():
                raise ReferenceUnavailable(f"$DEEPLAB_FAST_PYDENSECRF_SDIST={env}: no pydensecrf/densecrf inside")
            return str(p)
        if not p.is_file():
            raise ReferenceUnavailable(f"$DEEPLAB_FAST_PYDENSECRF_SDIST={env} does not exist")
        return _check_tarball(p, "$DEEPLAB_FAST_PYDENSECRF_SDIST")
    carried = REPO / ".whl" / SDIST_NAME
    if carried.is_file():
        return _check_tarball(carried, "<repo>/.whl")
    target = cache_dir() / "sdist"
    cached = target / SDIST_NAME
    if cached.is_file():
        return _check_tarball(cached, "cached download")
    target.mkdir(parents=True, exist_ok=True)
    with _Lock(cache_dir() / "download.lock"):
        if not cached.is_file():
            tmp = Path(tempfile.mkdtemp(prefix="download.", dir=target))
            try:
                cmd = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
                       "--disable-pip-version-check", "-q", "pydensecrf2==1.1", "-d", str(tmp)]
                r = subprocess.run(cmd, capture_output=True, text=True)
                got = tmp / SDIST_NAME
                if r.returncode != 0 or not got.is_file():
                    raise ReferenceUnavailable(
                        "the pydensecrf2 1.1 sdist is not available: no $DEEPLAB_FAST_PYDENSECRF_SDIST, no "
                        f"{carried}, and `{' '.join(cmd)}` failed (exit {r.returncode}):\n{r.stderr[-2000:]}")
                _check_tarball(got, "download")
                os.replace(got, cached)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return _check_tarball(cached, "cached download")


def _densecrf_root(extracted: Path) -> Path:
    return extracted / "pydensecrf" / "densecrf"


# ------------------------------------------------------------------------------------------------------------
# Building and loading the library


class _Lock:
    """An exclusive lock on a file (flock; where fcntl is missing, none: the atomic rename still keeps the cached
    library whole)."""

    def __init__(self, path: Path):
        self.path, self.fd = path, None

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            import fcntl
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        except ImportError:
            pass
        return self

    def __exit__(self, *exc):
        os.close(self.fd)  # releases the flock


def _compiler() -> list[str]:
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not cxx:
        raise ReferenceUnavailable("no C++ compiler (g++ / c++ / $CXX) to build the Krähenbühl reference")
    return cxx.split()


def _source_key(sdist: Path) -> str:
    """A digest of the sdist: its (already checked) tarball hash, or the densecrf files of an extracted copy."""
    if sdist.is_file():
        return SDIST_SHA256
    h = hashlib.sha256()
    root = _densecrf_root(sdist)
    for p in sorted(list((root / "src").glob("*")) + list((root / "include").rglob("*"))):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


# Permutohedral::gradient(df, a, b) is documented as d(a^T K b)/df but splats a where it should splat b (and the
# reverse), so it returns d(b^T K a)/df. The lattice filter K is not symmetric (the blur of a truncated lattice:
# missing neighbours are zeros, and the per-axis blurs then do not commute), so DenseCRF's kernel gradient,
# which relies on the documented order, is off. The "fixed" library variant swaps the two: it compiles
# permutohedral.cpp with these exact replacements (each must occur once) and is otherwise identical.
_FIX = [("values[ o*value_size+k ] += w * (dir?b:a)[ i*value_size+k ];",
         "values[ o*value_size+k ] += w * (dir?a:b)[ i*value_size+k ];"),
        ("grad += (dir?a:b)[ i*value_size+k ]*v;", "grad += (dir?b:a)[ i*value_size+k ]*v;")]


def library_path(variant: str = "krahenbuhl") -> Path:
    """The compiled reference library (both variants are built on first use, then cached): "krahenbuhl", the
    sdist's code as shipped, or "fixed", with the argument order of Permutohedral::gradient corrected (it only
    changes kernel gradients)."""
    if variant not in ("krahenbuhl", "fixed"):
        raise ValueError(f"variant: 'krahenbuhl' or 'fixed', got {variant!r}")
    sdist = Path(pydensecrf_sdist())
    cxx = _compiler()
    try:
        version = subprocess.run(cxx + ["--version"], capture_output=True, text=True).stdout
    except OSError as e:
        raise ReferenceUnavailable(f"cannot run the C++ compiler {cxx}: {e}") from e
    h = hashlib.sha256()
    for part in (DRIVER.read_bytes(), _source_key(sdist).encode(), " ".join(cxx + CXXFLAGS).encode(),
                 version.encode(), " ".join(SOURCES).encode(), repr(_FIX).encode()):
        h.update(hashlib.sha256(part).digest())
    stem = f"krahenbuhl_gradient-{h.hexdigest()[:20]}"
    libs = {v: cache_dir() / f"{stem}-{v}.so" for v in ("krahenbuhl", "fixed")}
    if not all(p.is_file() for p in libs.values()):
        with _Lock(cache_dir() / "build.lock"):
            if not all(p.is_file() for p in libs.values()):  # else built by another process while we waited
                _build(sdist, cxx, libs)
    return libs[variant]


def _run(cmds: list[list[str]]):
    """Runs the commands, two at a time; raises with the first failure's output."""
    procs = []
    for i in range(0, len(cmds), 2):
        batch = [(c, subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
                 for c in cmds[i:i + 2]]
        procs += [(c, p, p.communicate()[0]) for c, p in batch]
    for c, p, out in procs:
        if p.returncode != 0:
            raise ReferenceUnavailable(f"building the Krähenbühl reference failed (exit {p.returncode}):\n"
                                       f"{' '.join(c)}\n{out[-4000:]}")


def _build(sdist: Path, cxx: list[str], libs: dict):
    cache = next(iter(libs.values())).parent
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="build.", dir=cache))
    try:
        if sdist.is_file():
            with tarfile.open(sdist) as tar:
                members = [m for m in tar.getmembers()
                           if "/pydensecrf/densecrf/" in m.name and (m.isfile() or m.isdir())
                           and not Path(m.name).is_absolute() and ".." not in Path(m.name).parts]
                kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
                tar.extractall(tmp / "src", members=members, **kwargs)
            tops = list((tmp / "src").iterdir())
            if len(tops) != 1:
                raise ReferenceUnavailable(f"unexpected layout of {sdist}: {[t.name for t in tops]}")
            root = _densecrf_root(tops[0])
        else:
            root = _densecrf_root(sdist)
        text = (root / "src" / "permutohedral.cpp").read_text(encoding="utf-8", errors="surrogateescape")
        for old, new in _FIX:
            if text.count(old) != 1:
                raise ReferenceUnavailable(f"{root / 'src' / 'permutohedral.cpp'}: expected `{old}` once, found it "
                                           f"{text.count(old)} times (not pydensecrf2 1.1's densecrf?)")
            text = text.replace(old, new)
        fixed_src = tmp / "permutohedral_fixed.cpp"
        fixed_src.write_text(text, encoding="utf-8", errors="surrogateescape")

        compile_flags = CXXFLAGS + ["-I", str(root / "include"), "-c"]
        sources = [DRIVER] + [root / "src" / s for s in SOURCES] + [fixed_src]
        objs = [tmp / f"{i}_{Path(s).stem}.o" for i, s in enumerate(sources)]
        _run([cxx + compile_flags + [str(s), "-o", str(o)] for s, o in zip(sources, objs)])
        common = [str(o) for o in objs[:-1] if not o.name.endswith("_permutohedral.o")]
        plain = [str(o) for o in objs if o.name.endswith("_permutohedral.o")]
        link = cxx + ["-shared", "-fPIC"]
        outs = {v: tmp / p.name for v, p in libs.items()}
        _run([link + common + plain + ["-o", str(outs["krahenbuhl"])],
              link + common + [str(objs[-1])] + ["-o", str(outs["fixed"])]])
        for v in ("fixed", "krahenbuhl"):  # each loads (no missing symbols) before it is published
            ctypes.CDLL(str(outs[v]))
            os.replace(outs[v], libs[v])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


_LIBS = {}


def _library(variant: str = "krahenbuhl"):
    if variant not in _LIBS:
        lib = ctypes.CDLL(str(library_path(variant)))
        p, i = ctypes.c_void_p, ctypes.c_int
        f = lib.krahenbuhl_gradient
        f.restype = i
        f.argtypes = [i, i, i, p, p, p, p, p, i, p, p, p, p, p, p, p, ctypes.c_char_p, i]
        f = lib.krahenbuhl_lattice_gradient
        f.restype = i
        f.argtypes = [i, i, i, p, p, p, p, p]
        _LIBS[variant] = lib
    return _LIBS[variant]


def skip_requested() -> bool:
    return os.environ.get("DEEPLAB_FAST_SKIP_REFERENCE_BUILD", "") == "1"


def require_reference():
    """For tests: build / load the reference; a failure fails the test, or skips it with
    DEEPLAB_FAST_SKIP_REFERENCE_BUILD=1."""
    try:
        _library("krahenbuhl")
        _library("fixed")
    except ReferenceUnavailable as e:
        if skip_requested():
            import pytest
            pytest.skip(f"Krähenbühl reference unavailable (DEEPLAB_FAST_SKIP_REFERENCE_BUILD=1): {e}")
        raise


# ------------------------------------------------------------------------------------------------------------
# The API


def _f32(a, shape, what) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype != np.float32:
        raise TypeError(f"{what}: float32 expected, got {a.dtype}")
    if a.shape != shape:
        raise ValueError(f"{what}: shape {shape} expected, got {a.shape}")
    return np.ascontiguousarray(a)


def _ptr(a: np.ndarray):
    return a.ctypes.data_as(ctypes.c_void_p)


def krahenbuhl_gradient(unary, terms, iterations, grad_output, *, kernel_grad=False) -> dict:
    """Krähenbühl's DenseCRF::gradient for the objective sum(grad_output .* Q_final).

    unary: float32 [L, N] energies; grad_output: float32 [L, N] (G).
    terms: list of {"features": float32 [D, N] (already divided by the standard deviations), "compat": float
    (Potts) | float32 [L] (diagonal) | float32 [L, L] (matrix, symmetrised as 0.5 (M + M^T)), "normalization":
    int (pydensecrf's NormalizationType: 0 none, 1 before, 2 after, 3 symmetric; default 3)}, all DIAG_KERNEL.

    Returns {"q": float32 [L, N] final marginals, "objective": float, "unary_grad": float32 [L, N] (dObjective /
    dUnary), "compat_grad": per term a float (Potts), [L] (diagonal) or [L, L] (matrix: the gradient w.r.t. the
    unsymmetrised input M: symmetric, off-diagonal entries half Krähenbühl's upper-triangle values),
    "compat_grad_raw": per term Krähenbühl's parameter gradient vector (Potts [1], diagonal [L], matrix [L(L+1)/2]:
    the upper triangle row by row), and with kernel_grad=True "kernel_grad": per term [D], DenseCRF's kernel
    gradient as shipped (w.r.t. a per-dimension scale of the features, at scale 1: NOT the derivative, see _FIX),
    and "kernel_grad_fixed": the same from the fixed library (the almost-everywhere derivative of the objective;
    the lattice filter is only piecewise smooth in the features: it jumps where the set of lattice vertices
    changes)}.
    """
    unary = np.asarray(unary)
    if unary.ndim != 2:
        raise ValueError(f"unary: [L, N] expected, got shape {unary.shape}")
    L, N = unary.shape
    unary = _f32(unary, (L, N), "unary")
    grad_output = _f32(grad_output, (L, N), "grad_output")
    if int(iterations) != iterations or iterations < 0:
        raise ValueError(f"iterations: a non-negative int expected, got {iterations!r}")
    dims, feats, kinds, compat_vals, norms, n_raw = [], [], [], [], [], []
    for k, t in enumerate(terms):
        f = np.asarray(t["features"])
        if f.ndim != 2 or f.shape[1] != N or f.shape[0] < 1:
            raise ValueError(f"terms[{k}]['features']: [D, {N}] expected, got shape {f.shape}")
        feats.append(_f32(f, f.shape, f"terms[{k}]['features']").ravel())
        dims.append(f.shape[0])
        c = t["compat"]
        if isinstance(c, Number) or np.ndim(c) == 0:
            kinds.append(COMPAT_POTTS)
            compat_vals.append(np.array([float(c)], np.float32))
            n_raw.append(1)
        elif np.ndim(c) == 1:
            kinds.append(COMPAT_DIAGONAL)
            compat_vals.append(_f32(c, (L,), f"terms[{k}]['compat']"))
            n_raw.append(L)
        elif np.ndim(c) == 2:
            kinds.append(COMPAT_MATRIX)
            compat_vals.append(_f32(c, (L, L), f"terms[{k}]['compat']").ravel())
            n_raw.append(L * (L + 1) // 2)
        else:
            raise ValueError(f"terms[{k}]['compat']: a number, [L] or [L, L] expected, got shape {np.shape(c)}")
        n = int(t.get("normalization", 3))
        if n not in (0, 1, 2, 3):
            raise ValueError(f"terms[{k}]['normalization']: 0, 1, 2 or 3 expected, got {n!r}")
        norms.append(n)
    n_terms = len(dims)
    i32 = lambda v: np.ascontiguousarray(v, dtype=np.int32)  # noqa: E731
    dims_a, kinds_a, norms_a = i32(dims), i32(kinds), i32(norms)
    feats_a = np.concatenate(feats) if feats else np.zeros(1, np.float32)
    compat_a = np.concatenate(compat_vals) if compat_vals else np.zeros(1, np.float32)
    args = (N, L, n_terms, _ptr(dims_a), _ptr(feats_a), _ptr(kinds_a), _ptr(compat_a), _ptr(norms_a),
            int(iterations), _ptr(unary), _ptr(grad_output))

    def call(variant, want_kernel):
        q = np.empty((L, N), np.float32)
        unary_grad = np.empty((L, N), np.float32)
        raw = np.empty(max(1, sum(n_raw)), np.float32)
        kgrad = np.empty(max(1, sum(dims)), np.float32) if want_kernel else None
        objective = ctypes.c_double()
        err = ctypes.create_string_buffer(1024)
        rc = _library(variant).krahenbuhl_gradient(
            *args, _ptr(q), ctypes.byref(objective), _ptr(unary_grad), _ptr(raw),
            _ptr(kgrad) if kgrad is not None else None, err, len(err))
        if rc != 0:
            raise RuntimeError(f"krahenbuhl_gradient failed: {err.value.decode(errors='replace')}")
        return q, float(objective.value), unary_grad, raw, kgrad

    q, objective, unary_grad, raw, kgrad = call("krahenbuhl", bool(kernel_grad))

    compat_grad, compat_grad_raw, o = [], [], 0
    for kind, n in zip(kinds, n_raw):
        r = raw[o:o + n].copy()
        o += n
        compat_grad_raw.append(r)
        if kind == COMPAT_POTTS:
            compat_grad.append(float(r[0]))
        elif kind == COMPAT_DIAGONAL:
            compat_grad.append(r)
        else:
            g = np.empty((L, L), np.float32)
            iu = np.triu_indices(L)  # row by row, j >= i: Krähenbühl's order
            g[iu] = r
            g[iu[1], iu[0]] = r
            off = ~np.eye(L, dtype=bool)
            g[off] *= 0.5  # w = (M + M^T) / 2: dO/dM_ij = (g_ij + g_ji) / 2 = raw_ij / 2; dO/dM_ii = g_ii
            compat_grad.append(g)
    out = {"q": q, "objective": objective, "unary_grad": unary_grad, "compat_grad": compat_grad,
           "compat_grad_raw": compat_grad_raw}
    if kernel_grad:
        kgrad_fixed = call("fixed", True)[4]
        split = np.cumsum(dims)[:-1]
        out["kernel_grad"] = [v.copy() for v in np.split(kgrad[:sum(dims)], split)]
        out["kernel_grad_fixed"] = [v.copy() for v in np.split(kgrad_fixed[:sum(dims)], split)]
    return out


def lattice_gradient(features, a, b, *, fixed=False) -> tuple[float, np.ndarray]:
    """The bare lattice: (a^T K b, Permutohedral::gradient(a, b)) for K the (unnormalised) permutohedral filter of
    features float32 [D, N], a and b float32 [V, N]. As shipped the gradient is d(b^T K a)/d features [D, N];
    with fixed=True, d(a^T K b)/d features (see _FIX)."""
    f = np.asarray(features)
    if f.ndim != 2:
        raise ValueError(f"features: [D, N] expected, got shape {f.shape}")
    D, N = f.shape
    f = _f32(f, (D, N), "features")
    a = np.asarray(a)
    V = a.shape[0] if a.ndim == 2 else -1
    a, b = _f32(a, (V, N), "a"), _f32(b, (V, N), "b")
    value, df = ctypes.c_double(), np.empty((D, N), np.float32)
    _library("fixed" if fixed else "krahenbuhl").krahenbuhl_lattice_gradient(
        N, D, V, _ptr(f), _ptr(a), _ptr(b), ctypes.byref(value), _ptr(df))
    return float(value.value), df
