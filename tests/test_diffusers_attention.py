"""pygen.diffusers.AttnProcessor vs diffusers' AttnProcessor2_0 (diffusers 0.42.1).

* single ``Attention`` layers covering every branch of AttnProcessor2_0: 4-D inputs (NCHW and
  channels-last) with group norm, residual and rescale; spatial norm (temb); 3-D group norm;
  cross-attention with norm_cross (layer / group norm); q/k norms; no biases; attention masks (the
  SDPA fallback); the deprecated ``scale`` argument;
* whole tiny models on the same weights and inputs: UNet2DConditionModel (via
  ``set_attn_processor``), UNet2DModel (4-D attention with group norm + residual), DiTTransformer2DModel
  (no ``set_attn_processor``: via ``install_attn_processor``) and PixArtTransformer2DModel with an
  encoder attention mask; outputs and parameter gradients at fp32 tolerance;
* ``patch`` / ``unpatch`` on a pipeline-like object (processors installed on unet / transformer,
  other processors untouched, originals restored).

Runs under the default backend and ``pygen.use_backend("torch")``; the models whose head dims are all
in pygen's kernel set (32) and a patched pipeline also with each CPU pygen kernel forced
(``PYGEN_ATTENTION=cpu``, and ``triton`` under TRITON_INTERPRET=1), checking that the kernel really
ran. Skips without diffusers.
"""
import contextlib
import copy
import os
import warnings

import pytest
import torch

import pygen

diffusers = pytest.importorskip("diffusers")
from diffusers.models import attention_processor as ap  # noqa: E402

import pygen.diffusers as PD  # noqa: E402
from pygen.ops import attention as A  # noqa: E402

BACKENDS = ["default", "torch"]
FP32 = dict(rtol=1e-4, atol=1e-5)
# pygen attention kernels that run CPU tensors here: forced on models whose head dims are all supported
KERNEL_SKIPS = {
    "cpu": pytest.mark.skipif(not A._kernel_available("cpu", torch.device("cpu"), torch.float32),
                              reason="pygen._C has no CPU attention kernel"),
    "triton": pytest.mark.skipif(not (os.environ.get("TRITON_INTERPRET") == "1"
                                      and A._kernel_available("triton", torch.device("cpu"), torch.float32)),
                                 reason="needs triton and TRITON_INTERPRET=1"),
}
KERNEL_BACKENDS = [pytest.param(b, marks=m) for b, m in KERNEL_SKIPS.items()]
# (model, kernel) with gradients. The UNet's backward under the Triton interpreter takes 10-25 s: its
# Triton forward is covered by test_patched_pipeline_runs_pygen_kernel, its backward on the cpu kernel.
FORCED_MODEL_CASES = [pytest.param(n, b, marks=KERNEL_SKIPS[b], id=f"{n}-{b}")
                      for n, b in (("dit", "cpu"), ("dit", "triton"), ("unet_cond_hd32", "cpu"))]


def backend_ctx(name):
    return contextlib.nullcontext() if name == "default" else pygen.use_backend(name)


@contextlib.contextmanager
def forced_kernel(backend, monkeypatch):
    """Force pygen kernel ``backend`` for attention only (``PYGEN_ATTENTION``; other pygen ops keep their
    default) and count: yields {"attention": pygen.attention calls, "launches": forward launches of that
    kernel, "head_dims": their head dims}. The spied launchers are the ones both the inference and
    the grad path call: ``kernels.attention.attention_fwd`` (triton; direct launch and autograd
    Function) and ``ops.attention._compiled_fwd`` (cpu; the compiled op with its C++ autograd)."""
    from pygen.kernels import attention as tk

    counts = {"attention": 0, "launches": 0, "head_dims": set()}
    real_attention = pygen.attention

    def attention_spy(*args, **kwargs):
        counts["attention"] += 1
        out = real_attention(*args, **kwargs)
        assert A.last_choice()[0] == backend, A.last_choice()
        return out

    def launcher_spy(real):
        def launch(q, *args, **kwargs):
            counts["launches"] += 1
            counts["head_dims"].add(q.shape[-1])
            return real(q, *args, **kwargs)
        return launch

    monkeypatch.setattr(pygen, "attention", attention_spy)
    if backend == "triton":
        monkeypatch.setattr(tk, "attention_fwd", launcher_spy(tk.attention_fwd))
    else:
        monkeypatch.setattr(A, "_compiled_fwd", launcher_spy(A._compiled_fwd))
    monkeypatch.setenv("PYGEN_ATTENTION", backend)
    yield counts
    monkeypatch.undo()


