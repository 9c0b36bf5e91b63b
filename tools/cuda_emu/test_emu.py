"""Run csrc/cuda on the CPU emulator and compare with bsn_cuda.reference.

Every case runs in every launch mode (Single, Coop with 2 and 5 SMs, Multi
with 48 KiB of shared memory, and Coop refused by the driver, which must fall
back to Multi); all must give the same bits. Seeds: crc32 of the case.
"""
import ctypes, os, sys, time, zlib
import torch
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
from bsn_cuda import reference

LIB = ctypes.CDLL(os.environ.get("EMU_LIB", os.path.join(HERE, "build", "libemu.so")))
I64P = ctypes.POINTER(ctypes.c_int64)
LIB.emu_forward.argtypes = [ctypes.c_int] + [ctypes.c_void_p] * 7 + [I64P, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_double, ctypes.c_double, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_int]
LIB.emu_set_coop_oversubscribe.argtypes = [ctypes.c_int]
LIB.emu_set_variant.argtypes = [ctypes.c_double, ctypes.c_void_p, ctypes.c_int]
LIB.emu_backward.argtypes = [ctypes.c_int] + [ctypes.c_void_p] * 4 + [I64P, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_double, ctypes.c_int, ctypes.c_int, ctypes.c_int]
VPP = ctypes.POINTER(ctypes.c_void_p)
I32P = ctypes.POINTER(ctypes.c_int)
LIB.emu_group_forward.argtypes = [ctypes.c_int, ctypes.c_int] + [VPP] * 7 + [I64P] + [I32P] * 5 + [ctypes.c_double, ctypes.c_double, ctypes.c_int, ctypes.c_long, ctypes.c_int]
LIB.emu_group_backward.argtypes = [ctypes.c_int, ctypes.c_int] + [VPP] * 4 + [I64P] + [I32P] * 3 + [ctypes.c_double, ctypes.c_int, ctypes.c_int]
DT = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
MODES = {"auto": 0, "single": 1, "coop": 2, "multi": 3, "coop-refused": 2}
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
ACC = lambda dt: torch.float64 if dt == torch.float64 else torch.float32


def ptr(t):
    return ctypes.c_void_p(t.data_ptr()) if t is not None else ctypes.c_void_p(0)


def emu_fwd(w, vecs, bsn, dim, n_iter, eps, scale, update, mode="auto", sm=2, optin=232448, occ=2):
    LIB.emu_set_coop_oversubscribe(int(mode == "coop-refused"))
    w = w.contiguous()
    vecs = [v.clone() for v in vecs]
    out = torch.empty_like(w)
    if bsn:
        n = reference.bsn_state_size(w.shape)
    else:
        n = reference.sn_state_size(w.shape, dim)
    state = torch.full((n,), float("nan"), dtype=ACC(w.dtype))
    shape = (ctypes.c_int64 * w.dim())(*w.shape)
    u0, v0 = vecs[0], vecs[1]
    u1, v1 = (vecs[2], vecs[3]) if bsn else (None, None)
    rc = LIB.emu_forward(DT[w.dtype], ptr(w), ptr(u0), ptr(v0), ptr(u1), ptr(v1), ptr(out), ptr(state), shape, w.dim(), int(bsn), dim % w.dim(), n_iter, eps, scale, int(update), MODES[mode], sm, optin, occ)
    assert rc >= 0, rc
    return out, state, vecs, rc


def emu_bwd(g, w, state, bsn, dim, scale, mode="auto", sm=2, occ=2):
    LIB.emu_set_coop_oversubscribe(int(mode == "coop-refused"))
    gw = torch.full_like(w, float("nan"))
    shape = (ctypes.c_int64 * w.dim())(*w.shape)
    rc = LIB.emu_backward(DT[w.dtype], ptr(g.contiguous()), ptr(w.contiguous()), ptr(state), ptr(gw), shape, w.dim(), int(bsn), dim % w.dim(), scale, MODES[mode], sm, occ)
    assert rc >= 0, rc
    return gw, rc


def close(a, e, dt, what, magnitude=0.0):
    a, e = a.double(), e.double()
    assert torch.equal(torch.isnan(a), torch.isnan(e)), f"{what}: NaN positions differ"
    f = ~torch.isnan(e)
    sc = max(e[f].abs().max().item() if f.any() else 1.0, magnitude, 1e-30)
    err = (a[f] - e[f]).abs().max().item() if f.any() else 0.0
    assert err <= TOL[dt] * sc, f"{what}: err {err:.3e} > {TOL[dt]:.1e}*{sc:.3e}"


