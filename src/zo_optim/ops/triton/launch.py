"""Python launchers of the Triton kernels: tables, grouping, one launch per (device, dtype).

The public functions take exactly the keyword arguments of
:mod:`zo_optim.ops.reference` (minus ``compute_dtype``; ``offsets``, one per tensor, instead of
``offset``) and receive validated, contiguous tensors from :mod:`zo_optim.ops`.

Shards (``offsets``: the contract index of each tensor's element 0, FSDP2's ``Shard(0)``): a
shard's programs are the blocks of the unsharded tensor that overlap it, so every program still
generates z for one whole aligned block of contract indices (any offset, not only multiples of
the 4-element Philox group or of the block) and masks the elements outside the shard; the kernels
are compiled with ``SHARDED`` for such calls and read the offset from the slot table's last column.

Host-side tables. Each call splits its tensors by dtype (they share one device)
and launches one kernel per group over all of that group's tensors. A group is
described to the kernel by one int64 device buffer: the slot table (per tensor:
address, numel, tensor_id, state addresses; see :mod:`.kernels`) followed by the
block table (per program: ``slot << 32 | block index``). Building it costs a
Python loop over the blocks' slots, a host tensor and a host-to-device copy, so
the buffer is cached under everything it encodes (addresses, numels, tensor ids,
state addresses, clip values, block size): a step that reuses the same tensors
only builds that key. Because the key *is* the content, a hit is always correct;
re-allocated tensors (``model.to()``, a new state buffer) simply miss.

The cache holds :data:`TABLE_CACHE_ENTRIES` tables and at most
:data:`TABLE_CACHE_BYTES` of device memory, least recently used first out. A
step uses two keys per (param group, dtype) (perturb and update), so the entry
bound covers 64 of them; a miss builds the host table in pinned memory for a
CUDA target and copies it with ``non_blocking=True``, so it does not block the
host on the device queue either.
"""

from __future__ import annotations

import contextlib
import struct
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import triton.language as tl

from ... import rng
from .._checks import check_precond_rule
from . import kernels

Tensors = Sequence[torch.Tensor]

DEFAULT_BLOCK = 2048
"""Elements per program: 8 per thread at 8 warps (two Philox counters per thread).

Chosen from the sm_90 compile (no GPU to time it): at 4096 elements (16 per thread)
the fused update kernels need 110-200 registers per thread, i.e. one 256-thread
program per SM and no overlap of one program's loads with another's arithmetic;
at 2048 they need 60-80 (3-4 programs per SM) without spills. To be tuned on GPU."""

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
_LOW_PRECISION = (torch.bfloat16, torch.float16)
_block = DEFAULT_BLOCK


@contextlib.contextmanager
def block_size(block: int) -> Iterator[None]:
    """Temporarily run every kernel with ``block`` elements per program (tests use small blocks
    so that tiny tensors fill whole blocks and reach the unmasked path)."""
    global _block
    if block < 128 or block & (block - 1):
        raise ValueError(f"Invalid block size: {block} (a power of two >= 128)")
    previous, _block = _block, block
    try:
        yield
    finally:
        _block = previous