def randomize_(module, seed, std=0.1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * std)  # (zero-initialised layers become non-zero)
    return module


def randn(gen, *shape):
    return torch.randn(shape, generator=gen)


def processor_types(model):
    return {type(m.processor) for m in model.modules() if isinstance(m, ap.Attention)}


@pytest.fixture(autouse=True)
def _quiet_fallback_warnings():
    # tiny configs use head dims outside pygen.attention's kernel set (its one-time fallback warning)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*head.dim.*")
        yield


# ---------------------------------------------------------------------------
# single Attention layers: every AttnProcessor2_0 branch
# ---------------------------------------------------------------------------
def _layer(kind):
    """(Attention kwargs, input builder) for one configuration."""
    if kind == "spatial_4d":
        kw = dict(query_dim=64, heads=2, dim_head=32, norm_num_groups=8, residual_connection=True, bias=True,
                  rescale_output_factor=1.0, eps=1e-6)
        return kw, lambda g: dict(hidden_states=randn(g, 2, 64, 3, 5))
    if kind == "spatial_4d_channels_last":
        kw = dict(query_dim=64, heads=2, dim_head=32, norm_num_groups=8, residual_connection=True, bias=True,
                  rescale_output_factor=2.0)
        return kw, lambda g: dict(hidden_states=randn(g, 2, 64, 4, 3).contiguous(memory_format=torch.channels_last))
    if kind == "spatial_4d_no_residual":
        kw = dict(query_dim=64, heads=1, dim_head=64, norm_num_groups=4, bias=True)
        return kw, lambda g: dict(hidden_states=randn(g, 1, 64, 5, 5))
    if kind == "spatial_norm_temb":
        kw = dict(query_dim=32, heads=1, dim_head=32, spatial_norm_dim=4, residual_connection=True, bias=True)
        return kw, lambda g: dict(hidden_states=randn(g, 2, 32, 4, 4), temb=randn(g, 2, 4, 2, 2))
    if kind == "tokens_group_norm":
        kw = dict(query_dim=64, heads=2, dim_head=32, norm_num_groups=16, bias=True)
        return kw, lambda g: dict(hidden_states=randn(g, 3, 7, 64))
    if kind == "self_no_bias":
        kw = dict(query_dim=48, heads=3, dim_head=32, bias=False, out_bias=False)
        return kw, lambda g: dict(hidden_states=randn(g, 2, 9, 48))
    if kind == "cross":
        kw = dict(query_dim=64, cross_attention_dim=24, heads=2, dim_head=32, bias=True)
        return kw, lambda g: dict(hidden_states=randn(g, 2, 7, 64), encoder_hidden_states=randn(g, 2, 11, 24))
    if kind == "cross_norm_layer":
        kw = dict(query_dim=64, cross_attention_dim=24, heads=2, dim_head=32, cross_attention_norm="layer_norm")
        return kw, lambda g: dict(hidden_states=randn(g, 2, 5, 64), encoder_hidden_states=randn(g, 2, 3, 24))
    if kind == "cross_norm_group":
        kw = dict(query_dim=64, cross_attention_dim=32, heads=2, dim_head=32, cross_attention_norm="group_norm",
                  cross_attention_norm_num_groups=8)
        return kw, lambda g: dict(hidden_states=randn(g, 2, 5, 64), encoder_hidden_states=randn(g, 2, 6, 32))
    if kind == "qk_layer_norm":
        kw = dict(query_dim=64, heads=2, dim_head=32, qk_norm="layer_norm", bias=True)
        return kw, lambda g: dict(hidden_states=randn(g, 2, 7, 64))
    if kind == "qk_rms_norm":
        kw = dict(query_dim=64, cross_attention_dim=16, heads=2, dim_head=32, qk_norm="rms_norm")
        return kw, lambda g: dict(hidden_states=randn(g, 2, 7, 64), encoder_hidden_states=randn(g, 2, 4, 16))
    if kind == "small_head_dim":  # head dim 8: pygen.attention's fallback path
        kw = dict(query_dim=32, heads=4, dim_head=8, bias=True)
        return kw, lambda g: dict(hidden_states=randn(g, 2, 6, 32))
    if kind == "mask_self":  # (B, 1, S) additive bias, as UNet2DConditionModel passes attention_mask
        kw = dict(query_dim=64, heads=2, dim_head=32, bias=True)

        def build(g):
            bias = torch.zeros(2, 1, 7)
            bias[1, :, 4:] = -10000.0
            return dict(hidden_states=randn(g, 2, 7, 64), attention_mask=bias)
        return kw, build
    if kind == "mask_cross_short":  # a mask shorter than the keys: prepare_attention_mask pads it
        kw = dict(query_dim=64, cross_attention_dim=24, heads=2, dim_head=32)

        def build(g):
            bias = torch.zeros(2, 1, 5)
            bias[0, :, 1] = -10000.0
            return dict(hidden_states=randn(g, 2, 3, 64), encoder_hidden_states=randn(g, 2, 5, 24),
                        attention_mask=bias)
        return kw, build
    raise KeyError(kind)