def unit(n, dt, gen):
    x = torch.randn(n, dtype=torch.float64, generator=gen)
    return (x / x.norm()).to(dt)


def vectors(shape, bsn, dim, dt, gen):
    dims = (0, 1) if bsn else (dim % len(shape),)
    out = []
    numel = 1
    for s in shape:
        numel *= s
    for d in dims:
        out += [unit(shape[d], dt, gen), unit(numel // shape[d], dt, gen)]
    return out


def ref_fwd(w, vecs, bsn, dim, n_iter, eps, scale, update):
    vecs = [v.clone() for v in vecs]
    if bsn:
        out, state = reference.bsn_forward(w, *vecs, n_iter, eps, scale, update)
    else:
        out, state = reference.sn_forward(w, *vecs, dim, n_iter, eps, scale, update)
    return out, state, vecs


def check_case(shape, bsn, dim, dt, n_iter, update, scale=1.3, modes=(("single", 2, 232448), ("coop", 2, 232448), ("multi", 2, 232448), ("coop", 5, 232448), ("multi", 1, 49152), ("coop-refused", 3, 232448)), weight=None, vecs=None):
    gen = torch.Generator().manual_seed(zlib.crc32(repr((shape, bsn, dim)).encode()))
    w = weight if weight is not None else torch.randn(shape, dtype=torch.float64, generator=gen).to(dt)
    vecs = vecs if vecs is not None else vectors(shape, bsn, dim, dt, gen)
    ro, rs, rv = ref_fwd(w, vecs, bsn, dim, n_iter, 1e-12, scale, update)
    results = []
    for mode, sm, optin in modes:
        o, s, v, rc = emu_fwd(w, vecs, bsn, dim, n_iter, 1e-12, scale, update, mode, sm, optin)
        results.append((o, s, v, rc))
    base = results[0]
    tag = f"{'bsn' if bsn else 'sn'} {shape} dim={dim} {dt} n={n_iter} update={update}"
    if weight is None:
        close(base[0], ro, dt, tag + " out")
        close(base[1][:1], rs[:1], ACC(dt), tag + " sigma")
        if bsn:
            close(base[1][1:3], rs[1:3], ACC(dt), tag + " sigmas")
        close(base[1], rs, dt, tag + " state")
        for i, (a, e) in enumerate(zip(base[2], rv)):
            close(a, e, dt, tag + f" vec{i}")
    for (o, s, v, rc), m in zip(results[1:], modes[1:]):
        assert torch.equal(o.nan_to_num(7.0), base[0].nan_to_num(7.0)), (tag, m, "out differs between modes")
        assert torch.equal(s.nan_to_num(7.0), base[1].nan_to_num(7.0)), (tag, m, "state differs between modes")
        for a, b in zip(v, base[2]):
            assert torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0)), (tag, m, "buffers differ between modes")
    # backward with the emulated state
    g = torch.randn(shape, dtype=torch.float64, generator=gen).to(dt)
    state = base[1]
    gws = [emu_bwd(g, w, state, bsn, dim, scale, m, sm)[0] for m, sm in (("single", 2), ("coop", 3), ("multi", 2), ("coop-refused", 2))]
    for x in gws[1:]:
        assert torch.equal(x.nan_to_num(7.0), gws[0].nan_to_num(7.0)), (tag, "backward differs between modes")
    if weight is None:
        if bsn:
            ref_g = reference.bsn_backward(g, w, state, scale)
        else:
            ref_g = reference.sn_backward(g, w, state, dim, scale)
        sigma = abs(state[0].item()) or 1.0
        close(gws[0], ref_g, dt, tag + " grad", g.double().abs().max().item() * scale / sigma)
    return base, results


