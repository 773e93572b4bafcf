"""DISCO convolutions in Fourier space (plain torch): the processor blocks' filter and the decoders' resampling + filter.

On a grid equally spaced in longitude, torch-harmonics' DISCO convolution (same longitudes in and out) is, for every
output row ``t`` and basis function ``k``, a circular correlation along longitude:
``y[k, t, p] = sum_{j, l} psi[k, t, j, l] x[j, (l + p) mod N]``. After an rfft along longitude it becomes, per zonal
wavenumber ``m``, ``Y[k, t, m] = sum_j conj(H[k, t, j, m]) X[j, m]`` with ``H = rfft_l(psi)``: a matrix over the
narrow band of input rows ``j`` that the filter reaches from ``t``. FCN3's harmonic ("morlet") basis functions are
even or odd in the longitude offset, so ``H`` is purely real or purely imaginary per basis function; each becomes a
real matrix acting on the real and imaginary parts (the odd ones with the two parts swapped). The tables are derived
from torch-harmonics' own precomputed sparse tensor ``psi`` (the math is exactly theirs) in float64, band by band
(tiles of output rows), so no dense table is ever built.

The channel / basis contraction with the layer's weight is done first, in Fourier space, as one GEMM (it commutes
with the per-wavenumber band matrices), so autograd keeps only the rfft of the input for backward; the band matrices
are constants.
Where every output wavenumber reads the same input wavenumber (the processor blocks) the layer runs
:class:`_SameGridBands`: (real, imaginary) parts as GEMM rows, wavenumbers in cache-sized chunks, a hand-written
backward; the decoders keep the (M, rows, Kv, B * O * 2) layout of :meth:`FourierDisco.contract` (also the
distributed twin's).

The decoder variant (:class:`FourierResampleDisco`) folds torch-harmonics' bilinear resampling from the latent grid
(pole expansion, latitude interpolation; the longitude interpolation is one real factor per wavenumber) into the
tables: it reads the latent field and never forms the data-grid input of the convolution.

Parameters and state-dict keys are those of the torch-harmonics layer it is built from (the same ``weight``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

#: relative size below which the even (or odd) part of a basis function's longitude profile counts as round-off
PARITY_TOL = 1e-6


def _psi_entries(conv: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(k, t, j, l, value) of torch-harmonics' sparse DISCO tensor, float64 values, sorted by output row t."""
    nlon = conv.nlon_in
    ker, row, col, vals = conv.psi_ker_idx, conv.psi_row_idx, conv.psi_col_idx, conv.psi_vals.to(torch.float64)
    order = torch.argsort(row, stable=True)
    ker, row, col, vals = ker[order], row[order], col[order], vals[order]
    return ker, row, col // nlon, col % nlon, vals


def basis_parity(conv: nn.Module) -> tuple[list[int], list[int]]:
    """(even, odd): the basis functions whose psi has an even / odd part in the longitude offset (a general basis
    function is in both lists). Measured on psi itself: ``||psi -/+ mirror(psi)|| / ||psi||``."""
    k, t, j, lon, v = _psi_entries(conv)
    n, nlat_in, nlat_out, nk = conv.nlon_in, conv.nlat_in, conv.nlat_out, conv.kernel_size
    size = (nk * nlat_out * nlat_in * n,)
    key = ((k * nlat_out + t) * nlat_in + j) * n
    with torch.sparse.check_sparse_tensor_invariants(enable=False):
        a = torch.sparse_coo_tensor((key + lon).unsqueeze(0), v, size)
        b = torch.sparse_coo_tensor((key + (n - lon) % n).unsqueeze(0), v, size)
        odd_part = (a - b).coalesce()  # 2 x the odd part
        even_part = (a + b).coalesce()
    even, odd = [], []
    per_k = nlat_out * nlat_in * n
    for part, out in ((even_part, even), (odd_part, odd)):
        kk = part.indices()[0] // per_k
        norm = torch.zeros(nk, dtype=torch.float64).index_add_(0, kk, part.values().square())
        total = torch.zeros(nk, dtype=torch.float64).index_add_(0, k, 4 * v.square())
        out.extend(i for i in range(nk) if norm[i] > PARITY_TOL**2 * total[i])
    return even, odd


