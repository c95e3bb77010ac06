"""Triton kernels of pygen, shipped as ``pygen.kernels``.

One file per op family (random, forward, step, langevin, schedule), each
holding the @triton.jit kernels and a plain launcher that takes contiguous
tensors and launches directly (no torch.library wrapper on the hot path).
Kernels import nothing from the pygen package above them.
On the CPU, the kernels run under TRITON_INTERPRET=1.
"""
