"""The ``torch.ops.pygen`` operator schemas, one line each.

csrc/bindings.cpp declares the same schemas with ``TORCH_LIBRARY(pygen, m)``;
tests/test_registration.py checks that the two lists agree. When the compiled
extension is missing, pygen/ops/_registry.py defines these schemas from Python
and registers the torch reference as their implementation, so
``torch.ops.pygen.<op>`` exists either way.
"""

SCHEMAS = {
    "randn_fill_": (
        "randn_fill_(Tensor(a!) out, int seed, int stream, Tensor? row_seeds, Tensor? stream_offset=None) -> ()"
    ),
    "q_sample": (
        "q_sample(Tensor x0, Tensor t, Tensor table, Tensor? noise, int seed, int stream, "
        "Tensor? row_seeds, int interpolation, int target) -> (Tensor, Tensor, Tensor)"
    ),
    "reparameterize": (
        "reparameterize(Tensor mu, Tensor logvar, Tensor? noise, int seed, int stream, "
        "Tensor? row_seeds) -> (Tensor, Tensor)"
    ),
    "langevin_step": (
        "langevin_step(Tensor x, Tensor score, Tensor? step_sizes, float step_size, Tensor? noise, "
        "int seed, int stream, Tensor? row_seeds, Tensor? stream_offset=None) -> Tensor"
    ),
    "langevin_snr_step": (
        "langevin_snr_step(Tensor x, Tensor score, Tensor? noise, Tensor(a!) out, Tensor(b!) step, int seed, "
        "int stream, Tensor? row_seeds, float four_alpha_snr2, bool batch_norm, Tensor? k_table=None, "
        "Tensor(c!)? step_index=None) -> ()"
    ),
    "sampler_step_out": (
        "sampler_step_out(Tensor x, Tensor model_out, Tensor coeffs, Tensor(a!) step_index, "
        "Tensor(b!)? history, Tensor? noise, Tensor(c!) out, Tensor(d!)? pred_x0, int seed, int stream, "
        "Tensor? row_seeds, float clamp, bool advance) -> ()"
    ),
    "step_coefficients": (
        "step_coefficients(Tensor levels, int kind, int prediction, float eta, float param0, "
        "float param1) -> Tensor"
    ),
    "leapfrog_": (
        "leapfrog_(Tensor(a!) x, Tensor(b!) p, Tensor grad, Tensor? step_sizes, float step_size, float kick, "
        "float drift) -> ()"
    ),
    "mh_select_": "mh_select_(Tensor(a!) x, Tensor x_prop, Tensor log_accept, Tensor log_u, Tensor(b!) accepted) -> ()",
    "attention_fwd": "attention_fwd(Tensor q, Tensor k, Tensor v, float scale, bool causal) -> (Tensor, Tensor)",
    "attention_bwd": (
        "attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, float scale, bool causal) -> (Tensor, Tensor, Tensor)"
    ),
    "adaln_modulate": (
        "adaln_modulate(Tensor x, Tensor? weight, Tensor? bias, Tensor? shift, Tensor? scale, float eps) -> (Tensor, Tensor, Tensor)"
    ),
    "adaln_modulate_backward": (
        "adaln_modulate_backward(Tensor grad_y, Tensor x, Tensor? weight, Tensor? bias, Tensor? scale, Tensor mean, Tensor rstd) -> (Tensor, Tensor, Tensor, Tensor, Tensor)"
    ),
    "gated_residual": "gated_residual(Tensor x, Tensor gate, Tensor y) -> Tensor",
    "gated_residual_backward": "gated_residual_backward(Tensor grad, Tensor gate, Tensor y) -> (Tensor, Tensor)",
    "group_norm": (
        "group_norm(Tensor x, Tensor? weight, Tensor? bias, int groups, float eps, bool silu) -> (Tensor, Tensor, Tensor)"
    ),
    "group_norm_backward": (
        "group_norm_backward(Tensor grad_y, Tensor x, Tensor? weight, Tensor? bias, Tensor mean, Tensor rstd, int groups, bool silu) -> (Tensor, Tensor, Tensor)"
    ),
    "timestep_embedding": (
        "timestep_embedding(Tensor t, int dim, float max_period, float downscale_freq_shift, float scale, bool flip_sin_to_cos) -> Tensor"
    ),
    "timestep_embedding_backward": (
        "timestep_embedding_backward(Tensor grad, Tensor t, int dim, float max_period, float downscale_freq_shift, float scale, bool flip_sin_to_cos) -> Tensor"
    ),
    "diffusion_loss": (
        "diffusion_loss(Tensor model_out, Tensor x0, Tensor? noise, Tensor coeffs, int seed, int stream, Tensor? row_seeds) -> Tensor"
    ),
    "diffusion_loss_backward": (
        "diffusion_loss_backward(Tensor grad_rows, Tensor model_out, Tensor x0, Tensor? noise, Tensor coeffs, int seed, int stream, Tensor? row_seeds) -> Tensor"
    ),
    "reparameterize_kl": (
        "reparameterize_kl(Tensor mu, Tensor logvar, Tensor? noise, int seed, int stream, Tensor? row_seeds) -> (Tensor, Tensor)"
    ),
    "reparameterize_kl_backward": (
        "reparameterize_kl_backward(Tensor grad_z, Tensor grad_kl, Tensor mu, Tensor logvar, Tensor? noise, int seed, int stream, Tensor? row_seeds) -> (Tensor, Tensor)"
    ),
}
