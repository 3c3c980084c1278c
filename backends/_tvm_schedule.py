"""Rule-based CPU schedules for the TVM ``llvm`` target: usable kernels before any tuning.

TVM's default Relax pipeline leaves CPU kernels as the naive loop nests that ``LegalizeOps``
writes: one thread, scalar code. Its dlight CPU rules cover only GEMV and row reductions
(softmax, layer norm). This module adds the two rules that matter for CNNs and transformers,
in dlight's ``ScheduleRule`` form so they run inside ``ApplyDefaultSchedule``:

- ``Contraction``: a block that reduces (conv, matmul, pooling) with injective prologue and
  epilogue blocks. Its output is tiled into a register block (``rows x width``), the reduction
  loops go between the parallel outer tiles and that block, and the fused epilogue (bias, BN,
  ReLU, residual add) is computed per tile while it is still in cache.
- ``Injective``: every other spatial block is fused, split into a parallel outer loop and a
  vectorized inner one.

A rule that does not fit a kernel returns None and the next one tries; a kernel no rule fits
keeps TVM's naive (correct) loop nest.

Imported only by ``backends/tvm.py`` after TVM itself is known to be importable.
"""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.base import try_inline
from tvm.s_tir.dlight.cpu.base import CPUScheduleRule
from tvm.target import Target
from tvm.target.codegen import llvm_cpu_has_features, llvm_get_vector_width

# Work (loop iterations) below which a kernel stays on one thread: the thread pool's
# fork/join costs a few microseconds, more than a small kernel takes.
PARALLEL_MIN_WORK = 1 << 14
# Reductions this short (depthwise 3x3: 9, a 3-channel stem: 27) are memory bound: reading the
# padded input through a condition beats copying it first. Longer ones are compute bound and the
# condition in the inner loop costs more (ResNet's 3x3 convs: 2.3x slower inlined).
INLINE_PAD_MAX_REDUCTION = 32


def accumulator_registers(target: Target) -> int:
    """Vector registers for the contraction tile's accumulators: half the register file (AVX-512
    has 32, AVX2 16); the rest hold the broadcast inputs and the loaded weights."""
    return 16 if vector_bits(target) >= 512 else 12


def vector_bits(target: Target) -> int:
    """SIMD width in bits. LLVM's own query reports 512 for any x86 CPU, so ask for features."""
    try:
        if llvm_cpu_has_features(["avx512f"], target):
            return 512
        if llvm_cpu_has_features(["avx"], target):
            return 256
    except Exception:  # noqa: BLE001 - a triple this LLVM cannot query
        pass
    width = llvm_get_vector_width(target)
    return width if 0 < width <= 256 else 128