def _tiles(t: torch.Tensor, j: torch.Tensor, nlat_out: int, tile_rows: int) -> list[tuple[int, int, int, int]]:
    """Output-row tiles ``(t0, t1, j0, j1)``: rows [t0, t1) read input rows [j0, j1) (their band)."""
    lo = torch.full((nlat_out,), 1 << 62, dtype=torch.int64).scatter_reduce(0, t, j, "amin")
    hi = torch.full((nlat_out,), -1, dtype=torch.int64).scatter_reduce(0, t, j, "amax")
    tiles = []
    for t0 in range(0, nlat_out, tile_rows):
        t1 = min(t0 + tile_rows, nlat_out)
        a, b = int(lo[t0:t1].min()), int(hi[t0:t1].max())
        if b < a:  # no input row within reach of these output rows
            a, b = 0, 0
        tiles.append((t0, t1, a, b + 1))
    return tiles


def _default_tile_rows(t: torch.Tensor, j: torch.Tensor, nlat_out: int) -> int:
    """About the band width: the tile's GEMMs then do at most ~2x the banded work, in few Python-level steps."""
    lo = torch.full((nlat_out,), 1 << 62, dtype=torch.int64).scatter_reduce(0, t, j, "amin")
    hi = torch.full((nlat_out,), -1, dtype=torch.int64).scatter_reduce(0, t, j, "amax")
    width = int((hi - lo + 1).clamp(min=1).median())
    return max(4, width)