def check_offset_case(shape, bsn, dim, dt, n_iter, update, offset):
    """W stored `offset` elements past its storage's start, so that its rows start
    off a 16-byte boundary (block mode's 128-bit row walk: scalar head and tail);
    checked against the reference and across modes like check_case."""
    gen = torch.Generator().manual_seed(zlib.crc32(repr((shape, bsn, dim, offset)).encode()))
    w = torch.randn(shape, dtype=torch.float64, generator=gen).to(dt)
    buf = torch.empty(w.numel() + offset, dtype=dt)
    buf[offset:] = w.flatten()
    wo = buf[offset:].view(shape)
    assert wo.data_ptr() % 16 == (offset * w.element_size()) % 16
    vecs = vectors(shape, bsn, dim, dt, gen)
    base, _ = check_case(shape, bsn, dim, dt, n_iter, update, weight=wo, vecs=vecs)
    ro, rs, rv = ref_fwd(w, vecs, bsn, dim, n_iter, 1e-12, 1.3, update)
    tag = f"offset {offset} {'bsn' if bsn else 'sn'} {shape} dim={dim} {dt} update={update}"
    close(base[0], ro, dt, tag + " out")
    close(base[1], rs, dt, tag + " state")


def check_variant_case(shape, bsn, dim, dt, update, coeff, gamma_value, track_only):
    """One variant (docs/design.md, Variants) in every launch mode against the reference."""
    gen = torch.Generator().manual_seed(zlib.crc32(repr((shape, bsn, dim, "variant")).encode()))
    w = torch.randn(shape, dtype=torch.float64, generator=gen).to(dt)
    vecs = vectors(shape, bsn, dim, dt, gen)
    gamma = None if gamma_value is None else torch.tensor([gamma_value], dtype=ACC(dt))
    args = (coeff, gamma, track_only)
    rvecs = [t.clone() for t in vecs]
    if bsn:
        ro, rs = reference.bsn_forward(w, *rvecs, 2, 1e-12, 1.3, update, *args)
    else:
        ro, rs = reference.sn_forward(w, *rvecs, dim, 2, 1e-12, 1.3, update, *args)
    tag = f"variant coeff={coeff} gamma={gamma_value} track={track_only} {'bsn' if bsn else 'sn'} {shape} {dt} update={update}"
    LIB.emu_set_variant(coeff, ptr(gamma), int(track_only))
    try:
        results = []
        for mode, sm, optin in (("single", 2, 232448), ("coop", 2, 232448), ("multi", 2, 232448), ("coop-refused", 3, 232448)):
            o, s, v, rc = emu_fwd(w, vecs, bsn, dim, 2, 1e-12, 1.3, update, mode, sm, optin)
            results.append((o, s, v))
        base = results[0]
        close(base[1], rs, dt, tag + " state")
        for a, e in zip(base[2], rvecs):
            close(a, e, dt, tag + " vectors")
        if not track_only:
            close(base[0], ro, dt, tag + " out")
        for o, s, v in results[1:]:
            assert torch.equal(s.nan_to_num(7.0), base[1].nan_to_num(7.0)), (tag, "state differs between modes")
            if not track_only:
                assert torch.equal(o.nan_to_num(7.0), base[0].nan_to_num(7.0)), (tag, "out differs between modes")
        if track_only:
            return
        g = torch.randn(shape, dtype=torch.float64, generator=gen).to(dt)
        state = base[1]
        gws = [emu_bwd(g, w, state, bsn, dim, 1.3, m, sm)[0] for m, sm in (("single", 2), ("coop", 3), ("multi", 2), ("coop-refused", 2))]
        for x in gws[1:]:
            assert torch.equal(x.nan_to_num(7.0), gws[0].nan_to_num(7.0)), (tag, "backward differs between modes")
        if bsn:
            ref_g = reference.bsn_backward(g, w, state, 1.3, coeff, gamma)
        else:
            ref_g = reference.sn_backward(g, w, state, dim, 1.3, coeff, gamma)
        close(gws[0], ref_g, dt, tag + " grad", g.double().abs().max().item() * 1.3 * (gamma_value or 1.0))
    finally:
        LIB.emu_set_variant(0.0, None, 0)


VARIANT_SHAPES = [((17, 33), False, 0), ((4, 3, 3, 3), False, 1), ((64, 27), False, 0), ((4, 3, 3, 3), True, 0),
                  ((6, 5, 2), True, 0)]
# (coeff, gamma, track_only): a bound that projects (sigma of these weights is ~3-10),
# one that does not, the learnable scale, both, and track-only.
VARIANTS = [(0.5, None, False), (100.0, None, False), (0.0, 1.7, False), (0.5, 0.8, False), (0.0, None, True)]

