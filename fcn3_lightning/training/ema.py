"""An exponential moving average of a network's trainable weights (``model.ema_decay``).

After every optimizer step ``avg = decay * avg + (1 - decay) * weight``, starting from the weights training starts
with. Frozen parameters are not averaged (they do not change). The average lives in buffers of this module, so a
checkpoint holds it and a resume restores it exactly; :meth:`swap` exchanges it with the network's weights in place
(validation, checkpoints and export use the average; training continues on the raw weights).
"""

from __future__ import annotations

import torch
from torch import nn


def _buffer_name(param: str) -> str:
    return param.replace(".", "__")


class WeightAverage(nn.Module):
    """The moving average of ``net``'s parameters that require gradients, as buffers named after them."""

    def __init__(self, net: nn.Module, decay: float):
        super().__init__()
        if not 0.0 < decay < 1.0:
            raise ValueError(f"model.ema_decay must lie in (0, 1), got {decay}")
        self.decay = float(decay)
        self.names = [n for n, p in net.named_parameters() if p.requires_grad]
        params = dict(net.named_parameters())
        for n in self.names:
            self.register_buffer(_buffer_name(n), params[n].detach().clone())

    def averaged(self) -> dict[str, torch.Tensor]:
        """The averaged tensors by parameter name."""
        return {n: getattr(self, _buffer_name(n)) for n in self.names}

    @torch.no_grad()
    def update(self, net: nn.Module) -> None:
        params = dict(net.named_parameters())
        for n in self.names:
            getattr(self, _buffer_name(n)).lerp_(params[n].detach(), 1.0 - self.decay)

    @torch.no_grad()
    def swap(self, net: nn.Module) -> None:
        """Exchange the average and ``net``'s weights (twice restores both)."""
        params = dict(net.named_parameters())
        for n in self.names:
            buf, p = getattr(self, _buffer_name(n)), params[n]
            tmp = p.detach().clone()
            p.copy_(buf)
            buf.copy_(tmp)

    def checkpoint_keys(self, prefix: str, net_prefix: str) -> list[tuple[str, str]]:
        """(buffer key, network key) pairs as they appear in a LightningModule's state dict."""
        return [(f"{prefix}{_buffer_name(n)}", f"{net_prefix}{n}") for n in self.names]