class FourierDisco(nn.Module):
    """torch-harmonics' ``DiscreteContinuousConvS2`` (same longitudes in and out, no bias) in Fourier space.

    Built from the torch-harmonics layer ``conv``: shares its ``weight`` parameter (same state dict) and derives its
    tables from ``conv``'s psi. ``resample`` (a torch-harmonics ``ResampleS2`` onto ``conv``'s input grid) makes it the
    fused decoder: the input is then on the resampling's input grid.
    """

    def __init__(self, conv: nn.Module, resample: nn.Module | None = None, tile_rows: int | None = None):
        super().__init__()
        if conv.nlon_in != conv.nlon_out:
            raise ValueError(f"the Fourier DISCO needs the same longitudes in and out, got {conv.nlon_in} and {conv.nlon_out}")
        if getattr(conv, "bias", None) is not None:
            raise ValueError("the Fourier DISCO is built for FCN3's DISCO layers, which have no bias")
        self.weight = conv.weight
        self.groups, self.groupsize, self.kernel_size = conv.groups, conv.groupsize, conv.kernel_size
        self.out_channels = conv.weight.shape[0]
        self.nlon = conv.nlon_out
        self.nlat_out = conv.nlat_out
        self.even, self.odd = basis_parity(conv)
        kv = self.even + self.odd
        self.register_buffer("basis_index", torch.tensor(kv, dtype=torch.long), persistent=False)
        k, t, j, lon, v = _psi_entries(conv)
        self.tile_rows = int(tile_rows) if tile_rows else _default_tile_rows(t, j, conv.nlat_out)
        n, m_out = self.nlon, self.nlon // 2 + 1
        if resample is None:
            self.nlat_in, self.nlon_in = conv.nlat_in, conv.nlon_in
            lat_maps = None
            lon_factor = torch.ones(m_out, dtype=torch.float64)
            self.register_buffer("lon_source", torch.arange(m_out), persistent=False)
            conj = torch.zeros(m_out, dtype=torch.bool)
        else:
            if (resample.nlat_out, resample.nlon_out) != (conv.nlat_in, conv.nlon_in):
                raise ValueError("the resampling's output grid must be the convolution's input grid")
            self.nlat_in, self.nlon_in = resample.nlat_in, resample.nlon_in
            src, conj, lon_factor = _longitude_upsampling(resample)
            self.register_buffer("lon_source", src, persistent=False)
            lat_maps = _latitude_maps(resample)
        self.m_in = self.nlon_in // 2 + 1
        # output imaginary-part sign: -1 where the wavenumber reads the conjugate of a latent coefficient
        sign = torch.ones(m_out, 2)
        sign[conj, 1] = -1.0
        self.register_buffer("out_sign", sign, persistent=False)
        self.conj = bool(conj.any())

        self.tiles: list[tuple[int, int, int, int]] = []
        bounds = torch.searchsorted(t, torch.arange(0, conv.nlat_out + self.tile_rows, self.tile_rows).clamp(max=conv.nlat_out))
        for i, (t0, t1, a, b) in enumerate(_tiles(t, j, conv.nlat_out, self.tile_rows)):
            s0, s1 = int(bounds[i]), int(bounds[i + 1])
            dense = torch.zeros(self.kernel_size, t1 - t0, b - a, n, dtype=torch.float64)
            dense.index_put_((k[s0:s1], t[s0:s1] - t0, j[s0:s1] - a, lon[s0:s1]), v[s0:s1], accumulate=True)
            h = torch.fft.rfft(dense, dim=-1)  # (K, T, w, M)
            even = h.real[self.even]
            odd = h.imag[self.odd]  # conj(H) = Hr - i Hi: the odd part is -i Hi, the -i a swap applied to the output
            band = (a, b)
            if lat_maps is not None:
                # fold resampling: rows [a, b) of the data grid from latent rows [c, d)
                rows = lat_maps[:, a:b]  # (2, w, nlat_latent): [m with the pole terms, other m]
                cols = rows.abs().sum(dim=(0, 1)).nonzero().flatten()
                c, d = (int(cols.min()), int(cols.max()) + 1) if cols.numel() else (0, 1)
                rows = rows[:, :, c:d]
                pole = (src == 0).long()  # wavenumbers reading the latent m = 0 (the expanded pole rows count)
                r_m = rows[1 - pole]  # (M, w, w_l)
                scale = lon_factor.view(-1, 1, 1)
                even = torch.einsum("ktwm,mwv->ktvm", even, r_m * scale)
                odd_sign = torch.where(conj, -1.0, 1.0).to(torch.float64).view(-1, 1, 1)
                odd = torch.einsum("ktwm,mwv->ktvm", odd, r_m * scale * odd_sign)
                band = (c, d)
            # (M, T, w * Kv): row t, columns (input row, basis function: even ones, then odd ones) as the input is laid out
            table = torch.cat([even, odd]).permute(3, 1, 2, 0).reshape(m_out, t1 - t0, -1)
            self.register_buffer(f"table_{i}", table.float().contiguous(), persistent=False)
            self.tiles.append((t0, t1, *band))

    def parity_lists(self) -> list[list[int]]:
        """The basis functions of each parity present: [even] and / or [odd] (the tables' column order)."""
        return [idx for idx in (self.even, self.odd) if idx]

    def extra_repr(self) -> str:
        return (
            f"in_shape={(self.nlat_in, self.nlon_in)}, out_shape={(self.nlat_out, self.nlon)}, out_chans={self.out_channels}, "
            f"groups={self.groups}, even={self.even}, odd={self.odd}, tiles={len(self.tiles)}"
        )

    def contract(self, x: torch.Tensor) -> torch.Tensor:
        """Channel / basis contraction in Fourier space, the input of the band GEMMs: (M, H, Kv, B * O * 2).

        The odd basis functions' -i (conj(H) = -i Im H for them) is applied here, to the input, so that every
        basis function's table is one real matrix and each tile is one GEMM."""
        bsz, _, h, w = x.shape
        g, og = self.groups, self.out_channels // self.groups
        xh = torch.view_as_real(torch.fft.rfft(x, dim=-1))  # (B, C, H, M, 2)
        m_in = xh.shape[-2]
        weight = self.weight.view(g, og, self.groupsize, self.kernel_size)
        parts = []
        for basis, xin in ((self.even, xh), (self.odd, torch.stack((xh[..., 1], -xh[..., 0]), dim=-1))):
            if not basis:
                continue
            wv = weight[..., basis].permute(0, 3, 1, 2).reshape(g, -1, self.groupsize)  # (G, Kp * Og, Cg)
            u = torch.matmul(wv, xin.reshape(bsz, g, self.groupsize, h * m_in * 2))  # one GEMM per (batch, group)
            parts.append(u.view(bsz, g, len(basis), og, h, m_in, 2).permute(5, 4, 2, 0, 1, 3, 6))
        u = torch.cat(parts, dim=2)  # (M, H, Kv, B, G, Og, 2), one copy
        if self.lon_source.numel() != m_in or self.conj:
            u = u.index_select(0, self.lon_source)  # the latent wavenumber each output wavenumber reads
        return u.reshape(u.shape[0], h, u.shape[2], -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        with torch.autocast(x.device.type, enabled=False):  # FFTs and tables in float32, as torch-harmonics computes
            x = x.float()
            if self.lon_source.numel() == self.nlon // 2 + 1 and not self.conj and x.shape[-1] == self.nlon:  # same wavenumbers
                return self._forward_same_grid(x).to(dtype)
            u = self.contract(x)
            tables = [getattr(self, f"table_{i}") for i in range(len(self.tiles))]
            y = _Bands.apply(u, tables, self.tiles, self.out_sign if self.conj else None, x.shape[0], self.out_channels)
            return torch.fft.irfft(torch.view_as_complex(y), n=self.nlon, dim=-1).to(dtype)

    def _forward_same_grid(self, x: torch.Tensor) -> torch.Tensor:
        """Same longitudes in and out: (real, imaginary) parts as GEMM rows, the contracted spectrum in the band GEMMs'
        layout straight from the weight GEMM (no permuted copy of it), one autograd node with a hand-written backward."""
        bsz, _, h, _ = x.shape
        g, cg = self.groups, self.groupsize
        xh = torch.view_as_real(torch.fft.rfft(x, dim=-1))  # (B, C, H, M, 2)
        m = xh.shape[3]
        xt = xh.view(bsz, g, cg, h, m, 2).permute(1, 0, 4, 5, 3, 2).contiguous()  # (G, B, M, 2, H, Cg)
        y = _SameGridBands.apply(xt, self.weight, self)  # (G, B, M, 2, H_out, Og)
        y = y.permute(1, 0, 5, 4, 2, 3).reshape(bsz, self.out_channels, self.nlat_out, m, 2).contiguous()
        return torch.fft.irfft(torch.view_as_complex(y), n=self.nlon, dim=-1)


#: bytes of the contracted spectrum held at once by the same-grid layer (wavenumbers are processed in chunks of about
#: this size: it stays in cache between the weight GEMM and the band GEMMs, and is never allocated whole)
CHUNK_BYTES = 4 << 20


class _SameGridBands(torch.autograd.Function):
    """Weight GEMM(s) then band GEMMs, as one autograd node: ``xt`` (G, B, M, 2, H, Cg) -> (G, B, M, 2, H_out, Og).

    Per chunk of wavenumbers, the contracted spectrum ``u`` (m, 2, H, Kv, Og) is written by the weight GEMMs (even
    basis functions from the input, odd ones from the input with its parts swapped, ``-i X``) into one buffer whose
    per-(m, part) matrices ((input row, basis function) x Og) the band GEMMs read as strided views. Backward, per
    chunk: the transposed band GEMMs (written where a row is first reached, accumulated where tiles overlap: no
    zero-filled gradient), then the weight and input gradients as GEMMs. Only ``xt`` is saved."""

    @staticmethod
    def forward(ctx, xt, weight, layer):  # noqa: ANN001, ANN205 (autograd.Function signature)
        g, bsz, m, _, h, cg = xt.shape
        og, kv = layer.out_channels // layer.groups, len(layer.even) + len(layer.odd)
        wks = _basis_weights(weight.detach(), layer)
        tables = [getattr(layer, f"table_{i}") for i in range(len(layer.tiles))]
        y = xt.new_empty(g, bsz, m, 2, layer.nlat_out, og)
        for gi, bi, m0, m1 in _chunks(xt.shape, kv * og):
            u = xt.new_empty((m1 - m0) * 2 * h, kv * og)
            for (basis, c0), src in zip(wks, _sources(xt[gi, bi, m0:m1], layer), strict=True):
                torch.mm(src.reshape(-1, cg), basis[gi], out=u[:, c0 : c0 + basis.shape[-1]])
            u = u.view(m1 - m0, 2, h * kv, og)
            for table, (t0, t1, a, b) in zip(tables, layer.tiles, strict=True):
                for r in range(2):
                    if b > a:
                        y[gi, bi, m0:m1, r, t0:t1] = torch.bmm(table[m0:m1], u[:, r, a * kv : b * kv])
                    else:
                        y[gi, bi, m0:m1, r, t0:t1] = 0.0
        ctx.save_for_backward(xt, weight)
        ctx.layer = layer
        return y

    @staticmethod
    def backward(ctx, gy):  # noqa: ANN001, ANN205
        xt, weight = ctx.saved_tensors
        layer = ctx.layer
        g, bsz, m, _, h, cg = xt.shape
        og, kv = layer.out_channels // layer.groups, len(layer.even) + len(layer.odd)
        wks = _basis_weights(weight, layer)
        tables = [getattr(layer, f"table_{i}") for i in range(len(layer.tiles))]
        gy = gy.contiguous()
        gws = [torch.zeros_like(basis) for basis, _ in wks]  # (G, Cg, Kb * Og)
        gx = torch.empty_like(xt) if ctx.needs_input_grad[0] else None
        for gi, bi, m0, m1 in _chunks(xt.shape, kv * og):
            gu = gy.new_empty(m1 - m0, 2, h * kv, og)
            sliced = [t[m0:m1] for t in tables]
            for r in range(2):
                _transposed_bands(gu[:, r], gy[gi, bi, m0:m1, r], sliced, layer.tiles, kv, h)
            gu = gu.view(-1, kv * og)
            gxc = None
            swaps = [False] * bool(layer.even) + [True] * bool(layer.odd)  # the odd basis functions read -i X
            for (basis, c0), gw, src, swapped in zip(wks, gws, _sources(xt[gi, bi, m0:m1], layer), swaps, strict=True):
                gk = gu[:, c0 : c0 + basis.shape[-1]]
                if ctx.needs_input_grad[1]:
                    gw[gi].addmm_(src.reshape(-1, cg).t(), gk)
                if gx is not None:
                    gs = torch.mm(gk, basis[gi].t()).view(m1 - m0, 2, h, cg)
                    if swapped:  # adjoint of (re, im) -> (im, -re)
                        gs = torch.stack((-gs[:, 1], gs[:, 0]), dim=1)
                    gxc = gs if gxc is None else gxc.add_(gs)
            if gx is not None:
                gx[gi, bi, m0:m1] = gxc
        gweight = None
        if ctx.needs_input_grad[1]:
            gweight = torch.zeros(g, og, cg, layer.kernel_size, dtype=weight.dtype, device=weight.device)
            for gw, idx in zip(gws, layer.parity_lists(), strict=True):
                gweight[..., idx] = gw.view(g, cg, len(idx), og).permute(0, 3, 1, 2)
            gweight = gweight.view_as(weight)
        return gx, gweight, None


def _basis_weights(weight: torch.Tensor, layer: FourierDisco) -> list[tuple[torch.Tensor, int]]:
    """(weights (G, Cg, Kb * Og), first column in u) of the even, then the odd basis functions present."""
    g, og, cg = layer.groups, layer.out_channels // layer.groups, layer.groupsize
    w = weight.view(g, og, cg, layer.kernel_size)
    out, c0 = [], 0
    for idx in layer.parity_lists():
        out.append((w[..., idx].permute(0, 2, 3, 1).reshape(g, cg, len(idx) * og), c0))
        c0 += len(idx) * og
    return out


def _sources(xc: torch.Tensor, layer: FourierDisco) -> list[torch.Tensor]:
    """The input parts each parity reads: (m, 2, H, Cg) as is for the even basis functions, -i times it for the odd."""
    return [x for x, idx in ((xc, layer.even), (_swap_parts(xc) if layer.odd else None, layer.odd)) if idx]


def _chunks(shape: torch.Size, per_point: int) -> list[tuple[int, int, int, int]]:
    """(group, batch, m0, m1): wavenumber chunks whose contracted spectrum is about CHUNK_BYTES."""
    g, bsz, m, _, h, _ = shape
    step = max(1, CHUNK_BYTES // (4 * 2 * h * per_point))
    return [(gi, bi, m0, min(m0 + step, m)) for gi in range(g) for bi in range(bsz) for m0 in range(0, m, step)]


def _swap_parts(xc: torch.Tensor) -> torch.Tensor:
    """-i X on (m, 2, H, C) parts: (re, im) -> (im, -re)."""
    return torch.stack((xc[:, 1], -xc[:, 0]), dim=1)


class _Bands(torch.autograd.Function):
    """The band GEMMs of all tiles as one autograd node, writing the (B, O, nlat_out, M, 2) spectrum the irfft reads.

    The tables are constants. Forward writes each tile's GEMM into one (M, nlat_out, B * O * 2) buffer, permuted once
    at the end; backward permutes the gradient once and runs the transposed GEMMs, written where an input row is
    first reached and accumulated where tiles overlap (no zero-filled gradient, no per-tile copies)."""

    @staticmethod
    def forward(ctx, u, tables, tiles, sign, batch, channels):  # noqa: ANN001, ANN205 (autograd.Function signature)
        m, h, kv, n = u.shape
        hout = tiles[-1][1]
        u = u.view(m, h * kv, n)
        yt = u.new_empty(m, hout, n)
        for table, (t0, t1, a, b) in zip(tables, tiles, strict=True):
            if b > a:
                yt[:, t0:t1] = torch.bmm(table, u[:, a * kv : b * kv])
            else:
                yt[:, t0:t1] = 0.0
        y = yt.view(m, hout, batch, channels, 2).permute(2, 3, 1, 0, 4)
        y = y * sign if sign is not None else y.contiguous()
        ctx.tables, ctx.tiles, ctx.sign, ctx.u_shape = tables, tiles, sign, (m, h, kv, n)
        return y

    @staticmethod
    def backward(ctx, gy):  # noqa: ANN001, ANN205
        if ctx.sign is not None:
            gy = gy * ctx.sign
        m, h, kv, n = ctx.u_shape
        gt = gy.permute(3, 2, 0, 1, 4).reshape(m, -1, n)  # (M, nlat_out, B * O * 2), one copy
        gu = gt.new_empty(m, h * kv, n)
        _transposed_bands(gu, gt, ctx.tables, ctx.tiles, kv, h)
        return gu.view(ctx.u_shape), None, None, None, None, None


def _transposed_bands(gu: torch.Tensor, gy: torch.Tensor, tables: list[torch.Tensor], tiles: list, kv: int, h: int) -> None:
    """``gu`` (batch, h * kv, n) = sum over tiles of table^T @ ``gy`` rows of the tile, without zero-filling ``gu``: rows
    first reached by a tile are written, rows an earlier tile reached accumulated, rows no tile reaches zeroed."""
    done = 0  # rows [0, done) of gu written
    for table, (t0, t1, a, b) in zip(tables, tiles, strict=True):
        if b <= a:
            continue
        tt, src = table.transpose(1, 2), gy[:, t0:t1]  # (M, w * Kv, T), (M, T, n)
        if a > done:
            gu[:, done * kv : a * kv] = 0.0
        lo = max(a, done)
        if lo > a:  # already reached by an earlier tile: accumulate (bmm to a temporary: baddbmm_ on a strided view loops)
            gu[:, a * kv : lo * kv] += torch.bmm(tt[:, : (lo - a) * kv], src)
        if b > lo:
            gu[:, lo * kv : b * kv] = torch.bmm(tt[:, (lo - a) * kv :], src)
        done = max(done, b)
    if done < h:
        gu[:, done * kv :] = 0.0


def _latitude_maps(resample: nn.Module) -> torch.Tensor:
    """torch-harmonics' latitude interpolation (pole expansion included) as matrices (2, nlat_out, nlat_in), float64:
    [0] for the latent wavenumber 0 (the expanded pole rows are the mean of the first / last row), [1] for the others
    (the mean along longitude has no other wavenumber)."""
    nlat_in, nlat_out = resample.nlat_in, resample.nlat_out
    idx = resample.lat_idx.cpu()
    wgt = resample.lat_weights.cpu().flatten().to(torch.float64)  # the float32 weights torch-harmonics applies
    ext = nlat_in + (2 if resample.expand_poles else 0)
    lerp = torch.zeros(nlat_out, ext, dtype=torch.float64)
    rows = torch.arange(nlat_out)
    lerp.index_put_((rows, idx), 1.0 - wgt, accumulate=True)
    lerp.index_put_((rows, idx + 1), wgt, accumulate=True)
    maps = []
    for pole_terms in (True, False):
        if resample.expand_poles:
            expand = torch.zeros(ext, nlat_in, dtype=torch.float64)
            expand[1:-1] = torch.eye(nlat_in, dtype=torch.float64)
            if pole_terms:
                expand[0, 0] = 1.0
                expand[-1, -1] = 1.0
        else:
            expand = torch.eye(nlat_in, dtype=torch.float64)
        maps.append(lerp @ expand)
    return torch.stack(maps)


def _longitude_upsampling(resample: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """torch-harmonics' longitude interpolation in Fourier space: for each output wavenumber m, the latent rfft index it
    reads, whether conjugated (a negative latent frequency), and a real factor. Raises where the interpolation is not
    of that form (output longitudes not an integer multiple of the input's, or shifted grids)."""
    n_in, n_out = resample.nlon_in, resample.nlon_out
    if n_out % n_in != 0:
        raise ValueError(f"the fused Fourier decoder needs nlon_out ({n_out}) to be a multiple of nlon_in ({n_in})")
    left, right = resample.lon_idx_left.cpu(), resample.lon_idx_right.cpu()
    w = resample.lon_weights.cpu().to(torch.float64)
    interp = torch.zeros(n_out, n_in, dtype=torch.float64)
    rows = torch.arange(n_out)
    interp.index_put_((rows, left), 1.0 - w, accumulate=True)
    interp.index_put_((rows, right), w, accumulate=True)
    m_out = n_out // 2 + 1
    # T[m, n]: output rfft coefficient m from the full latent DFT coefficient n
    q = torch.arange(n_in, dtype=torch.float64)
    basis = torch.exp(2j * math.pi * torch.outer(q, torch.arange(n_in, dtype=torch.float64)) / n_in) / n_in  # (q, n)
    full = torch.fft.fft(interp.to(torch.complex128) @ basis, dim=0)[:m_out]  # (m, n)
    m = torch.arange(m_out)
    n = m % n_in
    factor = full[m, n]
    rest = full.clone()
    rest[m, n] = 0
    scale = full.abs().max()
    # the imaginary part is the float32 rounding of torch-harmonics' weights (e.g. 1/3), ~1e-8: dropped
    if rest.abs().max() > 1e-6 * scale or factor.imag.abs().max() > 1e-6 * scale:
        raise ValueError("the resampling's longitude interpolation is not a real factor per wavenumber (shifted grids?)")
    conj = n > n_in // 2
    src = torch.where(conj, n_in - n, n)
    return src, conj, factor.real