SN = [((1, 1), 0), ((3, 5), 0), ((5, 3), 1), ((17, 33), -1), ((1, 100), 0), ((100, 1), 0), ((64, 27), 0), ((4, 3, 3, 3), 0),
      ((4, 3, 3, 3), 1), ((4, 3, 3, 3), -1), ((6, 5, 1, 1), 0), ((7, 3, 5), 1), ((3, 4, 5, 6), 2), ((2, 3, 4, 3, 2), 3),
      ((33, 65), 0), ((33, 65), 1), ((1000, 3), 0), ((1000, 3), 1), ((7, 5, 3, 3), 1), ((3, 5, 1, 1), 1), ((20, 300), 0),
      ((5, 600), 1), ((300, 40), 1), ((2, 3, 300), 1), ((4, 2, 70), 1), ((40, 1000), 0), ((1, 3000), 0), ((3000, 2), 1),
      ((9, 700, 3), 1)]
BSN = [(1, 1, 3), (4, 3, 3, 3), (6, 5, 2), (3, 7, 3, 3), (5, 4, 1, 1), (2, 3, 4, 5, 3), (16, 8, 5, 5), (7, 5, 3, 3), (3, 5, 1, 1),
       (5, 2, 64), (3, 2, 300), (30, 40, 3), (3, 400, 3), (40, 3, 9)]

def run_variants(dts, verbose):
    t0 = time.time()
    count = 0
    for dt in dts:
        for shape, bsn, dim in VARIANT_SHAPES:
            for coeff, gamma, track in VARIANTS:
                for update in (True, False):
                    check_variant_case(shape, bsn, dim, dt, update, coeff, gamma, track)
                    count += 1
                    if verbose:
                        print(" ", dt, shape, bsn, coeff, gamma, track, update, f"{time.time() - t0:.0f}s", flush=True)
        print(dt, "variants ok", count, f"{time.time() - t0:.0f}s", flush=True)
    print("ALL OK", count)


# ---------------------------------------------------------------------------
# Grouped launches (launch.cu, "Grouped launches"): one launch per phase step for
# every layer of a group; bitwise the per-layer launches, launches = the most
# phases of any layer (not layers x phases).

def _ptrs(ts):
    return (ctypes.c_void_p * len(ts))(*[t.data_ptr() if t is not None else None for t in ts])


def _ints(xs):
    return (ctypes.c_int * len(xs))(*xs)


def _shapes(ws):
    flat = []
    for w in ws:
        assert w.dim() <= 8
        flat += list(w.shape) + [1] * (8 - w.dim())
    return (ctypes.c_int64 * len(flat))(*flat)


def has_strided(shape, bsn, dim):
    if bsn:
        return True
    p = 1
    for s in shape[:dim % len(shape)]:
        p *= s
    return p > 1


def phases(shape, bsn, dim, n_iter, update):
    if not update:
        return 2
    return n_iter * (2 + int(has_strided(shape, bsn, dim))) + (n_iter - 1) + 1


def emu_group_fwd(layers, ws, vecs, dt, scale, sm=2, optin=232448, occ=2):
    """layers: (shape, bsn, dim, n_iter, update); returns per-layer (out, state, vecs), launches."""
    vecs = [[v.clone() for v in vs] for vs in vecs]
    outs = [torch.empty_like(w) for w in ws]
    states = []
    for (shape, bsn, dim, n, up), w in zip(layers, ws):
        k = reference.bsn_state_size(w.shape) if bsn else reference.sn_state_size(w.shape, dim)
        states.append(torch.full((k,), float("nan"), dtype=ACC(dt)))
    col = lambda k: [vs[k] if k < len(vs) else None for vs in vecs]
    rc = LIB.emu_group_forward(DT[dt], len(layers), _ptrs(ws), _ptrs(col(0)), _ptrs(col(1)), _ptrs(col(2)), _ptrs(col(3)), _ptrs(outs), _ptrs(states), _shapes(ws),
                               _ints([w.dim() for w in ws]), _ints([int(l[1]) for l in layers]), _ints([l[2] % len(l[0]) for l in layers]),
                               _ints([l[3] for l in layers]), _ints([int(l[4]) for l in layers]), 1e-12, scale, sm, optin, occ)
    assert rc >= 0, rc
    return list(zip(outs, states, vecs)), rc


def emu_group_bwd(layers, gs, ws, states, dt, scale, sm=2, occ=2):
    gws = [torch.full_like(w, float("nan")) for w in ws]
    rc = LIB.emu_group_backward(DT[dt], len(layers), _ptrs(gs), _ptrs(ws), _ptrs(states), _ptrs(gws), _shapes(ws), _ints([w.dim() for w in ws]),
                                _ints([int(l[1]) for l in layers]), _ints([l[2] % len(l[0]) for l in layers]), scale, sm, occ)
    assert rc >= 0, rc
    return gws, rc


