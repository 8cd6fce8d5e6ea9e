"""setup.py without building: how it finds the CUDA toolkit, its summary line, and its SANITIZE=1 flags.

setup.py is loaded as a module (its setup() call runs only as __main__), and its toolkit search is run against
fake toolkits in tmp_path: a folder with include/cuda_runtime.h and an executable bin/nvcc.
"""
import os
import stat
from pathlib import Path

import pytest
import torch.utils.cpp_extension as cpp_extension
from helpers import load_setup_py



@pytest.fixture
def setup_py():
    return load_setup_py()


def script(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def toolkit(path: Path, release: str = "13.0") -> Path:
    """A fake CUDA toolkit: the header torch's build looks for and an nvcc that tells its version."""
    (path / "include").mkdir(parents=True)
    (path / "include" / "cuda_runtime.h").write_text("// fake\n")
    script(path / "bin" / "nvcc", f'#!/bin/sh\necho "Cuda compilation tools, release {release}, V{release}.1"\n')
    return path


def no_nvcc(name):
    return None


@pytest.fixture
def isolated_env(monkeypatch, tmp_path):
    """No CUDA_HOME, FORCE_CUDA or SANITIZE from outside; CUDA_HOME restored after setup.py sets it."""
    for var in ("FORCE_CUDA", "SANITIZE", "DEBUG", "CUTLASS_PATH", "CUDA_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("CUDA_HOME", "unset-by-test")
    monkeypatch.delenv("CUDA_HOME")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", None)
    return monkeypatch


def test_cuda_home_with_headers_is_used(setup_py, tmp_path):
    tk = toolkit(tmp_path / "cuda")
    home, how, notes = setup_py.find_cuda_toolkit(str(tk), which_nvcc=no_nvcc, standard=())
    assert (home, how) == (str(tk), "torch's CUDA_HOME")


def test_wrapper_script_is_followed(setup_py, tmp_path):
    """/usr/local/bin/nvcc as `exec /usr/local/cuda-13.0/bin/nvcc "$@"`: torch guesses /usr/local, no headers."""
    tk = toolkit(tmp_path / "cuda-13.0")
    wrapper = script(tmp_path / "local" / "bin" / "nvcc", f'#!/bin/sh\nexec {tk}/bin/nvcc "$@"\n')
    home, how, notes = setup_py.find_cuda_toolkit(str(tmp_path / "local"), which_nvcc=no_nvcc, standard=())
    assert home == str(tk)
    assert str(wrapper) in how
    assert any("wrapper script" in n for n in notes)
    assert any("no include/cuda_runtime.h" in n for n in notes)  # the rejected CUDA_HOME is reported


def test_symlinked_nvcc_on_path_is_followed(setup_py, tmp_path):
    tk = toolkit(tmp_path / "cuda")
    link = tmp_path / "bin" / "nvcc"
    link.parent.mkdir()
    link.symlink_to(tk / "bin" / "nvcc")
    home, how, notes = setup_py.find_cuda_toolkit(None, which_nvcc=lambda name: str(link), standard=())
    assert home == str(tk)
    assert "the nvcc on PATH" in how
    assert any("is a link to" in n for n in notes)


def test_nvcc_is_asked_where_its_toolkit_is(setup_py, tmp_path):
    """A wrapper that names no path: `nvcc --dryrun` reports TOP=<toolkit>/bin/.."""
    tk = toolkit(tmp_path / "hidden" / "cuda")
    (tmp_path / "where").write_text(str(tk))
    wrapper = script(tmp_path / "opaque" / "bin" / "nvcc",
                     f'#!/bin/sh\necho "#\\$ TOP=$(cat {tmp_path}/where)/bin/.." >&2\n')
    home, how, notes = setup_py.find_cuda_toolkit(None, which_nvcc=lambda name: str(wrapper), standard=())
    assert home == str(tk)
    assert any("--dryrun` says TOP=" in n for n in notes)


def test_standard_locations_come_last(setup_py, tmp_path):
    tk = toolkit(tmp_path / "cuda-12.8")
    home, how, _ = setup_py.find_cuda_toolkit(str(tmp_path / "empty"), which_nvcc=no_nvcc,
                                              standard=(str(tmp_path / "cuda"),), cuda_version="12.8")
    assert (home, how) == (str(tk), "a standard location")


def test_nothing_found_says_what_was_tried(setup_py, tmp_path):
    home, how, notes = setup_py.find_cuda_toolkit(str(tmp_path), which_nvcc=no_nvcc,
                                                  standard=(str(tmp_path / "nowhere"),))
    assert home is None and how is None
    text = "\n".join(notes)
    assert str(tmp_path) in text and "no nvcc on PATH" in text and "nowhere" in text


def test_build_fails_clearly_without_a_toolkit(setup_py, isolated_env, tmp_path):
    """CUDA_HOME at a folder without the headers, no nvcc anywhere: a RuntimeError naming CUDA_HOME."""
    empty = tmp_path / "no-headers"
    (empty / "include").mkdir(parents=True)
    isolated_env.setenv("CUDA_HOME", str(empty))
    isolated_env.setenv("FORCE_CUDA", "1")
    isolated_env.setenv("PATH", str(tmp_path / "no-bin"))
    isolated_env.setattr(cpp_extension, "CUDA_HOME", str(empty))
    isolated_env.setattr(setup_py, "STANDARD_CUDA_HOMES", (str(tmp_path / "no-standard"),))
    with pytest.raises(RuntimeError) as info:
        setup_py._extension()
    msg = str(info.value)
    assert f"CUDA_HOME={str(empty)!r}" in msg
    assert "Tried:" in msg and "no nvcc on PATH" in msg and "no-standard" in msg


def test_summary_line_names_the_toolkit(setup_py, isolated_env, tmp_path, capsys):
    tk = toolkit(tmp_path / "cuda-13.0")
    script(tmp_path / "local" / "bin" / "nvcc", f'#!/bin/sh\nexec {tk}/bin/nvcc "$@"\n')
    cutlass = tmp_path / "cutlass"
    (cutlass / "include" / "cutlass").mkdir(parents=True)
    (cutlass / "include" / "cutlass" / "cutlass.h").write_text("// fake\n")
    isolated_env.setenv("FORCE_CUDA", "1")
    isolated_env.setenv("CUTLASS_PATH", str(cutlass))
    isolated_env.setenv("CUDA_HOME", str(tmp_path / "local"))
    isolated_env.setattr(cpp_extension, "CUDA_HOME", str(tmp_path / "local"))
    ext = setup_py._extension()
    out = capsys.readouterr().out
    assert "building CUDA + CPU extension" in out
    assert f"CUDA toolkit {tk} (nvcc 13.0; from" in out
    assert f"torch's CUDA_HOME '{tmp_path / 'local'}' has no CUDA headers; using the toolkit in {tk}" in out
    assert cpp_extension.CUDA_HOME == str(tk) and os.environ["CUDA_HOME"] == str(tk)
    assert any(s.endswith(".cu") for s in ext.sources)


def test_sanitize_flags(setup_py, isolated_env, capsys):
    isolated_env.setenv("SANITIZE", "1")
    ext = setup_py._extension()
    cxx = ext.extra_compile_args["cxx"]
    assert "-fsanitize=address,undefined" in cxx and "-fno-omit-frame-pointer" in cxx
    assert "-O1" in cxx and "-g" in cxx and "-O3" not in cxx
    assert "-ffp-contract=off" in cxx  # the CPU CRF's bit-exactness rule holds in every build
    assert "-fsanitize=address,undefined" in ext.extra_link_args
    assert "ASan/UBSan (SANITIZE=1)" in capsys.readouterr().out


def test_release_flags_have_no_sanitizer(setup_py, isolated_env, capsys):
    ext = setup_py._extension()
    assert "-O3" in ext.extra_compile_args["cxx"]
    assert not any("sanitize" in f for f in ext.extra_compile_args["cxx"] + ext.extra_link_args)
    assert "building CPU-only extension" in capsys.readouterr().out


# ---- progress lines (a plain `pip install` shows them on the terminal; the log has them too) ----


def test_compiled_source_names_the_unit(setup_py, monkeypatch):
    root = setup_py.ROOT
    monkeypatch.chdir(root)
    cmd = (f"c++ -MMD -MF /tmp/b/x.o.d -I{root}/csrc -c {root}/csrc/dense_crf/cpu/mean_field.cpp "
           f"-o /tmp/b/x.o -O3")
    assert setup_py.compiled_source(cmd) == os.path.join("csrc", "dense_crf", "cpu", "mean_field.cpp")
    assert setup_py.compiled_source("/usr/bin/nvcc -c '/elsewhere/k.cu' -o k.o") == "/elsewhere/k.cu"
    assert setup_py.compiled_source(["c++", "-O3", "-c", "-c", f"{root}/csrc/a.cpp", "-o", "a.o"]) == os.path.join(
        "csrc", "a.cpp")  # torch's ninja rule repeats -c
    assert setup_py.compiled_source("g++ -shared a.o -o _C.so") == "g++ -shared a.o -o _C.so"
    assert setup_py._duration(42.4) == "42 s" and setup_py._duration(151) == "2 min 31 s"


def test_ninja_status_lines_reach_the_log_and_the_callback(setup_py, capfd):
    """ninja's "[k/N] command" lines, written by a child process to file descriptor 1, call back per unit and
    still reach the build log (fd 1) byte for byte."""
    units = []
    text = "[1/2] c++ -c /src/a.cpp -o a.o\nwarning: something\n[2/2] c++ -c /src/b.cpp -o b.o\n"
    with setup_py.ninja_status_lines(lambda k, n, cmd: units.append((k, n, cmd))):
        import subprocess

        subprocess.run(["printf", "%s", text], check=True)
    assert units == [(1, 2, "c++ -c /src/a.cpp -o a.o"), (2, 2, "c++ -c /src/b.cpp -o b.o")]
    assert capfd.readouterr().out == text


PIPE_FILLER = """
import subprocess, sys
sys.path.insert(0, sys.argv[1])
from helpers import load_setup_py
setup_py = load_setup_py()
progress = setup_py.Progress(tty_path="/nonexistent/tty")
child = ("import sys; sys.stdout.write('[1/2] c++ -c /src/a.cpp -o a.o\\\\n' + 'warning: from a header\\\\n' * 20000"
         " + '[2/2] c++ -c /src/b.cpp -o b.o\\\\n')")
with setup_py.ninja_status_lines(lambda k, n, cmd: progress.line(f"[{k}/{n}] compiled {cmd}")) as tee:
    progress.log_fd = tee.log_fd
    subprocess.run([sys.executable, "-c", child], check=True)
progress.log_fd = None
"""


def test_progress_lines_do_not_deadlock_on_a_full_pipe(tmp_path):
    """A unit whose compiler output fills the pipe (over 64 KiB of warnings after its status line) while the
    reading thread prints the progress line: the line goes to the log descriptor, not into the pipe the thread
    drains (which hung the build after its last unit)."""
    import subprocess
    import sys

    src = script(tmp_path / "filler.py", PIPE_FILLER)
    r = subprocess.run([sys.executable, str(src), str(Path(__file__).parent)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("warning: from a header") == 20000
    assert "deeplab_fast: [1/2] compiled c++ -c /src/a.cpp -o a.o" in r.stdout
    assert "deeplab_fast: [2/2] compiled c++ -c /src/b.cpp -o b.o" in r.stdout


def test_progress_lines_go_to_the_log_and_the_terminal(setup_py, tmp_path, capsys):
    tty = tmp_path / "tty"
    tty.write_text("")
    progress = setup_py.Progress(tty_path=str(tty))  # pytest captures stdout: not a terminal, as under pip
    progress.line("[3/13] compiled csrc/x.cpp (12 s)", ": details for the log only")
    progress.tty.close()
    assert capsys.readouterr().out == "deeplab_fast: [3/13] compiled csrc/x.cpp (12 s): details for the log only\n"
    assert tty.read_bytes() == b"\r\033[Kdeeplab_fast: [3/13] compiled csrc/x.cpp (12 s)\n"
    assert setup_py.Progress(tty_path=str(tmp_path / "no" / "tty")).tty is None  # no terminal: the log alone


TINY_SETUP = """
import sys
sys.path.insert(0, sys.argv.pop(1))  # tests/, for helpers.load_setup_py
from helpers import load_setup_py
dlf = load_setup_py()
from setuptools import Extension, setup
dlf.BuildWithProgress.progress = dlf.Progress(tty_path="/nonexistent/tty")
setup(name="tiny", ext_modules=[Extension("tiny_ext", ["a.cpp", "b.cpp"], language="c++")],
      cmdclass={"build_ext": dlf.BuildWithProgress.with_options(use_ninja=USE_NINJA)})
"""


@pytest.mark.parametrize("use_ninja", [True, False], ids=["ninja", "serial"])
def test_build_prints_a_line_per_unit_the_link_and_the_total(setup_py, tmp_path, use_ninja):
    """A two-file extension (no torch headers, so it compiles in a second) built by BuildWithProgress, its output
    piped as pip pipes it: a line per compiled unit, the link, and the total time."""
    import shutil
    import subprocess
    import sys

    if use_ninja and shutil.which("ninja") is None:
        pytest.skip("ninja is not installed")
    (tmp_path / "a.cpp").write_text("int a() { return 1; }\n")
    (tmp_path / "b.cpp").write_text('#include <Python.h>\nstatic struct PyModuleDef m = {PyModuleDef_HEAD_INIT, '
                                    '"tiny_ext", 0, -1, 0};\nPyMODINIT_FUNC PyInit_tiny_ext(void) { return '
                                    'PyModule_Create(&m); }\n')
    (tmp_path / "setup_tiny.py").write_text(TINY_SETUP.replace("USE_NINJA", str(use_ninja)))
    r = subprocess.run([sys.executable, "setup_tiny.py", str(Path(__file__).parent), "build_ext", "--inplace"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    lines = [line for line in r.stdout.splitlines() if line.startswith("deeplab_fast: ")]
    if use_ninja:
        assert lines[0].startswith("deeplab_fast: compiling 2 units with ninja")
        assert sorted(line.split(" (")[0] for line in lines[1:3]) == [
            "deeplab_fast: [1/2] compiled a.cpp", "deeplab_fast: [2/2] compiled b.cpp"] or sorted(
            line.split(" (")[0] for line in lines[1:3]) == [
            "deeplab_fast: [1/2] compiled b.cpp", "deeplab_fast: [2/2] compiled a.cpp"]
    else:
        assert lines[0].startswith("deeplab_fast: ninja not found: compiling 2 units one at a time")
        assert [line.split(" (")[0] for line in lines[1:3]] == ["deeplab_fast: [1/2] compiling a.cpp",
                                                                "deeplab_fast: [2/2] compiling b.cpp"]
    assert lines[3].startswith("deeplab_fast: linking tiny_ext")
    assert lines[4].startswith("deeplab_fast: built tiny_ext in ") and "2 units" in lines[4]
