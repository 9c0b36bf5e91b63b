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