def check_group(layers, dt, devices=((2, 232448, 2), (5, 49152, 3))):
    """A group against the per-layer emulated launches (bitwise: every mode
    gives the per-layer bits, Multi is compared here) and the reference; the
    group in each emulated device (SMs, opt-in shared memory, blocks per SM)."""
    scale = 1.3
    ws, vecs, gs = [], [], []
    for shape, bsn, dim, n, up in layers:
        gen = torch.Generator().manual_seed(zlib.crc32(repr(("group", shape, bsn, dim)).encode()))
        ws.append(torch.randn(shape, dtype=torch.float64, generator=gen).to(dt))
        vecs.append(vectors(shape, bsn, dim, dt, gen))
        gs.append(torch.randn(shape, dtype=torch.float64, generator=gen).to(dt))
    expected_launches = max(phases(*l) for l in layers)
    per_layer = []
    for (shape, bsn, dim, n, up), w, vs in zip(layers, ws, vecs):
        o, st, v, rc = emu_fwd(w, vs, bsn, dim, n, 1e-12, scale, up, "multi")
        per_layer.append((o, st, v))
        assert rc % 100 == phases(shape, bsn, dim, n, up), (shape, rc)
    per_layer_g = [emu_bwd(g, w, st, l[1], l[2], scale, "multi")[0] for l, g, w, (o, st, v) in zip(layers, gs, ws, per_layer)]
    tag = f"group of {len(layers)} {dt}"
    for sm, optin, occ in devices:
        got, launches = emu_group_fwd(layers, ws, vecs, dt, scale, sm, optin, occ)
        assert launches == expected_launches, (tag, launches, expected_launches)
        for i, ((o, st, v), (eo, est, ev)) in enumerate(zip(got, per_layer)):
            what = f"{tag} (sm={sm} optin={optin} occ={occ}) layer {i} {layers[i]}"
            assert torch.equal(o.nan_to_num(7.0), eo.nan_to_num(7.0)), (what, "out differs from the per-layer launch")
            assert torch.equal(st.nan_to_num(7.0), est.nan_to_num(7.0)), (what, "state differs from the per-layer launch")
            for a, b in zip(v, ev):
                assert torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0)), (what, "vectors differ from the per-layer launch")
        gws, blaunches = emu_group_bwd(layers, gs, ws, [p[1] for p in per_layer], dt, scale, sm, occ)
        assert blaunches == 2, (tag, blaunches)
        for i, (a, b) in enumerate(zip(gws, per_layer_g)):
            assert torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0)), (f"{tag} layer {i} {layers[i]}", "grad differs from the per-layer launch")
    # and the reference (the per-layer launches' own check, on the group's bits)
    for (shape, bsn, dim, n, up), w, vs, g, (o, st, v), gw in zip(layers, ws, vecs, gs, got, gws):
        what = f"{tag} {'bsn' if bsn else 'sn'} {shape} dim={dim} n={n} update={up}"
        ro, rs, rv = ref_fwd(w, vs, bsn, dim, n, 1e-12, scale, up)
        close(o, ro, dt, what + " out")
        close(st, rs, dt, what + " state")
        for a, e in zip(v, rv):
            close(a, e, dt, what + " vectors")
        ref_g = reference.bsn_backward(g, w, st, scale) if bsn else reference.sn_backward(g, w, st, dim, scale)
        sigma = abs(st[0].item()) or 1.0
        close(gw, ref_g, dt, what + " grad", g.double().abs().max().item() * scale / sigma)
    return expected_launches


