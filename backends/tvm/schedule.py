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
keeps TVM's naive (correct) loop nest. ``Reduction`` and ``GEMV`` are dlight's CPU rules with
two fixes (symbolic rows; an assertion that stopped the compile).

Symbolic extents (dims kept symbolic, e.g. batch and sequence length): a symbolic axis of the
register tile is padded to a multiple of the tile (``pad_einsum``), other symbolic loops join
the parallel loop, vector loops come from static extents only, and ``serial_when_small`` gives
each such kernel a run-time choice between its parallel loop nest and a serial copy.

Imported only by the TVM targets (backends/tvm/) after TVM itself is known to be importable.
"""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir.dlight import cpu as dl_cpu
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.base import try_inline
from tvm.s_tir.dlight.cpu.base import CPUScheduleRule
from tvm.target import Target
from tvm.target.codegen import llvm_cpu_has_features, llvm_get_vector_width

# Work (loop iterations) below which a kernel stays on one thread: the thread pool's
# fork/join costs a few microseconds, more than a small kernel takes.
PARALLEL_MIN_WORK = 1 << 14
# Reductions this short (depthwise 3x3: 9) are memory bound: reading the padded input through a
# condition beats copying it first (MobileNet's 112x112x16 depthwise: 54 us, 66 us copied).
# Longer ones are compute bound and the condition in the inner loop costs more (ResNet's 3x3
# convs: 2.3x slower inlined; MobileNet's 3-channel 3x3 stem, 27: 127 us inlined, 96 us copied).
INLINE_PAD_MAX_REDUCTION = 16
# Reduction loops this short (a 3x3 window), inside the outermost one, are unrolled: MobileNet's
# depthwise convs 59 -> 40 us and 56 -> 42 us, ResNet's max pool 15 -> 12 us. Unrolling a
# 7x7 window too made ResNet's stem slower (287 -> 388 us).
UNROLL_WINDOW_MAX = 3
# A symbolic extent (a dimension known only at run time: batch, sequence length) counts as this
# many iterations when a rule weighs the work of a kernel against the thread pool's fork/join.
SYMBOLIC_EXTENT_GUESS = 64


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


def _static(value) -> int | None:
    """The value of a constant extent; None for a symbolic one."""
    if isinstance(value, int):
        return value
    return int(value) if isinstance(value, tirx.IntImm) else None


def _extent(sch: s_tir.Schedule, loop) -> int | None:
    return _static(sch.get(loop).extent)


def _work(extents) -> int:
    """Iterations of a loop nest, a symbolic extent counting SYMBOLIC_EXTENT_GUESS."""
    work = 1
    for extent in extents:
        work *= SYMBOLIC_EXTENT_GUESS if extent is None else extent
    return work


def _product(extents):
    """The iterations of a loop nest as an expression (an int when every extent is static)."""
    work = 1
    for extent in extents:
        static = _static(extent)
        work = work * (static if static is not None else extent)
    return work


def _serial_copy(stmt):
    """``stmt`` with its parallel loops made serial, and fresh loop and block variables (the copy
    sits beside the original in the function, and a variable may be defined only once)."""
    import tvm_ffi

    defined = []
    tvm_ffi.structural_walk(stmt, [(tirx.For, lambda loop: defined.append(loop.loop_var)),
                                   (s_tir.SBlock, lambda block: defined.extend(iv.var for iv in block.iter_vars))])
    fresh = {var: tirx.Var(f"{var.name}_serial", var.ty) for var in defined}

    def serial(loop, mutator):
        kind = tirx.ForKind.SERIAL if loop.kind == tirx.ForKind.PARALLEL else loop.kind
        return tirx.For(mutator.mutate(loop.loop_var), mutator.mutate(loop.min), mutator.mutate(loop.extent), kind,
                        mutator.mutate(loop.body), loop.thread_binding, loop.annotations)

    return tvm_ffi.structural_mutate(stmt, [(tirx.For, serial), (tirx.Var, lambda var, _: fresh.get(var, var))])


def _has_parallel(stmt) -> bool:
    import tvm_ffi

    found = []
    tvm_ffi.structural_walk(stmt, (tirx.For, lambda loop: found.append(loop.kind == tirx.ForKind.PARALLEL)))
    return any(found)


def serial_when_small(sch: s_tir.Schedule, works: list) -> s_tir.Schedule:
    """A kernel with symbolic extents decides between its parallel and serial loop nests at run
    time: ``if max(works) >= PARALLEL_MIN_WORK`` the scheduled nest, else the same with every
    parallel loop serial. The thread pool's fork/join costs more than a small kernel (an MLP
    layer at batch 1: 9 us parallel, 0.4 us serial), and the same library serves batch 1 and
    batch 1000. Static kernels are returned as they are (the rules decided at compile time)."""
    symbolic = [w for w in works if _static(w) is None]
    func = sch.mod["main"]
    if not symbolic or not _has_parallel(func.body):
        return sch
    work = symbolic[0]
    for other in works:
        if other is not symbolic[0]:
            work = tirx.max(work, other)
    realize = func.body
    root = realize.block
    body = tirx.IfThenElse(work >= PARALLEL_MIN_WORK, root.body, _serial_copy(root.body))
    branched = s_tir.SBlock(root.iter_vars, root.reads, root.writes, root.name_hint, body, root.init,
                            root.alloc_buffers, root.match_buffers, root.annotations)
    return s_tir.Schedule(func.with_body(s_tir.SBlockRealize(realize.iter_values, realize.predicate, branched)))


def epilogue_per_tile(sch: s_tir.Schedule, remaining: list, local, loop, lanes: int):
    """Schedule a contraction's epilogue blocks (what ``try_inline`` left): a single one folds
    the accumulator copy ``local`` into itself and is computed per output tile inside ``loop``,
    while it is in cache; several, or one that changes the layout, get their own parallel
    vectorized loops. Returns ``local``, or None once folded."""
    for info in remaining:
        if loop is not None and len(remaining) == 1:
            if _try(sch.reverse_compute_inline, local):
                local = None

            def per_tile(block=info.block_rv):
                sch.reverse_compute_at(block, loop, preserve_unit_loops=True)
                Contraction._vectorize_tail(sch, block, lanes)

            if _try(per_tile):
                continue
        _parallelize_vectorize(sch, info.block_rv, lanes)
    return local


def _try(primitive, *args) -> bool:
    """Apply a schedule primitive; False (the schedule unchanged) where it does not apply."""
    try:
        primitive(*args)
    except Exception:  # noqa: BLE001 - TVM raises its own errors for a primitive that does not fit
        return False
    return True


def _lane_dependent_pad(block) -> bool:
    """Whether a pad block (``out = if_then_else(cond, in, 0)``) tests its innermost index: the
    padded edge runs along its rows rather than across them."""
    from tvm.s_tir.dlight.analysis.common_analysis import collect_vars_used_in_prim_expr

    value = getattr(block.body, "value", None)
    if not block.iter_vars or getattr(getattr(value, "op", None), "name", "") not in ("tirx.if_then_else", "prim.if_then_else"):
        return False
    innermost = block.iter_vars[-1].var
    return any(v.same_as(innermost) for v in collect_vars_used_in_prim_expr(value.args[0]))


def _largest_divisor(n: int, limit: int) -> int:
    for d in range(min(n, limit), 0, -1):
        if n % d == 0:
            return d
    return 1


def vector_tile(extent: int, lanes: int) -> int:
    """Width of the register tile along the contiguous axis: whole vectors when the extent
    allows (a predicated vector tail costs more than narrower vectors), else the widest power
    of two from 4 up that divides it, else the widest divisor. LLVM splits an odd-sized vector
    (24 floats: 16 + 8 lanes) badly. Measured on a 128x256x1000 matmul (Zen 5): width 8
    (divides 1000) 0.84 ms, 16 with a predicated tail 1.5 ms, 20: 4 ms, 25: 6.2 ms, 32 with a
    predicated tail 12 ms; MobileNet's 1x1 convs to 24 channels (Zen 4): width 24 109 and
    161 us, width 8 17 and 22 us."""
    for width in (2 * lanes, lanes):
        if extent % width == 0:
            return width
    divisors = [d for d in range(min(extent, 2 * lanes), 0, -1) if extent % d == 0]
    for d in divisors:
        if d >= 4 and d & (d - 1) == 0:  # a power of two: whole narrower vectors (ymm, xmm)
            return d
    return divisors[0]


def padded_vector_tile(extent: int, lanes: int) -> int:
    """``vector_tile``, unless the extent has no divisor of 4 or more (odd: ViT's 197 tokens, a
    width of 1: scalar code): then whole vectors, the extent padded to a multiple of them
    (``pad_einsum``: zero columns in, the extra ones dropped): two vectors where the extent
    spans at least four, since a one-vector tile loads an input for every multiply-add (its 16
    rows each broadcast one), while two vectors share each broadcast; one vector otherwise."""
    width = vector_tile(extent, lanes)
    if width >= 4 or extent <= lanes:
        return width
    return 2 * lanes if extent >= 4 * lanes else lanes


def padded_rows(extent: int, most: int) -> int:
    """Rows of the register tile: the largest divisor of ``extent`` up to ``most``, unless that
    leaves the tile under half full (197 rows: 1 of 8), then ``most`` with the extent padded."""
    rows = _largest_divisor(extent, most)
    return most if 2 * rows < most and extent > most else rows


def dot_register_tile(rows_extent: int | None, vector_extent: int, accumulators: int, max_vectors: int = 4
                      ) -> tuple[int, int]:
    """``(rows, vectors)`` of a dot-product kernel's register tile (int8 ``vpdpbusd``, bf16
    ``vdpbf16ps``): ``vectors`` divides the output's channel vectors, ``rows`` the row extent,
    ``rows * vectors`` accumulators at most. Each step of the reduction loads ``vectors`` weight
    vectors and broadcasts ``rows`` inputs for ``rows * vectors`` dot products, so the tile with
    the most products per load wins (the larger tile on a tie). A 7-wide map: 7 x 2 (14 products
    for 9 loads), not 1 x 4 (4 for 5) as the widest channel block alone would give."""
    best = (0.0, 0, 1, 1)
    for vectors in range(min(max_vectors, vector_extent), 0, -1):
        if vector_extent % vectors:
            continue
        rows = _largest_divisor(rows_extent, max(1, accumulators // vectors)) if rows_extent else 1
        best = max(best, (rows * vectors / (rows + vectors), rows * vectors, rows, vectors))
    return best[2], best[3]


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


def _guarded_by(sch: s_tir.Schedule, block, loop) -> bool:
    """Whether the block runs under a predicate on ``loop`` (the clipped edge of a padded
    symbolic extent): TVM's vectorizer would turn such a loop back into scalar code, with the
    index arithmetic of every lane; LLVM does better with the plain loop."""
    from tvm.s_tir.dlight.analysis.common_analysis import collect_vars_used_in_prim_expr, get_sblockrealize

    predicate = get_sblockrealize(sch, block).predicate
    var = sch.get(loop).loop_var
    return any(v.same_as(var) for v in collect_vars_used_in_prim_expr(predicate))


def _write_dtype_bits(sch: s_tir.Schedule, block) -> int:
    writes = sch.get(block).writes
    return writes[0].source.dtype.bits if writes else 32


def _parallelize_vectorize(sch: s_tir.Schedule, block, lanes: int) -> None:
    """Fuse the spatial loops of a block that has only spatial loops (or spatial then
    reduction ones), split off a vector inner loop and run the outer part in parallel.

    Symbolic extents: the vector loop comes from the trailing loops of constant extent only (a
    vector split of a symbolic loop needs a guard on every lane, which TVM's vectorizer turns
    back into scalar code); a symbolic innermost loop is left to LLVM's loop vectorizer, which
    handles run-time trip counts with a scalar epilogue."""
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
    work = _work(extents)
    if n_spatial == len(loops) and len(loops) >= 2:
        transpose = _strided_innermost(sch, block)
        pad = not transpose and None not in extents and _has_if_then_else(sch.get(block))
        if transpose or pad:
            # Whole rows per parallel iteration; the last loops stay plain loops for LLVM, whose
            # loop vectorizer turns a transpose's scalar loops into shuffles where TVM's would
            # gather every lane (NCHW->NHWC of 3x224x224: 0.33 ms -> 0.007 ms). A pad (a copy
            # under a condition on its indices) has its row in vectors when they fit it exactly;
            # a vector split of the fused loops would straddle rows and gather each lane (NCHW
            # 3x224x224 padded by 3: 443 us; by rows: 8 us; NHWC 56x56x16 padded by 1: 4.6 -> 2.7 us).
            outer = sch.fuse(*loops[:-2]) if len(loops) > 2 else loops[0]
            if work >= PARALLEL_MIN_WORK and _extent(sch, outer) != 1:
                sch.parallel(outer)
            if pad and extents[-1] % lanes == 0:
                sch.vectorize(sch.split(loops[-1], factors=[None, lanes])[1])
            return
    vec = None
    if (n_spatial == len(loops) >= 2 and None not in extents and extents[-1] >= lanes
            and _largest_divisor(_work(extents), lanes) < 4):
        # No vector divides the total (3x197x197): whole rows per parallel iteration, each row
        # a plain loop that LLVM vectorizes with a scalar tail.
        fused = sch.fuse(*loops[:-1]) if len(loops) > 2 else loops[0]
    elif n_spatial < len(loops) or None not in extents:
        fused = sch.fuse(*spatial) if len(spatial) > 1 else spatial[0]
        total = _extent(sch, fused)
        if n_spatial == len(loops):  # purely spatial: vectorize the fused inner part
            width = _largest_divisor(total, lanes)
            if width >= 4 or width == total:
                fused, vec = sch.split(fused, factors=[None, width])
    else:  # purely spatial, some extents symbolic
        n_static = 0
        for extent in reversed(extents):
            if extent is None:
                break
            n_static += 1
        outer = list(loops[:len(loops) - n_static])
        if n_static:
            tail = sch.fuse(*loops[-n_static:]) if n_static > 1 else loops[-1]
            size = _extent(sch, tail)
            width = _largest_divisor(size, lanes)
            if width == size:
                vec = tail
            elif width >= 4:
                tail, vec = sch.split(tail, factors=[None, width])
                outer.append(tail)
            else:
                outer.append(tail)
        else:
            outer = outer[:-1]  # the symbolic innermost loop stays serial, for LLVM
        fused = (sch.fuse(*outer) if len(outer) > 1 else outer[0]) if outer else None
    if fused is not None and work >= PARALLEL_MIN_WORK and _extent(sch, fused) != 1:
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
        total_work = _product(main.dom())
        width, rows, vec_pos, row_pos = self._register_tile(sch, main, target)
        s_iters = [it for it in main.iters if it.kind == "S"]
        padding = {vec_pos: width, row_pos: rows}
        padding = {i: f for i, f in padding.items()
                   if i is not None and f > 1 and (_static(s_iters[i].dom) is None or _static(s_iters[i].dom) % f)}
        padded = False
        if padding:
            # Symbolic extents: pad them to whole tiles (zero rows in, the extra rows of the
            # result dropped) rather than guard every tile. A guard in the tile makes its size
            # symbolic, and the accumulators a run-time sized array in memory instead of registers
            # (BERT's matmuls: 2.7x slower). The padded extents are multiples of the tile, so
            # TVM proves that the accumulators have a fixed size. Only an einsum (plain indices:
            # matmuls, not strided convs) pads; other blocks keep guarded tiles.
            order = [it.kind for it in main.iters]
            spatial_index = [i for i, kind in enumerate(order) if kind == "S"]
            try:
                sch.pad_einsum(main.block_rv, [padding.get(spatial_index.index(i), 1) if kind == "S" else 1
                                               for i, kind in enumerate(order)])
                padded = True
            except Exception:  # noqa: BLE001 - not an einsum: guarded tiles where symbolic
                padded = False
                width, rows, vec_pos, row_pos = self._register_tile(sch, main, target, pad=False)
            if padded:
                infos = normalize_prim_func(sch)
                main = next(b for b in infos if not b.is_injective())
                if [it.kind for it in main.iters] != order:
                    return None
        # A static column count padded to whole vectors (197 -> 224): per tile, the crop to the
        # real columns would store lane by lane under a condition (TVM's vectorizer does not
        # predicate); as its own pass over the padded result (fused with the elementwise
        # epilogue) it streams rows that LLVM vectorizes.
        cropped_columns = padded and vec_pos in padding and _static(s_iters[vec_pos].dom) is not None
        index = infos.index(main)
        prologue, epilogue = infos[:index], infos[index + 1:]
        s_iters = [it for it in main.iters if it.kind == "S"]
        r_iters = [it for it in main.iters if it.kind == "R"]
        s_dims = [_static(it.dom) for it in s_iters]  # None: symbolic (a multiple of its tile)
        lanes = vector_lanes(target, _write_dtype_bits(sch, main.block_rv))

        # Split the spatial loops: outer tiles, then reductions, then the register block.
        outer, inner = [], []
        outer_of = {}  # spatial iter position -> its outer tile loop's index in ``outer``
        for i, it in enumerate(s_iters):
            factor = width if i == vec_pos else rows if i == row_pos else 1
            if factor > 1 and (s_dims[i] is None or factor < s_dims[i]):
                o, n = sch.split(it.loop_rv, factors=[None, factor])
                outer_of[i] = len(outer)
                outer.append(o)
                inner.append((i, n))
            elif factor > 1:
                inner.append((i, it.loop_rv))
            else:
                outer_of[i] = len(outer)
                outer.append(it.loop_rv)
        inner.sort(key=lambda pair: 0 if pair[0] == row_pos else 1)
        inner_loops = [lp for _, lp in inner]

        work = _work(_static(d) for d in main.dom())
        reduction = _work(_static(it.dom) for it in r_iters)
        # A pad copied first whose rows are not whole vectors (a 3-channel NCHW input) is computed
        # per row of tiles: the parallel loop runs over rows, each row's tiles in turn. A separate
        # pass over a 600 KB input read 95 or 178 us (MobileNet's stem, varying between
        # processes); per row, 66-69 us, and ResNet's 7x7 stem 301 -> 291 us.
        row_pads = [info for info in prologue if self._pads_by_rows(sch, info.block_rv, lanes, reduction)] \
            if len(outer) >= 2 else []
        columns_outer = False
        if not row_pads and vec_pos in outer_of and row_pos is not None:
            weight_vars = self._column_operand_vars(sch, main, s_iters[vec_pos].var, s_iters[row_pos].var)
            rows_outside = [outer_of[i] for i in outer_of if i != vec_pos and outer_of[i] < outer_of[vec_pos]
                            and s_iters[i].var.name not in weight_vars] if weight_vars is not None else []
            if rows_outside:
                # Column strips outside the row tiles (a matmul's rows, a conv's output rows):
                # each strip of the larger operand (a weight) is read from memory once and stays
                # in cache while every row tile uses it, instead of the whole weight streaming
                # past once per row tile (ResNet's 3x3 512->512 conv on 7x7: 9.4 MB of weights,
                # read 7 times).
                outer.insert(min(rows_outside), outer.pop(outer_of[vec_pos]))
                columns_outer = True
        sch.reorder(*outer, *[it.loop_rv for it in r_iters], *inner_loops)
        rows_loop = None
        if row_pads:
            rows_loop = sch.fuse(*outer[:-1]) if len(outer) > 2 else outer[0]
            if work >= PARALLEL_MIN_WORK and _extent(sch, rows_loop) != 1:
                sch.parallel(rows_loop)
            fused = outer[-1]
        else:
            fused = sch.fuse(*outer) if len(outer) > 1 else outer[0] if outer else None
            if fused is not None and work >= PARALLEL_MIN_WORK and _extent(sch, fused) != 1:
                sch.parallel(fused)

        # Accumulate the register block in a local buffer: LLVM keeps it in registers.
        local = sch.cache_write(main.block_rv, 0, "local")
        if fused is not None:
            sch.reverse_compute_at(local, fused, preserve_unit_loops=True)
        if s_dims[vec_pos] != 1 and inner_loops:
            sch.vectorize(inner_loops[-1])
        if len(inner_loops) == 2:
            sch.unroll(inner_loops[0])
        for it in r_iters[1:]:  # a 3-wide window (depthwise, pooling, 3x3 stem): no loop control
            if _static(it.dom) is not None and _static(it.dom) <= UNROLL_WINDOW_MAX:
                sch.unroll(it.loop_rv)
        init = sch.decompose_reduction(main.block_rv, r_iters[0].loop_rv)
        init_loops = sch.get_loops(init)
        sch.vectorize(init_loops[-1])

        # Epilogue: fold the elementwise chain into one block, computed per output tile; after
        # cropped columns, one pass of whole rows instead.
        if cropped_columns:
            remaining = list(epilogue)
            while (inlined := next((b for b in remaining if _try(sch.compute_inline, b.block_rv)), None)) is not None:
                remaining.remove(inlined)
            for info in remaining:
                _parallelize_vectorize(sch, info.block_rv, lanes)
        else:
            local = epilogue_per_tile(sch, try_inline(sch, list(epilogue)), local, fused, lanes)
        self._vectorize_tail(sch, local, lanes)
        for info in reversed(prologue):
            if any(info is pad for pad in row_pads):
                sch.compute_at(info.block_rv, rows_loop, preserve_unit_loops=True)
                continue
            conditional = _has_if_then_else(sch.get(info.block_rv))
            if (not conditional or reduction <= INLINE_PAD_MAX_REDUCTION) and _try(sch.compute_inline, info.block_rv):
                continue  # a plain copy always goes
            # Not per tile under column strips: every strip would copy the same input patch again.
            if conditional and fused is not None and not columns_outer \
                    and self._pad_per_tile(sch, info.block_rv, fused, lanes):
                continue
            _parallelize_vectorize(sch, info.block_rv, lanes)
        return serial_when_small(sch, [total_work])

    @staticmethod
    def _column_operand_vars(sch: s_tir.Schedule, main, column, row) -> set[str] | None:
        """The names of the block vars that index the operand the column (vector) axis indexes
        and the row axis does not, if it is larger than the one the row axis indexes and the
        column axis does not (a matmul's weight larger than its activations at batch 1, not a
        conv over a large image); else None."""
        from tvm.s_tir.dlight.analysis.common_analysis import collect_vars_used_in_prim_expr

        def largest(uses, avoids):
            best = (0, set())
            for region in sch.get(main.block_rv).reads:
                used = {v.name for r in region.region for v in collect_vars_used_in_prim_expr(r.min)}
                if uses.name in used and avoids.name not in used:
                    best = max(best, (_work(_static(d) for d in region.source.shape), used), key=lambda b: b[0])
            return best

        weight, activation = largest(column, row), largest(row, column)
        return weight[1] if weight[0] > activation[0] else None

    @staticmethod
    def _pads_by_rows(sch: s_tir.Schedule, block, lanes: int, reduction: int) -> bool:
        """Whether a prologue is a pad to compute per row of output tiles: copied first (the
        reduction is long), but its rows are not whole vectors, so a per-tile copy would be
        scalar."""
        if reduction <= INLINE_PAD_MAX_REDUCTION or not _has_if_then_else(sch.get(block)):
            return False
        extents = [_extent(sch, loop) for loop in sch.get_loops(block)]
        return None not in extents and extents[-1] % lanes != 0

    @staticmethod
    def _pad_per_tile(sch: s_tir.Schedule, block, loop, lanes: int) -> bool:
        """Compute a pad (a prologue under a condition) per output tile, inside the parallel
        ``loop``, when its rows are whole vectors: the tile's patch is copied while it is in
        cache and the kernel runs one parallel loop instead of two. The patch overlaps its
        neighbours' (3x3: three input rows per output row), which costs less than a pass over
        the whole input (ResNet's 3x3 convs on 32 and 64 channels: 2-4% faster, 16 channels
        even; a 3-channel stem cannot use vectors and keeps its own pass). Static extents only: the
        pad of a symbolic matmul (``pad_einsum``) is read by every column tile. False: not done."""
        extents = [_extent(sch, loop) for loop in sch.get_loops(block)]
        if None in extents or extents[-1] % lanes:
            return False
        if _lane_dependent_pad(sch.get(block)):
            # The padded edge runs along the rows (a matmul's columns padded to whole vectors):
            # per tile, TVM's vectorizer would copy lane by lane under the condition. One pass
            # over the whole input does that once instead of once per row tile: ViT's attention
            # scores (3 x 197x64 @ 64x197, one thread) 0.58 -> 0.14 ms.
            return False
        sch.compute_at(block, loop, preserve_unit_loops=True)
        inner = sch.get_loops(block)[-1]
        sch.vectorize(sch.split(inner, factors=[None, lanes])[1])
        return True

    @staticmethod
    def _register_tile(sch: s_tir.Schedule, main, target: Target, pad: bool = True) -> tuple[int, int, int, int | None]:
        """``(width, rows, vec_pos, row_pos)``: the register tile of the reduction block ``main``
        and the positions, among its spatial iters, of the axes it tiles. The vector axis is
        the spatial iter that indexes the output's last (contiguous) dim; the row axis the last
        other one. A symbolic extent gets the full tile (it is padded to a multiple of it), and so
        does a static one that no good tile divides, with ``pad``."""
        s_iters = [it for it in main.iters if it.kind == "S"]
        s_dims = [_static(it.dom) for it in s_iters]
        lanes = vector_lanes(target, _write_dtype_bits(sch, main.block_rv))
        out_region = sch.get(main.block_rv).writes[0].region
        last_index = out_region[-1].min if out_region else None
        vec_pos = len(s_iters) - 1
        for i, it in enumerate(s_iters):
            if last_index is not None and last_index.same_as(it.var):
                vec_pos = i
        tile, row_tile = (padded_vector_tile, padded_rows) if pad else (vector_tile, _largest_divisor)
        width = tile(s_dims[vec_pos], lanes) if s_dims[vec_pos] is not None else 2 * lanes
        row_candidates = [i for i in range(len(s_iters)) if i != vec_pos]
        row_pos = row_candidates[-1] if row_candidates else None
        vectors_per_row = -(-width // lanes)
        rows = 1
        if row_pos is not None:
            most = max(1, accumulator_registers(target) // vectors_per_row)
            rows = row_tile(s_dims[row_pos], most) if s_dims[row_pos] is not None else most
        return width, rows, vec_pos, row_pos

    @staticmethod
    def _vectorize_tail(sch: s_tir.Schedule, block, lanes: int) -> None:
        if block is None:
            return
        loops = sch.get_loops(block)
        if not loops:
            return
        ext = _extent(sch, loops[-1])
        if ext is not None and 1 < ext <= 4 * lanes and not _guarded_by(sch, block, loops[-1]):
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
        works = [_product(info.dom()) for info in infos]
        for info in infos:
            lanes = vector_lanes(target, _write_dtype_bits(sch, info.block_rv))
            try:
                _parallelize_vectorize(sch, info.block_rv, lanes)
            except Exception:  # noqa: BLE001 - an odd loop nest stays as it is
                continue
        return serial_when_small(sch, works)


class Reduction(dl_cpu.Reduction):
    """dlight's CPU rule for row reductions (softmax, layer norm), with each row loop left
    whole. dlight splits a row into vectors, with a guard on every lane where the row is not a
    multiple of them (ViT's 197) or symbolic, which TVM's vectorizer turns back into scalar code,
    and accumulates each sum one scalar at a time. A whole row loop goes to LLVM's loop
    vectorizer instead: a scalar epilogue for the odd tail, and, with the target's
    ``fast-math-reassoc`` (set with ``fast_math``), sums and maxima in vector registers.
    Softmax over 3x197x197 plus a 197x192 layer norm: 0.365 ms split, 0.121 ms whole (Zen 4,
    2 threads); BERT's 8x128x128 and 128x512: 0.283 -> 0.137 ms."""

    def apply(self, func, target, tunable):
        sch = super().apply(func, target, tunable)
        if sch is None:
            return None
        infos = normalize_prim_func(s_tir.Schedule(func)) or []
        return serial_when_small(sch, [_product(info.dom()) for info in infos])

    @staticmethod
    def _vectorize_inner(sch, block_rv, vec_lanes):
        """Leave the row loop whole, for LLVM."""

    @staticmethod
    def _unroll_reduction_inner(sch, block_rv, vec_lanes):
        """Leave the row loop whole, for LLVM."""


class GEMV(dl_cpu.GEMV):
    """dlight's CPU GEMV rule, declining what it cannot analyse: it asserts on a contraction
    whose spatial extents are all 1 (BERT's attention at seq=1), which stopped the compile."""

    def apply(self, func, target, tunable):
        try:
            return super().apply(func, target, tunable)
        except Exception:  # noqa: BLE001 - not a GEMV it understands: the next rule tries
            return None