def _num_warps(block: int) -> int:
    # 8 elements (two Philox counters) per thread.
    return max(1, min(8, block // 256))


# ----------------------------------------------------------------------------- tables


@dataclass(frozen=True)
class Tables:
    """The device buffer of one (call signature, dtype group) and what the kernel needs to know about it."""

    slot_tab: torch.Tensor
    blk_tab: torch.Tensor
    n_blocks: int
    ncol: int
    aligned: bool
    host: torch.Tensor | None = None
    """The pinned host source of a non-blocking copy, kept alive with the device buffer."""

    @property
    def nbytes(self) -> int:
        return (self.slot_tab.numel() + self.blk_tab.numel()) * self.slot_tab.element_size()


TABLE_CACHE_ENTRIES = 128
TABLE_CACHE_BYTES = 256 << 20


class TableCache:
    """LRU cache of :class:`Tables` keyed by their full content, bounded in entries and device bytes."""

    def __init__(self, maxsize: int = TABLE_CACHE_ENTRIES, max_bytes: int = TABLE_CACHE_BYTES) -> None:
        self.maxsize = maxsize
        self.max_bytes = max_bytes
        self.hits = 0
        self.misses = 0
        self.nbytes = 0
        self._entries: OrderedDict[tuple, Tables] = OrderedDict()

    def clear(self) -> None:
        self._entries.clear()
        self.hits = self.misses = self.nbytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, device: torch.device, block: int, n_addr: int, rows: list[tuple[int, ...]],
            sharded: bool = False) -> Tables:
        """The tables of ``rows`` (columns: address, numel, tensor_id, then addresses up to
        column ``n_addr``, then other ints; with ``sharded``, last the offset of a shard), built on a miss."""
        key = (device, block, n_addr, sharded, tuple(rows))
        tables = self._entries.get(key)
        if tables is not None:
            self.hits += 1
            self._entries.move_to_end(key)
            return tables
        self.misses += 1
        tables = _build_tables(device, block, n_addr, rows, sharded)
        self._entries[key] = tables
        self.nbytes += tables.nbytes
        # The newest entry always stays (the caller is about to launch with it).
        while len(self._entries) > 1 and (len(self._entries) > self.maxsize or self.nbytes > self.max_bytes):
            _, evicted = self._entries.popitem(last=False)
            self.nbytes -= evicted.nbytes
        return tables


table_cache = TableCache()


def _first_last_block(numel: int, offset: int, block: int) -> tuple[int, int]:
    """The blocks of the unsharded tensor (aligned to ``block`` in contract indices) that overlap the
    elements [offset, offset + numel): the kernels generate z for whole aligned blocks and mask the rest."""
    if numel == 0:
        return 0, 0
    return offset // block, (offset + numel + block - 1) // block


def _build_tables(device: torch.device, block: int, n_addr: int, rows: list[tuple[int, ...]],
                  sharded: bool = False) -> Tables:
    ncol = len(rows[0])
    slot_tab = torch.tensor(rows, dtype=torch.int64).reshape(-1)
    blocks = [
        torch.arange(*_first_last_block(row[1], row[-1] if sharded else 0, block), dtype=torch.int64) + (slot << 32)
        for slot, row in enumerate(rows)
    ]
    blk_tab = torch.cat(blocks)
    host = torch.cat([slot_tab, blk_tab])
    pinned = None
    if device.type == "cuda":
        # Pinned source + non_blocking: the copy is queued on the stream instead of
        # waiting for the device to drain the work already queued.
        pinned = host.pin_memory()
        buf = pinned.to(device, non_blocking=True)
    else:
        buf = host.to(device)
    # 16-byte aligned addresses; a shard also needs its offset to be a multiple of 16 elements, so that the
    # address of a block's first element (offset − a multiple of the block) keeps the alignment
    aligned = all(r[0] % 16 == 0 and all(a % 16 == 0 for a in r[3:n_addr]) and (not sharded or r[-1] % 16 == 0)
                  for r in rows)
    return Tables(buf[: slot_tab.numel()], buf[slot_tab.numel():], blk_tab.numel(), ncol, aligned, pinned)


def _address(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _f32_bits(x: float) -> int:
    return struct.unpack("<I", struct.pack("<f", x))[0]


def _groups(params: Tensors) -> dict[torch.dtype, list[int]]:
    groups: dict[torch.dtype, list[int]] = {}
    for i, p in enumerate(params):
        if p.dtype not in _TL_DTYPES:
            raise TypeError(f"params[{i}] has dtype {p.dtype}: the triton backend runs float32/bfloat16/float16")
        groups.setdefault(p.dtype, []).append(i)
    return groups


def _i32(word: int, what: str = "seed word") -> int:
    """A uint32 word as the int32 with the same bits: every value gets the same kernel signature
    (Triton types Python ints >= 2**31 as int64 and would compile a second variant)."""
    if not 0 <= word <= rng.MASK32:
        raise ValueError(f"Invalid {what}: {word} (a Philox counter word, in [0, 2**32))")
    return word - (1 << 32) if word >> 31 else word


def _seed_words(seed: int) -> tuple[int, int]:
    """The Philox key (seed & 0xFFFFFFFF, seed >> 32) as int32 bit patterns."""
    seed &= rng.MASK64
    return _i32(seed & rng.MASK32), _i32(seed >> 32)


def _on_device(device: torch.device):
    # Triton launches on the current CUDA device; the tensors' device must be current.
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _launch(kernel, grid: tuple[int], *args, **constexprs) -> None:
    """Every kernel launch of this backend goes through here (tests count them)."""
    with _on_device(args[0].device):
        kernel[grid](*args, **constexprs)


def _for_each_group(params, tensor_ids, states: Sequence[Tensors | None], extra_cols=None, offsets=None):
    """Yield (dtype, Tables, block, sharded) per dtype group, skipping groups without elements.

    ``states``: per-param float32 buffers whose addresses fill columns 3..;
    ``extra_cols(i)``: more int columns for param i (HELENE's clip bits);
    ``offsets``: the contract index of each param's element 0 (shards of sharded tensors), the last column.
    """
    block = _block
    sharded = offsets is not None
    for dtype, idx in _groups(params).items():
        rows = []
        for i in idx:
            p = params[i]
            off = offsets[i] if sharded else 0
            if off < 0:
                raise ValueError(f"Invalid offsets[{i}]: {off} (an element index >= 0)")
            rng.check_numel(off + p.numel(), f"params[{i}]")
            row = (p.data_ptr(), p.numel(), tensor_ids[i], *(_address(None if s is None else s[i]) for s in states))
            if extra_cols is not None:
                row = row + extra_cols(i)
            if sharded:
                row = (*row, off)
            rows.append(row)
        if all(r[1] == 0 for r in rows):
            continue
        tables = table_cache.get(params[idx[0]].device, block, 3 + len(states), rows, sharded)
        yield dtype, tables, block, sharded


def _common(tables: Tables, dtype: torch.dtype, distribution: str, rounding: str, block: int, sharded: bool) -> dict:
    return dict(
        SHARDED=sharded,
        NCOL=tables.ncol,
        DTYPE=_TL_DTYPES[dtype],
        RADEMACHER=distribution == "rademacher",
        STOCHASTIC=rounding == "stochastic" and dtype in _LOW_PRECISION,
        ALIGNED=tables.aligned,
        BLOCK=block,
        num_warps=_num_warps(block),
        # Explicit: no mul+add contraction, so the kernels do the same float32
        # operations as the interpreter and the reference (Rademacher updates agree
        # bit for bit); also silences Triton 3.9's warning about the default changing.
        enable_fp_fusion=False,
    )


# ----------------------------------------------------------------------------- ops


def perturb_(
    params: Tensors,
    tensor_ids: Sequence[int],
    seed: int,
    scale: float,
    *,
    query: int = 0,
    distribution: str = "gaussian",
    precond: Tensors | None = None,
    rounding: str = "nearest",
    rounding_slot: int = 1,
    offsets: Sequence[int] | None = None,
) -> None:
    r"""In place :math:`\theta \leftarrow \theta + \text{scale}\cdot z_{\text{query}} \odot \text{precond}^{-1/2}`."""
    lo, hi = _seed_words(seed)
    qa, rs = _i32(query, "query"), _i32(rounding_slot, "rounding_slot")
    for dtype, t, block, sharded in _for_each_group(params, tensor_ids, [precond], offsets=offsets):
        _launch(
            kernels.perturb_kernel, (t.n_blocks,), t.slot_tab, t.blk_tab, lo, hi, float(scale), qa, rs,
            HAS_PRECOND=precond is not None, **_common(t, dtype, distribution, rounding, block, sharded),
        )


def sgd_update_(
    params: Tensors,
    tensor_ids: Sequence[int],
    seed: int,
    coeffs: torch.Tensor,
    *,
    lr: float,
    weight_decay: float = 0.0,
    momentum: float = 0.0,
    momentum_buffers: Tensors | None = None,
    restore_scale: float = 0.0,
    restore_query: int = 0,
    distribution: str = "gaussian",
    rounding: str = "nearest",
    rounding_slot: int = 0,
    offsets: Sequence[int] | None = None,
) -> None:
    """Fused restore + ZO-SGD (see :func:`zo_optim.ops.reference.sgd_update_`)."""
    lo, hi = _seed_words(seed)
    q = coeffs.numel()
    rq, rs = _i32(restore_query, "restore_query"), _i32(rounding_slot, "rounding_slot")
    for dtype, t, block, sharded in _for_each_group(params, tensor_ids, [momentum_buffers], offsets=offsets):
        _launch(
            kernels.sgd_kernel, (t.n_blocks,), t.slot_tab, t.blk_tab, lo, hi, coeffs, float(lr),
            float(weight_decay), float(momentum), float(restore_scale), rq, rs,
            HAS_WD=weight_decay != 0.0, HAS_MOMENTUM=momentum_buffers is not None,
            HAS_RESTORE=restore_scale != 0.0, NUM_Q=q, RESTORE_IN_Q=restore_query < q,
            **_common(t, dtype, distribution, rounding, block, sharded),
        )


def adamw_update_(
    params: Tensors,
    tensor_ids: Sequence[int],
    seed: int,
    coeffs: torch.Tensor,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: int,
    exp_avgs: Tensors,
    exp_avg_sqs: Tensors,
    restore_scale: float = 0.0,
    restore_query: int = 0,
    distribution: str = "gaussian",
    rounding: str = "nearest",
    rounding_slot: int = 0,
    offsets: Sequence[int] | None = None,
) -> None:
    """Fused restore + AdamW (see :func:`zo_optim.ops.reference.adamw_update_`)."""
    lo, hi = _seed_words(seed)
    q = coeffs.numel()
    rq, rs = _i32(restore_query, "restore_query"), _i32(rounding_slot, "rounding_slot")
    # Host scalars in float64 like the reference, rounded to float32 once as kernel arguments.
    step_size = lr / (1.0 - beta1**step)
    bias2_sqrt = (1.0 - beta2**step) ** 0.5
    for dtype, t, block, sharded in _for_each_group(params, tensor_ids, [exp_avgs, exp_avg_sqs], offsets=offsets):
        _launch(
            kernels.adamw_kernel, (t.n_blocks,), t.slot_tab, t.blk_tab, lo, hi, coeffs, 1.0 - lr * weight_decay,
            float(beta1), 1.0 - beta1, float(beta2), 1.0 - beta2, step_size, bias2_sqrt, float(eps),
            float(restore_scale), rq, rs,
            HAS_RESTORE=restore_scale != 0.0, NUM_Q=q, RESTORE_IN_Q=restore_query < q,
            **_common(t, dtype, distribution, rounding, block, sharded),
        )


def precond_sgd_update_(
    params: Tensors,
    tensor_ids: Sequence[int],
    seed: int,
    coeffs: torch.Tensor,
    *,
    lr: float,
    precond: Tensors,
    rule: str,
    update_precond: bool,
    precond_decay: float,
    precond_rate: float,
    precond_coeffs: torch.Tensor | None = None,
    hessian_eps: float = 0.0,
    precond_min: float = 0.0,
    weight_decay: float = 0.0,
    restore_scale: float = 0.0,
    restore_query: int = 0,
    distribution: str = "gaussian",
    rounding: str = "nearest",
    rounding_slot: int = 0,
    offsets: Sequence[int] | None = None,
) -> None:
    """Fused restore + preconditioned SGD + preconditioner update (HiZOO Σ, HiSo K)."""
    check_precond_rule(rule, update_precond, precond_coeffs)
    hizoo = rule == "hizoo"
    lo, hi = _seed_words(seed)
    q = coeffs.numel()
    rq, rs = _i32(restore_query, "restore_query"), _i32(rounding_slot, "rounding_slot")
    for dtype, t, block, sharded in _for_each_group(params, tensor_ids, [precond], offsets=offsets):
        _launch(
            kernels.precond_kernel, (t.n_blocks,), t.slot_tab, t.blk_tab, lo, hi, coeffs,
            coeffs if precond_coeffs is None else precond_coeffs, float(lr), float(weight_decay),
            float(precond_decay), float(precond_rate), float(hessian_eps), float(precond_min), float(restore_scale),
            rq, rs,
            HAS_WD=weight_decay != 0.0, UPDATE=bool(update_precond), HIZOO=hizoo,
            HAS_RESTORE=restore_scale != 0.0, NUM_Q=q, RESTORE_IN_Q=restore_query < q,
            **_common(t, dtype, distribution, rounding, block, sharded),
        )


def helene_update_(
    params: Tensors,
    tensor_ids: Sequence[int],
    seed: int,
    coeffs: torch.Tensor,
    *,
    lr: float,
    alpha: float,
    beta1: float,
    beta2: float,
    gamma: float,
    eps: float,
    clip: Sequence[float],
    exp_avgs: Tensors,
    hessians: Tensors,
    update_hessian: bool,
    hessian_coeffs: torch.Tensor | None = None,
    weight_decay: float = 0.0,
    restore_scale: float = 0.0,
    restore_query: int = 0,
    distribution: str = "gaussian",
    rounding: str = "nearest",
    rounding_slot: int = 0,
    offsets: Sequence[int] | None = None,
) -> None:
    """Fused restore + HELENE (see :func:`zo_optim.ops.reference.helene_update_`)."""
    lo, hi = _seed_words(seed)
    q = coeffs.numel()
    rq, rs = _i32(restore_query, "restore_query"), _i32(rounding_slot, "rounding_slot")
    clip_bits = [_f32_bits(float(c)) for c in clip]
    for dtype, t, block, sharded in _for_each_group(params, tensor_ids, [exp_avgs, hessians], lambda i: (clip_bits[i],),
                                                      offsets):
        _launch(
            kernels.helene_kernel, (t.n_blocks,), t.slot_tab, t.blk_tab, lo, hi, coeffs,
            coeffs if hessian_coeffs is None else hessian_coeffs, float(lr), 1.0 - lr * weight_decay,
            float(alpha), float(beta1), float(beta2), 1.0 - beta2, float(gamma), float(eps), float(restore_scale),
            rq, rs,
            UPDATE=bool(update_hessian), GNB=hessian_coeffs is not None,
            HAS_RESTORE=restore_scale != 0.0, NUM_Q=q, RESTORE_IN_Q=restore_query < q,
            **_common(t, dtype, distribution, rounding, block, sharded),
        )
