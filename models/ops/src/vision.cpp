// Python bindings of the MultiScaleDeformableAttention extension.
#include "ms_deform_attn.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("ms_deform_attn_forward", &ms_deform_attn_forward,
        "multi-scale deformable attention, forward (CUDA)",
        py::arg("value"), py::arg("spatial_shapes"), py::arg("level_start_index"),
        py::arg("sampling_loc"), py::arg("attn_weight"), py::arg("im2col_step"));
  m.def("ms_deform_attn_backward", &ms_deform_attn_backward,
        "multi-scale deformable attention, backward (CUDA): [grad_value, grad_sampling_loc, grad_attn_weight]",
        py::arg("value"), py::arg("spatial_shapes"), py::arg("level_start_index"),
        py::arg("sampling_loc"), py::arg("attn_weight"), py::arg("grad_output"),
        py::arg("im2col_step"));
  m.def("has_kernel", &ms_deform_attn_has_kernel,
        "whether the build holds code that CUDA device `device_index` can run",
        py::arg("device_index"));
}