LAYER_KINDS = ["spatial_4d", "spatial_4d_channels_last", "spatial_4d_no_residual", "spatial_norm_temb",
               "tokens_group_norm", "self_no_bias", "cross", "cross_norm_layer", "cross_norm_group", "qk_layer_norm",
               "qk_rms_norm", "small_head_dim", "mask_self", "mask_cross_short"]


def _layer_pair_outputs(stock, ours, build, seed, backend=None):
    """Inputs from ``build`` (all but the mask requiring grad), then (out, grads) of ``ours`` (under
    ``backend``) and of ``stock`` for one random output gradient: (out, g, out_ref, g_ref)."""
    gen = torch.Generator().manual_seed(seed)
    inputs = build(gen)
    for k, v in inputs.items():
        if k != "attention_mask":
            v.requires_grad_()
    out_ref, _ = _run_layer(stock, inputs)
    gout = torch.randn(out_ref.shape, generator=gen)
    out_ref, g_ref = _run_layer(stock, inputs, gout)
    with backend_ctx(backend) if backend is not None else contextlib.nullcontext():
        out, g = _run_layer(ours, inputs, gout)
    return inputs, out, g, out_ref, g_ref


def _run_layer(attn, inputs, gout=None):
    """attn(**inputs) (temb reaches the processor through Attention.forward's kwargs); with ``gout``
    also the grads of the inputs that require grad and of every parameter."""
    out = attn(**inputs)
    if gout is None:
        return out, None
    leaves = [v for v in inputs.values() if v.requires_grad]
    return out, torch.autograd.grad(out, leaves + list(attn.parameters()), gout, allow_unused=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_layer_matches_attn_processor2_0(backend, kind):
    kw, build = _layer(kind)
    stock = randomize_(ap.Attention(**kw), seed=1)
    stock.set_processor(ap.AttnProcessor2_0())
    ours = copy.deepcopy(stock)
    ours.set_processor(PD.AttnProcessor())
    inputs, out, g, out_ref, g_ref = _layer_pair_outputs(stock, ours, build, 2, backend)
    assert out.shape == out_ref.shape and out.dtype == out_ref.dtype
    assert out.stride() == out_ref.stride()  # stock's layout (4-D: channels-last strides), so later convs match
    torch.testing.assert_close(out, out_ref, **FP32)
    names = [k for k, v in inputs.items() if v.requires_grad] + [n for n, _ in stock.named_parameters()]
    for name, a, b in zip(names, g, g_ref):
        if b is None:
            assert a is None, name
        else:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize("kind", ["spatial_4d", "self_no_bias", "tokens_group_norm", "qk_layer_norm", "cross",
                                  "cross_norm_layer", "qk_rms_norm", "mask_self"])
def test_fused_projections_match_fused_attn_processor2_0(kind):
    """After diffusers' fuse_projections(), the processor runs the fused to_qkv (self-attention) or to_kv
    (cross-attention) GEMM, never the separate ones, and matches FusedAttnProcessor2_0, forward and
    backward."""
    kw, build = _layer(kind)
    stock = randomize_(ap.Attention(**kw), seed=4)
    stock.fuse_projections()
    stock.set_processor(ap.FusedAttnProcessor2_0())
    ours = copy.deepcopy(stock)
    ours.set_processor(PD.AttnProcessor())
    calls = []
    for name in ("to_q", "to_k", "to_v", "to_qkv", "to_kv"):
        mod = getattr(ours, name, None)
        if mod is not None:
            mod.register_forward_hook(lambda m, i, o, name=name: calls.append(name))
    inputs, out, g, out_ref, g_ref = _layer_pair_outputs(stock, ours, build, 5)
    cross = "encoder_hidden_states" in inputs
    assert calls == (["to_q", "to_kv"] if cross else ["to_qkv"])
    torch.testing.assert_close(out, out_ref, **FP32)
    for a, b in zip(g, g_ref):
        if b is None:
            assert a is None
        else:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_mask_falls_back_to_sdpa_and_no_mask_uses_pygen(monkeypatch):
    """pygen.attention runs (bshd) when there is no mask; with a mask it is not called (SDPA is)."""
    calls = []
    real = pygen.attention

    def spy(q, k, v, *a, **kw):
        calls.append(kw.get("layout"))
        return real(q, k, v, *a, **kw)

    monkeypatch.setattr(pygen, "attention", spy)
    for kind, expected in (("cross", ["bshd"]), ("mask_self", []), ("mask_cross_short", [])):
        calls.clear()
        kw, build = _layer(kind)
        attn = ap.Attention(**kw)
        attn.set_processor(PD.AttnProcessor())
        with torch.no_grad():
            attn(**build(torch.Generator().manual_seed(0)))
        assert calls == expected, kind


def test_mask_actually_masks():
    """The masked keys do not contribute: dropping them gives the same output."""
    kw, _ = _layer("mask_self")
    attn = randomize_(ap.Attention(**kw), seed=3)
    attn.set_processor(PD.AttnProcessor())
    gen = torch.Generator().manual_seed(4)
    x, ctx = randn(gen, 1, 3, 64), randn(gen, 1, 6, 64)
    bias = torch.zeros(1, 1, 6)
    bias[..., 4:] = float("-inf")
    with torch.no_grad():
        masked = attn(x, ctx, attention_mask=bias)
        dropped = attn(x, ctx[:, :4])
    torch.testing.assert_close(masked, dropped, **FP32)


def test_scale_argument_is_deprecated_like_stock():
    kw, build = _layer("self_no_bias")
    attn = ap.Attention(**kw)
    inputs = build(torch.Generator().manual_seed(0))
    with torch.no_grad():
        results = []
        for proc in (ap.AttnProcessor2_0(), PD.AttnProcessor()):
            with warnings.catch_warnings(record=True) as rec:
                warnings.simplefilter("always")
                results.append(proc(attn, inputs["hidden_states"], scale=0.5))
            assert any("scale" in str(w.message) for w in rec), type(proc).__name__
    torch.testing.assert_close(results[1], results[0], **FP32)


def test_processor_signature_accepts_cross_attention_kwargs():
    """Attention.forward filters cross_attention_kwargs by the processor's signature, as for stock."""
    import inspect

    params = inspect.signature(PD.AttnProcessor().__call__).parameters
    assert list(params)[:5] == ["attn", "hidden_states", "encoder_hidden_states", "attention_mask", "temb"]
    assert any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


# ---------------------------------------------------------------------------
# whole tiny models
# ---------------------------------------------------------------------------
def tiny_unet_cond(attention_head_dim=8):
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, attention_head_dim=attention_head_dim,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        sample_size=8, norm_num_groups=8)