# (shape, bsn, dim, n_power_iterations, update): the per-layer cases' shapes.
GROUPS = [
    # SN and BSN, every dim kind, train (1 and 2 iterations) and eval, warp and block rows
    [((64, 27), False, 0, 1, True), ((4, 3, 3, 3), False, 1, 2, True), ((17, 33), False, -1, 1, False),
     ((4, 3, 3, 3), True, 0, 1, True), ((6, 5, 2), True, 0, 2, True), ((7, 301), False, 0, 1, True),
     ((1000, 3), False, 1, 2, False), ((3, 301, 1), True, 0, 1, False), ((1, 1), False, 0, 1, True)],
    # eval only (2 launches), SN along dims 0..3 and BSN
    [((3, 4, 5, 6), False, 2, 1, False), ((2, 3, 4, 3, 2), False, 3, 1, False), ((33, 65), False, 0, 1, False),
     ((5, 2, 64), True, 0, 1, False)],
    # longer and shorter sequences: BSN n=2 (8 phases) beside SN dim 0 n=1 (3) and eval (2)
    [((16, 8, 5, 5), True, 0, 2, True), ((20, 300), False, 0, 1, True), ((300, 40), False, 1, 2, True),
     ((3, 5, 1, 1), False, 1, 1, False), ((40, 3, 9), True, 0, 1, True)],
    # more rows than chunks, many B items, a warp per row with strided pairs
    [((40, 1000), False, 0, 2, True), ((3000, 2), False, 1, 1, True), ((9, 700, 3), False, 1, 1, True),
     ((30, 40, 3), True, 0, 2, False)],
]


def run_groups(dts, verbose, quick):
    t0 = time.time()
    count = 0
    for dt in dts:
        groups = GROUPS if (dt == torch.float32 and not quick) else GROUPS[:1] + GROUPS[2:3]
        for layers in groups:
            launches = check_group(layers, dt)
            count += 1
            if verbose:
                print(" ", dt, f"group of {len(layers)} layers: {launches} launches per forward, 2 per backward",
                      f"{time.time() - t0:.0f}s", flush=True)
        print(dt, "groups ok", count, f"{time.time() - t0:.0f}s", flush=True)
    print("ALL OK", count)


if __name__ == "__main__":
    # --quick: float32, 12 shapes; --dtypes float64,bfloat16; --every K: every K-th shape
    # (a representative subset when the machine is busy); --bsn-only; -v: a line per case.
    # Each dtype also runs the offset-row cases (8) and the wide-row cases (2), whatever the flags.
    quick = "--quick" in sys.argv
    verbose = "-v" in sys.argv
    opt = lambda name, default: sys.argv[sys.argv.index(name) + 1] if name in sys.argv else default
    names = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}
    dts = [names[d] for d in opt("--dtypes", "float32" if quick else "float32,float64,float16,bfloat16").split(",")]
    every = int(opt("--every", "1"))
    SN, BSN = SN[::every], BSN[::every]
    if "--bsn-only" in sys.argv:
        SN = []
    if "--variants" in sys.argv:  # only the variant cases (issue 23)
        run_variants(dts, verbose)
        sys.exit(0)
    if "--group" in sys.argv:  # only the grouped cases (issue 22); float32: all groups, others: 2
        run_groups(dts, verbose, quick)
        sys.exit(0)
    t0 = time.time()
    count = 0
    for dt in dts:
        for (shape, dim) in (SN[:8] if quick else SN):
            for n_iter, update in ((1, True), (3, True), (1, False)):
                check_case(shape, False, dim, dt, n_iter, update)
                count += 1
                if verbose:
                    print(" ", dt, "sn", shape, dim, n_iter, update, f"{time.time() - t0:.0f}s", flush=True)
        for shape in (BSN[:4] if quick else BSN):
            for n_iter, update in ((1, True), (3, True), (1, False)):
                check_case(shape, True, 0, dt, n_iter, update)
                count += 1
                if verbose:
                    print(" ", dt, "bsn", shape, n_iter, update, f"{time.time() - t0:.0f}s", flush=True)
        # Rows of 301 columns (block mode) start off 16-byte boundaries whatever
        # the dtype; W one element past its storage's start shifts every row.
        for shape, bsn, dim in (((7, 301), False, 0), ((3, 301, 1), True, 0)):
            for offset in (0, 1):
                for update in (True, False):
                    check_offset_case(shape, bsn, dim, dt, 1, update, offset)
                    count += 1
        # BSN rows wider than the 2-blocks-per-SM shared-memory cap (kSmemCap; 6,960
        # columns for float64, 13,920 otherwise): phase A's accumulators in opt-in shared
        # memory at 232,448 B, in global memory at 48 KiB (about 90 s per dtype).
        wide = (2, 7000 if dt == torch.float64 else 14000, 1)
        for update in (True, False):
            check_case(wide, True, 0, dt, 1, update)
            count += 1
        print(dt, "ok", count, f"{time.time() - t0:.0f}s", flush=True)
    print("ALL OK", count)