def vector_lanes(target: Target, bits: int = 32) -> int:
    return max(vector_bits(target) // bits, 2)


def _extent(sch: s_tir.Schedule, loop) -> int | None:
    ext = sch.get(loop).extent
    return int(ext) if isinstance(ext, tirx.IntImm) else None


def _largest_divisor(n: int, limit: int) -> int:
    for d in range(min(n, limit), 0, -1):
        if n % d == 0:
            return d
    return 1


def vector_tile(extent: int, lanes: int) -> int:
    """Width of the register tile along the contiguous axis: whole vectors when the extent
    allows (a predicated vector tail costs more than narrower vectors), else the widest divisor
    that is a multiple of 4, else the widest divisor. Measured on a 128x256x1000 matmul (Zen 5):
    width 8 (divides 1000) 0.84 ms, 16 with a predicated tail 1.5 ms, 20: 4 ms, 25: 6.2 ms,
    32 with a predicated tail 12 ms."""
    for width in (2 * lanes, lanes):
        if extent % width == 0:
            return width
    divisors = [d for d in range(min(extent, 2 * lanes), 0, -1) if extent % d == 0]
    for multiple in (max(lanes // 2, 4), 4):  # half vectors, then quarter ones
        for d in divisors:
            if d % multiple == 0:
                return d
    return divisors[0]


def _strided_innermost(sch: s_tir.Schedule, block) -> bool:
    """Whether the innermost iterator also indexes a non-last dimension of some input."""
    from tvm.s_tir.dlight.analysis.common_analysis import collect_vars_used_in_prim_expr

    stmt = sch.get(block)
    innermost = stmt.iter_vars[-1].var
    for region in stmt.reads:
        for dim in list(region.region)[:-1]:
            if any(v.same_as(innermost) for v in collect_vars_used_in_prim_expr(dim.min)):
                return True
    return False


def _has_if_then_else(block) -> bool:
    import tvm_ffi

    return bool(tvm_ffi.get_global_func("s_tir.schedule.HasIfThenElse")(block))


def _write_dtype_bits(sch: s_tir.Schedule, block) -> int:
    writes = sch.get(block).writes
    return writes[0].source.dtype.bits if writes else 32


def _parallelize_vectorize(sch: s_tir.Schedule, block, lanes: int) -> None:
    """Fuse the spatial loops of a block that has only spatial loops (or spatial then
    reduction ones), split off a vector inner loop and run the outer part in parallel."""
    loops = sch.get_loops(block)
    iter_kinds = [iv.iter_type for iv in sch.get(block).iter_vars]
    if len(loops) != len(iter_kinds) or not loops:
        return
    n_spatial = 0
    for kind in iter_kinds:
        if kind != tirx.IterVar.DataPar:
            break
        n_spatial += 1
    if n_spatial == 0:
        return
    spatial = loops[:n_spatial]
    extents = [_extent(sch, lp) for lp in loops]
    if any(e is None for e in extents):
        return
    work = 1
    for e in extents:
        work *= e
    if n_spatial == len(loops) and len(loops) >= 2 and _strided_innermost(sch, block):
        # A transpose: TVM's vectorizer would gather every lane; LLVM's loop vectorizer turns
        # the same scalar loops into shuffles (NCHW->NHWC of 3x224x224: 0.33 ms -> 0.007 ms).
        outer = sch.fuse(*loops[:-2]) if len(loops) > 2 else loops[0]
        if work >= PARALLEL_MIN_WORK and _extent(sch, outer) > 1:
            sch.parallel(outer)
        return
    fused = sch.fuse(*spatial) if len(spatial) > 1 else spatial[0]
    total = _extent(sch, fused)
    vec = None
    if n_spatial == len(loops):  # purely spatial: vectorize the fused inner part
        width = _largest_divisor(total, lanes)
        if width >= 4 or width == total:
            fused, vec = sch.split(fused, factors=[None, width])
    if work >= PARALLEL_MIN_WORK and _extent(sch, fused) > 1:
        sch.parallel(fused)
    if vec is not None:
        sch.vectorize(vec)


class Contraction(CPUScheduleRule):
    """One reduction block (conv2d, matmul, batch matmul, pooling) plus injective blocks."""

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool):
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        try:
            return self._schedule(func, target)
        except Exception:  # noqa: BLE001 - a loop nest this rule does not fit: the next rule tries
            return None

    def _schedule(self, func: tirx.PrimFunc, target: Target):
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if not infos:
            return None
        reductions = [b for b in infos if not b.is_injective()]
        if len(reductions) != 1:
            return None
        main = reductions[0]
        kinds = main.dom_kind()
        if set(kinds) - {"S", "R"} or "S" not in kinds or "R" not in kinds:
            return None
        if any(not isinstance(d, int) for d in main.dom()):
            return None
        index = infos.index(main)
        prologue, epilogue = infos[:index], infos[index + 1:]
        s_iters = [it for it in main.iters if it.kind == "S"]
        r_iters = [it for it in main.iters if it.kind == "R"]

        lanes = vector_lanes(target, _write_dtype_bits(sch, main.block_rv))
        # The vector axis: the spatial iter that indexes the output's last (contiguous) dim.
        out_region = sch.get(main.block_rv).writes[0].region
        last_index = out_region[-1].min if out_region else None
        vec_pos = len(s_iters) - 1
        for i, it in enumerate(s_iters):
            if last_index is not None and last_index.same_as(it.var):
                vec_pos = i
        vec_iter = s_iters[vec_pos]
        width = vector_tile(vec_iter.dom, lanes)
        row_candidates = [i for i in range(len(s_iters)) if i != vec_pos]
        row_pos = row_candidates[-1] if row_candidates else None
        vectors_per_row = -(-width // lanes)
        rows = 1
        if row_pos is not None:
            rows = _largest_divisor(s_iters[row_pos].dom, max(1, accumulator_registers(target) // vectors_per_row))

        # Split the spatial loops: outer tiles, then reductions, then the register block.
        outer, inner = [], []
        for i, it in enumerate(s_iters):
            factor = width if i == vec_pos else rows if i == row_pos else 1
            if factor > 1 and factor < it.dom:
                o, n = sch.split(it.loop_rv, factors=[None, factor])
                outer.append(o)
                inner.append((i, n))
            elif factor > 1:
                inner.append((i, it.loop_rv))
            else:
                outer.append(it.loop_rv)
        inner.sort(key=lambda pair: 0 if pair[0] == row_pos else 1)
        inner_loops = [lp for _, lp in inner]
        sch.reorder(*outer, *[it.loop_rv for it in r_iters], *inner_loops)

        work = 1
        for d in main.dom():
            work *= d
        fused = sch.fuse(*outer) if len(outer) > 1 else outer[0] if outer else None
        if fused is not None and work >= PARALLEL_MIN_WORK and _extent(sch, fused) > 1:
            sch.parallel(fused)

        # Accumulate the register block in a local buffer: LLVM keeps it in registers.
        local = sch.cache_write(main.block_rv, 0, "local")
        if fused is not None:
            sch.reverse_compute_at(local, fused, preserve_unit_loops=True)
        if vec_iter.dom > 1 and inner_loops:
            sch.vectorize(inner_loops[-1])
        if len(inner_loops) == 2:
            sch.unroll(inner_loops[0])
        init = sch.decompose_reduction(main.block_rv, r_iters[0].loop_rv)
        init_loops = sch.get_loops(init)
        sch.vectorize(init_loops[-1])
        self._vectorize_tail(sch, local, lanes)

        # Epilogue: fold the elementwise chain into one block, computed per output tile.
        remaining = try_inline(sch, list(epilogue))
        for info in remaining:
            done = False
            if fused is not None and len(remaining) == 1:
                try:
                    sch.reverse_compute_inline(local)
                    local = None
                except Exception:  # noqa: BLE001 - not inlinable: keep the copy block
                    pass
                try:
                    sch.reverse_compute_at(info.block_rv, fused, preserve_unit_loops=True)
                    self._vectorize_tail(sch, info.block_rv, lanes)
                    done = True
                except Exception:  # noqa: BLE001 - layout change: schedule it on its own
                    done = False
            if not done:
                _parallelize_vectorize(sch, info.block_rv, lanes)
        reduction = 1
        for it in r_iters:
            reduction *= it.dom
        for info in reversed(prologue):
            conditional = _has_if_then_else(sch.get(info.block_rv))
            if not conditional or reduction <= INLINE_PAD_MAX_REDUCTION:  # a plain copy always goes
                try:
                    sch.compute_inline(info.block_rv)
                    continue
                except Exception:  # noqa: BLE001
                    pass
            _parallelize_vectorize(sch, info.block_rv, lanes)
        return sch

    @staticmethod
    def _vectorize_tail(sch: s_tir.Schedule, block, lanes: int) -> None:
        if block is None:
            return
        loops = sch.get_loops(block)
        if not loops:
            return
        ext = _extent(sch, loops[-1])
        if ext is not None and 1 < ext <= 4 * lanes:
            sch.vectorize(loops[-1])


class Injective(CPUScheduleRule):
    """Everything else: inline what inlines, then parallel outer / vectorized inner loops."""

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool):
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if infos is None:
            return None
        infos = try_inline(sch, infos)
        for info in infos:
            if any(not isinstance(d, int) for d in info.dom()):
                continue
            lanes = vector_lanes(target, _write_dtype_bits(sch, info.block_rv))
            try:
                _parallelize_vectorize(sch, info.block_rv, lanes)
            except Exception:  # noqa: BLE001 - an odd loop nest stays as it is
                continue
        return sch
