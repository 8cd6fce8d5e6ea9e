// deeplab_fast::_environment() -> str: the environment switches (common/env.h), validated, as JSON
// {"NAME": "value or null", ...}. Python checks them at import (deeplab_fast/_env.py), so a bad value is an
// error there rather than at the first op call, and it warns about DEEPLAB_FAST_* names that are not switches.
#include <torch/library.h>

#include <sstream>
#include <stdexcept>
#include <string>

#include "common/env.h"

namespace {

std::string environment() {
  try {
    deeplab_fast::env::check_all();
  } catch (const std::invalid_argument& e) {
    TORCH_CHECK_VALUE(false, e.what());
  }
  std::ostringstream s;
  s << "{";
  bool first = true;
  for (const deeplab_fast::env::Switch* sw : deeplab_fast::env::kAll) {
    const char* v = deeplab_fast::env::value(*sw);
    s << (first ? "" : ", ") << "\"" << sw->name << "\": ";
    if (v == nullptr) {
      s << "null";
    } else {
      s << "\"" << v << "\"";  // validated: digits, 0/1, on/off/auto, spin/passive
    }
    first = false;
  }
  s << "}";
  return s.str();
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(deeplab_fast, m) { m.def("_environment() -> str", &environment); }
