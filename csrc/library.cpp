// Owns the deeplab_fast op namespace. Each op folder under csrc/ adds its schemas with
// TORCH_LIBRARY_FRAGMENT(deeplab_fast, m) and its kernels with TORCH_LIBRARY_IMPL(deeplab_fast, <device>, m).
#include <torch/library.h>

TORCH_LIBRARY(deeplab_fast, m) {}