def tiny_unet2d():
    torch.manual_seed(0)
    return diffusers.UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(32, 64),
        norm_num_groups=8, attention_head_dim=32, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"))


def tiny_dit():
    torch.manual_seed(0)
    return diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=32, in_channels=4, num_layers=2,
                                           sample_size=8, patch_size=2, norm_num_groups=4)


def tiny_pixart():
    torch.manual_seed(0)
    return diffusers.PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=32, in_channels=4,
                                              out_channels=8, num_layers=2, sample_size=8, cross_attention_dim=64,
                                              caption_channels=16, norm_num_groups=4)


def _model_case(name):
    """(model, inputs, call) with random weights (zero-initialised layers randomised)."""
    gen = torch.Generator().manual_seed(5)
    if name.startswith("unet_cond"):
        model = randomize_(tiny_unet_cond(8 if name == "unet_cond" else (1, 2)), seed=6, std=0.02)
        inputs = dict(sample=randn(gen, 2, 4, 8, 8), timestep=torch.tensor([10, 500]),
                      encoder_hidden_states=randn(gen, 2, 5, 32))
    elif name == "unet2d":
        model = randomize_(tiny_unet2d(), seed=6, std=0.02)
        inputs = dict(sample=randn(gen, 2, 3, 8, 8), timestep=torch.tensor([10, 500]))
    elif name == "dit":
        model = randomize_(tiny_dit(), seed=6, std=0.02)
        inputs = dict(hidden_states=randn(gen, 2, 4, 8, 8), timestep=torch.tensor([10, 500]),
                      class_labels=torch.tensor([1, 7]))
    elif name == "pixart_mask":
        model = randomize_(tiny_pixart(), seed=6, std=0.02)
        mask = torch.ones(2, 5)
        mask[1, 3:] = 0
        inputs = dict(hidden_states=randn(gen, 2, 4, 8, 8), encoder_hidden_states=randn(gen, 2, 5, 16),
                      timestep=torch.tensor([10, 500]), added_cond_kwargs={"resolution": None, "aspect_ratio": None},
                      encoder_attention_mask=mask)
    else:
        raise KeyError(name)
    return model, inputs


