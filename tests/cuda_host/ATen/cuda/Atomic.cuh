// Stands in for ATen's header when the kernels are compiled for the CPU (see cuda_host_runtime.h).
#pragma once
#include "../../cuda_host_runtime.h"
