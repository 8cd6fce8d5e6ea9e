#!/usr/bin/env bash
# Builds pydensecrf2 (the dense CRF tests' reference) from its sdist, offline, into a target folder:
#   bash .ci/build_pydensecrf.sh SDIST TARGET [PYTHON]
# For the GPU machine, whose Python has no pydensecrf2 wheel on PyPI (carry pydensecrf2-1.1.tar.gz in .whl/).
# pydensecrf2 1.1's setup.py asks for cython==0.29.36 (setup_requires), which pip cannot fetch offline: that line
# is dropped, then it is built with the Cython there, or else from the pre-generated .cpp files (Cython hidden).
# TARGET must be on PYTHONPATH for the import check. Exit status 0 when `import pydensecrf.densecrf` works after.
set -u
sdist="$1" target="$2" py="${3:-${PYTHON:-python3}}"
src="${TMPDIR:-/tmp}/deeplab_fast-pydensecrf-src"
export PYTHONPATH="$target${PYTHONPATH:+:$PYTHONPATH}"
pyok() { "$py" -c "$1" >/dev/null 2>&1; }
echo "building pydensecrf2 from $sdist into $target"
rm -rf "$src" && mkdir -p "$src" "$target" && tar -xzf "$sdist" -C "$src" --strip-components 1 || exit 1
sed -i '/setup_requires/d' "$src/setup.py"
rm -f "$src/pyproject.toml"  # its build-system table pins Cython==0.29.36 too
if "$py" -m pip install -q --no-index --no-deps --no-build-isolation --target "$target" "$src" &&
  pyok "import pydensecrf.densecrf"; then
  echo "pydensecrf2 built (Cython)"
  exit 0
fi
nocython="${TMPDIR:-/tmp}/deeplab_fast-nocython"
mkdir -p "$nocython/Cython" && echo 'raise ImportError("hidden: build from the pre-generated .cpp")' \
  >"$nocython/Cython/__init__.py"
if PYTHONPATH="$nocython:$PYTHONPATH" "$py" -m pip install -q --no-index --no-deps --no-build-isolation \
  --target "$target" --upgrade "$src" && pyok "import pydensecrf.densecrf"; then
  echo "pydensecrf2 built (pre-generated .cpp)"
  exit 0
fi
echo "pydensecrf2 could not be built"
exit 1
