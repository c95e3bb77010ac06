// csrc/bindings.cpp — the torch.ops.pygen operator schemas and the Python module.
//
// Every op is declared once here. Implementations are registered per dispatch
// key next to their kernels: csrc/cpu/<family>.cpp (CPU) and
// csrc/cuda/<family>.cu (CUDA). Fake implementations, the Triton variants and
// the fallback used when this extension is absent live in pygen/ops/.
// pygen/ops/_schemas.py holds the same schema strings (checked by a test).
#ifdef PYGEN_TORCH_EXTENSION
#include <Python.h>
#endif
#include <torch/library.h>

TORCH_LIBRARY(pygen, m) {
  m.def("randn_fill_(Tensor(a!) out, int seed, int stream, Tensor? row_seeds, Tensor? stream_offset=None) -> ()");
  m.def(
      "q_sample(Tensor x0, Tensor t, Tensor table, Tensor? noise, int seed, int stream, "
      "Tensor? row_seeds, int interpolation, int target) -> (Tensor, Tensor, Tensor)");
  m.def(
      "reparameterize(Tensor mu, Tensor logvar, Tensor? noise, int seed, int stream, "
      "Tensor? row_seeds) -> (Tensor, Tensor)");
  m.def(
      "langevin_step(Tensor x, Tensor score, Tensor? step_sizes, float step_size, Tensor? noise, "
      "int seed, int stream, Tensor? row_seeds, Tensor? stream_offset=None) -> Tensor");
  m.def(
      "langevin_snr_step(Tensor x, Tensor score, Tensor? noise, Tensor(a!) out, Tensor(b!) step, int seed, "
      "int stream, Tensor? row_seeds, float four_alpha_snr2, bool batch_norm, Tensor? k_table=None, "
      "Tensor(c!)? step_index=None) -> ()");
  m.def(
      "sampler_step_out(Tensor x, Tensor model_out, Tensor coeffs, Tensor(a!) step_index, "
      "Tensor(b!)? history, Tensor? noise, Tensor(c!) out, Tensor(d!)? pred_x0, int seed, int stream, "
      "Tensor? row_seeds, float clamp, bool advance) -> ()");
  m.def(
      "step_coefficients(Tensor levels, int kind, int prediction, float eta, float param0, "
      "float param1) -> Tensor");
  m.def(
      "leapfrog_(Tensor(a!) x, Tensor(b!) p, Tensor grad, Tensor? step_sizes, float step_size, float kick, "
      "float drift) -> ()");
  m.def("mh_select_(Tensor(a!) x, Tensor x_prop, Tensor log_accept, Tensor log_u, Tensor(b!) accepted) -> ()");
  m.def("attention_fwd(Tensor q, Tensor k, Tensor v, float scale, bool causal) -> (Tensor, Tensor)");
  m.def("attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, float scale, bool causal) -> (Tensor, Tensor, Tensor)");
  m.def("adaln_modulate(Tensor x, Tensor? weight, Tensor? bias, Tensor? shift, Tensor? scale, float eps) -> (Tensor, Tensor, Tensor)");
  m.def("adaln_modulate_backward(Tensor grad_y, Tensor x, Tensor? weight, Tensor? bias, Tensor? scale, Tensor mean, Tensor rstd) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("gated_residual(Tensor x, Tensor gate, Tensor y) -> Tensor");
  m.def("gated_residual_backward(Tensor grad, Tensor gate, Tensor y) -> (Tensor, Tensor)");
  m.def("group_norm(Tensor x, Tensor? weight, Tensor? bias, int groups, float eps, bool silu) -> (Tensor, Tensor, Tensor)");
  m.def("group_norm_backward(Tensor grad_y, Tensor x, Tensor? weight, Tensor? bias, Tensor mean, Tensor rstd, int groups, bool silu) -> (Tensor, Tensor, Tensor)");
  m.def("timestep_embedding(Tensor t, int dim, float max_period, float downscale_freq_shift, float scale, bool flip_sin_to_cos) -> Tensor");
  m.def("timestep_embedding_backward(Tensor grad, Tensor t, int dim, float max_period, float downscale_freq_shift, float scale, bool flip_sin_to_cos) -> Tensor");
  m.def("diffusion_loss(Tensor model_out, Tensor x0, Tensor? noise, Tensor coeffs, int seed, int stream, Tensor? row_seeds) -> Tensor");
  m.def("diffusion_loss_backward(Tensor grad_rows, Tensor model_out, Tensor x0, Tensor? noise, Tensor coeffs, int seed, int stream, Tensor? row_seeds) -> Tensor");
  m.def("reparameterize_kl(Tensor mu, Tensor logvar, Tensor? noise, int seed, int stream, Tensor? row_seeds) -> (Tensor, Tensor)");
  m.def("reparameterize_kl_backward(Tensor grad_z, Tensor grad_kl, Tensor mu, Tensor logvar, Tensor? noise, int seed, int stream, Tensor? row_seeds) -> (Tensor, Tensor)");
}

#ifdef PYGEN_TORCH_EXTENSION
// `import pygen._C` loads this library, which runs the registrations above and
// those in csrc/cpu and csrc/cuda. The module itself has no attributes.
// (The CMake build makes a plain shared library without this.)
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
#endif
