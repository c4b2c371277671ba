"""
AbsTopK as one Triton kernel per site, for GPUs: sparse_gpt.GPT(abstopk_by="triton"), the gpu preset's.

Each program holds a few whole rows in registers, finds each row's k-th largest |x| one bit at a time
(the radix select of sparse_gpt.abstopk_radix, so the same entries are kept, ties to the lowest index),
and writes the kept entries and a 0/1 mask that the backward pass reuses. Inductor's code for the same
select keeps rows on chip only up to 1024 wide and reads them again at every bit; this kernel reads
each site once. On an H200 it took the gpu preset's step from 1.74x to 1.44x a dense step (README,
Performance). Triton comes with CUDA builds of torch, not with CPU ones: sparse_gpt imports this file
only when a model asks for it. On a CPU, TRITON_INTERPRET=1 runs the kernel in Triton's interpreter
(slowly; how the tests check it).
"""

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton


@triton.jit
def abstopk_rows(x_ptr, y_ptr, keep_ptr, n_rows, n_cols, x_row_stride, k,
                 ROWS: tl.constexpr, BLOCK: tl.constexpr, BITS: tl.constexpr):
    # int64: a site of 2**31 entries or more would wrap 32-bit offsets (rows * stride)
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)[:, None]
    cols = tl.arange(0, BLOCK)[None, :]
    inside = (rows < n_rows) & (cols < n_cols)
    x = tl.load(x_ptr + rows * x_row_stride + cols, mask=inside, other=0)
    # |x| as integers of its width, which order as the values (sparse_gpt.abs_bits). The padding past a
    # row's end reads as 0: never above a kth, and last among any ties at 0
    if BITS == 16:
        bits = (x.to(tl.int16, bitcast=True) & 0x7FFF).to(tl.int32)
    else:
        bits = x.to(tl.int32, bitcast=True) & 0x7FFFFFFF
    # from the bit below the sign bit down: the largest kth with count(bits >= kth) >= k
    kth = tl.zeros([ROWS, 1], dtype=tl.int32)
    for bit in tl.static_range(BITS - 2, -1, -1):
        candidate = kth | (1 << bit)
        count = tl.sum((bits >= candidate).to(tl.int32), axis=1)[:, None]
        kth = tl.where(count >= k, candidate, kth)
    above = bits > kth
    tied = bits == kth
    missing = k - tl.sum(above.to(tl.int32), axis=1)[:, None]        # of the ties, the first ones
    keep = above | (tied & (tl.cumsum(tied.to(tl.int32), axis=1) <= missing))
    tl.store(y_ptr + rows * n_cols + cols, tl.where(keep, x, 0), mask=inside)
    tl.store(keep_ptr + rows * n_cols + cols, keep, mask=inside)


@triton_op("sparse_circuits::abstopk", mutates_args=())
def abstopk_and_mask(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x with all but the k largest |x| of each row zeroed, the bool mask of those kept)."""
    n = x.shape[-1]
    rows = x.reshape(-1, n)                  # a view where it can be (q, k, v: slices of one matmul's output)
    if rows.stride(1) != 1:
        rows = rows.contiguous()
    y = torch.empty(rows.shape, dtype=x.dtype, device=x.device)
    keep = torch.empty(rows.shape, dtype=torch.bool, device=x.device)
    block = triton.next_power_of_2(n)
    # launch shape: the fastest of those tried per site on an H200 (1 row of 2048 or 2 of 512 on 2 warps,
    # 0.42-0.65x inductor's select); wider rows get more warps so that each thread holds about 32 entries
    per_program, warps = max(1, 1024 // block), min(16, max(2, block // 1024))
    wrap_triton(abstopk_rows)[(triton.cdiv(rows.shape[0], per_program),)](
        rows, y, keep, rows.shape[0], n, rows.stride(0), k,
        ROWS=per_program, BLOCK=block, BITS=8 * x.element_size(), num_warps=warps)
    return y.view(x.shape), keep.view(x.shape)


def save_mask(ctx, inputs, output):
    ctx.save_for_backward(output[1])


def backward(ctx, grad_y, grad_keep):
    keep, = ctx.saved_tensors
    return torch.where(keep, grad_y, 0), None     # the gradient flows only through the kept entries


abstopk_and_mask.register_autograd(backward, setup_context=save_mask)


def abstopk(x, k):
    """sparse_gpt.abstopk's contract (fp32, bf16 or fp16; 0 < k <= width), by the kernel above."""
    if not x.is_floating_point() or x.element_size() not in (2, 4) or not 0 < k <= x.shape[-1]:
        raise ValueError(f"the Triton AbsTopK takes 16- and 32-bit floats and 0 < k <= width, not {x.dtype}, k={k}")
    return abstopk_and_mask(x, k)[0]