def _install(model):
    if hasattr(model, "set_attn_processor"):
        model.set_attn_processor(PD.AttnProcessor())
    else:
        assert PD.install_attn_processor(model)
    assert processor_types(model) == {PD.AttnProcessor}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["unet_cond", "unet_cond_hd32", "unet2d", "dit", "pixart_mask"])
def test_model_matches_attn_processor2_0(backend, name):
    stock, inputs = _model_case(name)
    assert processor_types(stock) == {ap.AttnProcessor2_0}
    ours = copy.deepcopy(stock)
    _install(ours)
    out_ref = stock(**inputs).sample
    gout = torch.randn(out_ref.shape, generator=torch.Generator().manual_seed(7))
    g_ref = torch.autograd.grad(out_ref, list(stock.parameters()), gout, allow_unused=True)
    with backend_ctx(backend):
        out = ours(**inputs).sample
        g = torch.autograd.grad(out, list(ours.parameters()), gout, allow_unused=True)
    assert _assert_out_and_grads_match(stock, out, out_ref, g, g_ref) > 10


def _assert_out_and_grads_match(stock, out, out_ref, g, g_ref):
    """Output and every parameter gradient close to stock's; returns how many gradients were compared."""
    scale = out_ref.abs().max()
    torch.testing.assert_close(out, out_ref, rtol=1e-4, atol=1e-5 * max(1.0, scale.item()))
    n_checked = 0
    for (pname, _), a, b in zip(stock.named_parameters(), g, g_ref):
        if b is None:
            assert a is None, pname
            continue
        tol = 1e-4 * max(1.0, b.abs().max().item())
        torch.testing.assert_close(a, b, rtol=1e-3, atol=tol, msg=lambda m: f"grad {pname}: {m}")
        n_checked += 1
    return n_checked


