"""What an engine's owner can do against protected photos: the honest limits of protection.

- ``Purified``: the engine purifies every image (database and queries) with a real
  post-processing before hashing (JPEG q50, a median filter, a resize);
- ``refit_head``: the owner knows the protection and fine-tunes the hash layer of a
  real-recognizer engine so that protected faces get their clean codes back.

``results.limits`` and ``networks.run``'s ``limits`` part measure protections against them.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from . import postprocess
from .recognizers import RecognizerHash

__all__ = ["Purified", "refit_head"]


class Purified(nn.Module):
    """An engine that purifies every image before hashing (``spec``: a real post-processing,
    e.g. ``jpeg:50``, ``median:3``, ``resize:0.5``): a defence the honest-limits rows measure."""

    def __init__(self, model: nn.Module, spec: str):
        super().__init__()
        self.model, self.spec = model, spec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(postprocess.apply(x.detach(), self.spec))

    @torch.no_grad()
    def encode(self, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        return self.model.encode(postprocess.apply(x, self.spec), batch_size)


def refit_head(engine: RecognizerHash, clean: torch.Tensor, protected: torch.Tensor, steps: int = 300,
                seed: int = 0) -> RecognizerHash:
    """The engine's owner fine-tunes its hash layer on protected photos (it knows the
    protection): the projection is trained so that protected faces get their clean codes,
    while clean faces keep theirs."""
    torch.manual_seed(seed)
    with torch.no_grad():
        e_c, e_p = engine.embed(clean), engine.embed(protected)
        b = torch.sign((e_c - engine.center) @ engine.projection)
    proj = engine.projection.clone().requires_grad_(True)
    opt = torch.optim.Adam([proj], lr=1e-3)
    s = float(((e_c - engine.center) @ engine.projection).abs().mean())
    for _ in range(steps):
        u_p, u_c = (e_p - engine.center) @ proj, (e_c - engine.center) @ proj
        loss = (1 - b * torch.tanh(u_p / s)).mean() + (1 - b * torch.tanh(u_c / s)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = RecognizerHash(engine.bits, engine.chip_box, engine.input_size, net=engine.net, aligned=engine.aligned)
    out.center.copy_(engine.center)
    out.projection.copy_(proj.detach())
    return out.eval()
