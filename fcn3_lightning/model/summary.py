"""A readable summary of an FCN3 network: grids, widths and parameter counts per part."""

from __future__ import annotations

from torch import nn

from fcn3_lightning.model.fcn3 import FCN3


def count_parameters(module: nn.Module) -> int:
    """Real parameter count: a complex weight counts as two reals."""
    return sum(p.numel() * (2 if p.is_complex() else 1) for p in module.parameters())


def summarize(model: FCN3) -> str:
    rows: list[tuple[str, int]] = []
    for name in ("atmo_encoder", "surf_encoder", "aux_encoder"):
        part = getattr(model, name)
        if part is not None:
            rows.append((name, count_parameters(part)))
    for i, block in enumerate(model.blocks):
        kind = "global (spectral)" if any(p.is_complex() for p in block.filter.parameters()) else "local (DISCO)"
        rows.append((f"block {i}: {kind}", count_parameters(block)))
    for name in ("atmo_decoder", "surf_decoder"):
        part = getattr(model, name)
        if part is not None:
            rows.append((name, count_parameters(part)))
    total = count_parameters(model)
    devices = sorted({p.device.type for p in model.parameters()})
    lines = [
        f"FCN3: data grid {model.inp_shape} -> latent grid {model.latent_shape}",
        f"channels: {model.n_channels} prognostic ({len(model.layout.levels)} levels x {len(model.layout.level_variables)} "
        f"+ {len(model.layout.surface_index)} surface), {len(model.aux_channel_names)} auxiliary "
        f"({len(model.noise_channel_names)} noise)",
        f"latent width {model.latent_channels} (+ {model.aux_embed_dim} auxiliary embedding), {len(model.blocks)} blocks",
        f"parameters on: {', '.join(devices)}",
        "",
    ]
    width = max(len(r[0]) for r in rows)
    lines += [f"  {name:<{width}}  {n:>15,}" for name, n in rows]
    lines += [f"  {'total (real parameters)':<{width}}  {total:>15,}"]
    return "\n".join(lines)