@pytest.mark.parametrize("name, backend", FORCED_MODEL_CASES)
def test_model_on_forced_pygen_kernel(name, backend, monkeypatch):
    """Whole models (head dim 32) with attention forced onto a pygen kernel: every pygen.attention call
    launched its forward (the backward is that kernel's autograd), and the output and the parameter
    grads match stock AttnProcessor2_0."""
    stock, inputs = _model_case(name)
    ours = copy.deepcopy(stock)
    _install(ours)
    out_ref = stock(**inputs).sample
    gout = torch.randn(out_ref.shape, generator=torch.Generator().manual_seed(7))
    g_ref = torch.autograd.grad(out_ref, list(stock.parameters()), gout, allow_unused=True)
    with forced_kernel(backend, monkeypatch) as counts:
        out = ours(**inputs).sample
        g = torch.autograd.grad(out, list(ours.parameters()), gout, allow_unused=True)
    assert counts["attention"] > 0 and counts["launches"] == counts["attention"], counts
    assert counts["head_dims"] == {32}
    assert _assert_out_and_grads_match(stock, out, out_ref, g, g_ref) > 0


def test_install_on_a_model_with_fused_qkv_projections():
    """UNet2DConditionModel after fuse_qkv_projections() (FusedAttnProcessor2_0 everywhere):
    install_attn_processor replaces those processors too, and the output is the fused stock one."""
    stock, inputs = _model_case("unet_cond")
    stock.fuse_qkv_projections()
    assert processor_types(stock) == {ap.FusedAttnProcessor2_0}
    ours = copy.deepcopy(stock)
    originals = PD.install_attn_processor(ours)
    assert processor_types(ours) == {PD.AttnProcessor} and len(originals) > 0
    with torch.no_grad():
        ref = stock(**inputs).sample
        out = ours(**inputs).sample
    torch.testing.assert_close(out, ref, **FP32)


def test_unet_attention_head_dims_and_channels_last():
    """The 4-D attention of UNet2DModel on a channels-last model + input: same output as stock."""
    stock, inputs = _model_case("unet2d")
    ours = copy.deepcopy(stock)
    _install(ours)
    stock = stock.to(memory_format=torch.channels_last)
    ours = ours.to(memory_format=torch.channels_last)
    sample = inputs["sample"].contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = stock(sample, inputs["timestep"]).sample
        out = ours(sample, inputs["timestep"]).sample
    torch.testing.assert_close(out, ref, **FP32)


