"""A deliberately wrong Triton jit function for tests/test_selfcheck.py: the contract's direction z scaled by
1.0001, standing in for a kernel miscompiled on some GPU. Imported only where Triton is installed."""

import triton
import triton.language as tl

from zo_optim.ops.triton import _rng


@triton.jit
def skewed_direction_block(i0, k0, k1, tensor_id, query, RADEMACHER: tl.constexpr, BLOCK: tl.constexpr):
    return _rng.direction_block(i0, k0, k1, tensor_id, query, RADEMACHER, BLOCK) * 1.0001
