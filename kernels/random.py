"""Triton backend of ``pygen.randn`` (op ``pygen::randn_fill_``).

Grid: (groups of 4*BLOCK elements, noise rows). A noise row is the whole
tensor for an int seed, or one batch row for per-row seeds.
"""
import triton
import triton.language as tl

from pygen.kernels.philox import interleave4, philox_normals

BLOCK = 256  # Philox groups per program -> 1024 elements


@triton.jit(do_not_specialize=["seed", "stream"])
def _randn_fill_kernel(out_ptr, row_seeds_ptr, offset_ptr, seed, stream, row_len, PER_ROW: tl.constexpr,
                       HAS_OFFSET: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    if PER_ROW:
        seed = tl.load(row_seeds_ptr + row)
    if HAS_OFFSET:  # a device step counter added to the stream
        stream = stream + tl.load(offset_ptr)
    group = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    z0, z1, z2, z3 = philox_normals(seed, stream, group)
    z = interleave4(z0, z1, z2, z3)
    offs = pid.to(tl.int64) * (4 * BLOCK) + tl.arange(0, 4 * BLOCK)
    tl.store(out_ptr + row * row_len + offs, z.to(out_ptr.dtype.element_ty), mask=offs < row_len)


def randn_fill(out, seed, stream, row_seeds, stream_offset=None):
    """Fill contiguous ``out`` with pygen normals (see pygen.randn); the stream is ``stream + stream_offset[0]``
    when a device ``stream_offset`` is given."""
    numel = out.numel()
    if row_seeds is None:
        rows, row_len = 1, numel
    else:
        rows, row_len = out.shape[0], numel // out.shape[0]
    grid = (triton.cdiv(row_len, 4 * BLOCK), rows)
    _randn_fill_kernel[grid](out, row_seeds if row_seeds is not None else out,
                             stream_offset if stream_offset is not None else out, seed, stream, row_len,
                             PER_ROW=row_seeds is not None, HAS_OFFSET=stream_offset is not None, BLOCK=BLOCK)
    return out