# ---------------------------------------------------------------------------
# patch / unpatch on a pipeline
# ---------------------------------------------------------------------------
class _Custom:
    """A non-default processor: patch must leave it alone."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        return ap.AttnProcessor2_0()(attn, hidden_states, encoder_hidden_states, attention_mask)


class Pipe(diffusers.DiffusionPipeline):
    def __init__(self, scheduler, unet=None, transformer=None):
        super().__init__()
        self.register_modules(scheduler=scheduler, unet=unet, transformer=transformer)


def test_patch_installs_and_unpatch_restores_processors():
    unet, dit = tiny_unet_cond(), tiny_dit()
    custom = _Custom()
    dit.transformer_blocks[1].attn1.set_processor(custom)
    originals_unet = {n: m.processor for n, m in unet.named_modules() if isinstance(m, ap.Attention)}
    originals_dit = {n: m.processor for n, m in dit.named_modules() if isinstance(m, ap.Attention)}
    stock_sched = diffusers.EulerDiscreteScheduler()
    pipe = Pipe(stock_sched, unet=unet, transformer=dit)
    assert PD.patch(pipe) is pipe
    assert isinstance(pipe.scheduler, PD.EulerDiscreteScheduler)
    assert processor_types(unet) == {PD.AttnProcessor}
    assert dit.transformer_blocks[1].attn1.processor is custom  # not AttnProcessor2_0: untouched
    assert processor_types(dit) == {PD.AttnProcessor, _Custom}
    PD.patch(pipe)  # idempotent: the originals stay the stock processors
    assert PD.unpatch(pipe) is pipe
    assert pipe.scheduler is stock_sched
    assert {n: m.processor for n, m in unet.named_modules() if isinstance(m, ap.Attention)} == originals_unet
    assert {n: m.processor for n, m in dit.named_modules() if isinstance(m, ap.Attention)} == originals_dit
    assert all(type(p) is ap.AttnProcessor2_0 for p in originals_unet.values())
    assert not hasattr(pipe, "_pygen_original_attn_processors")
    PD.unpatch(pipe)  # unpatching twice is harmless


def test_patch_attention_false_and_unknown_scheduler():
    unet = tiny_unet_cond()
    pipe = Pipe(diffusers.EulerDiscreteScheduler(), unet=unet)
    PD.patch(pipe, attention=False)
    assert processor_types(unet) == {ap.AttnProcessor2_0}
    PD.unpatch(pipe)
    other = Pipe(diffusers.PNDMScheduler(), unet=unet)
    with pytest.warns(UserWarning, match="no fused PNDMScheduler"):
        PD.patch(other)
    assert processor_types(unet) == {PD.AttnProcessor}  # processors installed all the same
    PD.unpatch(other)
    assert processor_types(unet) == {ap.AttnProcessor2_0}


def test_patched_pipeline_output_matches_stock():
    """A patched pipe's UNet call gives stock's output (same weights, same inputs). Head dim 4: the
    dispatcher's torch fallback (see the next test for the pygen kernels)."""
    stock, inputs = _model_case("unet_cond")
    pipe = Pipe(diffusers.DDIMScheduler(), unet=copy.deepcopy(stock))
    PD.patch(pipe)
    with torch.no_grad():
        torch.testing.assert_close(pipe.unet(**inputs).sample, stock(**inputs).sample, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_patched_pipeline_runs_pygen_kernel(backend, monkeypatch):
    """The patched pipe's UNet (head dim 32) with attention forced onto pygen kernel ``backend``: every
    attention layer launched the kernel, and the output matches the stock (AttnProcessor2_0) UNet."""
    stock, inputs = _model_case("unet_cond_hd32")
    assert processor_types(stock) == {ap.AttnProcessor2_0}
    pipe = Pipe(diffusers.DDIMScheduler(), unet=copy.deepcopy(stock))
    PD.patch(pipe)
    assert processor_types(pipe.unet) == {PD.AttnProcessor}
    n_layers = sum(isinstance(m, ap.Attention) for m in pipe.unet.modules())
    with torch.no_grad():
        want = stock(**inputs).sample
        with forced_kernel(backend, monkeypatch) as counts:
            got = pipe.unet(**inputs).sample
    assert counts["attention"] == counts["launches"] == n_layers > 0, (counts, n_layers)
    assert counts["head_dims"] == {32}
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_install_attn_processor_bad_input():
    with pytest.raises(TypeError, match="model"):
        PD.install_attn_processor(object())


# ---------------------------------------------------------------------------
# fp16 / bf16: whole models (CPU: the torch path; CUDA: the dispatcher's kernels)
# ---------------------------------------------------------------------------
def _cast_inputs(inputs, device, dtype):
    out = {}
    for k, v in inputs.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device, dtype) if v.is_floating_point() else v.to(device)
        out[k] = v
    return out


@pytest.mark.parametrize("device", [
    pytest.param("cpu", id="cpu-torch"),
    pytest.param("cuda", id="cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA device")]),
])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("name", ["unet_cond_hd32", "unet2d", "dit", "pixart_mask"])
def test_model_low_precision(name, dtype, device):
    """pygen's processor in fp16/bf16 vs the stock model in fp32 on the same rounded weights and inputs:
    its max error is at most twice the stock fp16/bf16 model's own (floor 2e-3 of the output scale)."""
    stock, inputs = _model_case(name)
    stock_low = stock.to(device, dtype)
    exact = copy.deepcopy(stock_low).float()
    ours = copy.deepcopy(stock_low)
    _install(ours)
    low_inputs = _cast_inputs(inputs, device, dtype)
    exact_inputs = _cast_inputs(low_inputs, device, torch.float32)
    with torch.no_grad():
        want = exact(**exact_inputs).sample
        stock_out = stock_low(**low_inputs).sample
        with pygen.use_backend("torch") if device == "cpu" else contextlib.nullcontext():
            out = ours(**low_inputs).sample
    assert out.dtype == dtype and out.shape == want.shape
    err = (out.float() - want).abs().max().item()
    stock_err = (stock_out.float() - want).abs().max().item()
    assert err <= max(2 * stock_err, 2e-3 * want.abs().max().item()), (err, stock_err)
