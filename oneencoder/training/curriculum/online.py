"""Learned, online difficulty: predict each pair's current loss from its frozen features.

A sample's observed loss goes stale as soon as the model moves on, and a self-paced
curriculum never re-observes the samples it keeps out. ``LossPredictor`` learns the
map *frozen features → current loss* from the losses the trainer does observe, so
every sample can be scored at any step without a forward pass of the model.

Example:
    >>> predictor = LossPredictor(torch.cat([image_pooled, text_pooled], dim=1), seed=0)
    >>> predictor.observe(index, out["per_sample"])     # after each training step
    >>> difficulty = predictor.predict()                # [N] predicted loss
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LossPredictor:
    """A small MLP regressing the per-sample loss from pooled frozen features, trained online.

    Features are standardised once; targets are standardised with running moments so the
    MLP's output stays O(1) while the loss level drifts during training. Predictions are
    in loss units again, so they compare directly with observed losses.

    Args:
        features: ``[N, D_a + D_b]`` pooled frozen features of both modalities.
        hidden: Width of the MLP's hidden layer.
        lr: Adam learning rate.
        steps: Gradient steps per ``observe`` call.
        momentum: Momentum of the running target moments.
        seed: Seed of the MLP's initialisation (the global RNG is left untouched).
    """

    def __init__(self, features: torch.Tensor, hidden: int = 64, lr: float = 3e-3, steps: int = 1,
                 momentum: float = 0.9, seed: int = 0) -> None:
        if features.ndim != 2 or features.shape[0] < 1:
            raise ValueError(f"features must be [N, D] with N >= 1, got {tuple(features.shape)}")
        x = features.detach().float()
        self.x = (x - x.mean(0)) / x.std(0, unbiased=False).clamp(min=1e-6)
        self.steps = int(steps)
        self.momentum = float(momentum)
        with torch.random.fork_rng(devices=[]):  # deterministic init without touching global RNG
            torch.manual_seed(seed)
            self.net = nn.Sequential(nn.Linear(x.shape[1], hidden), nn.GELU(), nn.Linear(hidden, 1))
        self.net.to(self.x.device)
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=lr)
        # Running target moments and the number of observe calls (0 = never trained).
        self.moments = torch.tensor([0.0, 1.0])
        self.updates = torch.tensor(0)

    @property
    def n(self) -> int:
        return self.x.shape[0]

    @property
    def trained(self) -> bool:
        return int(self.updates) > 0

    def _update_moments(self, y: torch.Tensor) -> None:
        mean, std = float(y.mean()), float(y.std(unbiased=False))
        if not self.trained:
            self.moments = torch.tensor([mean, max(std, 1e-3)])
            return
        m = self.momentum
        self.moments = torch.tensor([m * float(self.moments[0]) + (1 - m) * mean,
                                     max(1e-3, m * float(self.moments[1]) + (1 - m) * std)])

    def observe(self, index: torch.Tensor, losses: torch.Tensor) -> float:
        """Train on observed per-sample losses; returns the (standardised) regression loss."""
        index = torch.as_tensor(index, device=self.x.device).long().reshape(-1)
        y = torch.as_tensor(losses, device=self.x.device).detach().float().reshape(-1)
        self._update_moments(y.cpu())
        target = (y - float(self.moments[0])) / float(self.moments[1])
        self.net.train()
        for _ in range(self.steps):
            pred = self.net(self.x[index]).squeeze(1)
            loss = F.mse_loss(pred, target)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        self.updates += 1
        return float(loss.detach())

    @torch.no_grad()
    def predict(self, index: torch.Tensor | None = None) -> torch.Tensor:
        """Predicted loss of the samples ``index`` (all samples if None), on the CPU."""
        x = self.x if index is None else self.x[torch.as_tensor(index, device=self.x.device).long()]
        self.net.eval()
        return (self.net(x).squeeze(1) * self.moments[1].to(x.device) + self.moments[0].to(x.device)).cpu()

    # ----- resume (tensors only, for safetensors) ---------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"net.{k}": v.detach().cpu().clone() for k, v in self.net.state_dict().items()}
        for pid, slots in self.optimizer.state_dict()["state"].items():
            state.update({f"adam.{pid}.{k}": torch.as_tensor(v).cpu().clone() for k, v in slots.items()})
        state["moments"], state["updates"] = self.moments.clone(), self.updates.clone()
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        device = self.x.device
        self.net.load_state_dict({k[4:]: v.to(device) for k, v in state.items() if k.startswith("net.")})
        opt = self.optimizer.state_dict()
        opt["state"] = {}
        for key, value in state.items():
            if key.startswith("adam."):
                _, pid, slot = key.split(".", 2)
                opt["state"].setdefault(int(pid), {})[slot] = value if slot == "step" else value.to(device)
        self.optimizer.load_state_dict(opt)
        self.moments, self.updates = state["moments"].clone(), state["updates"].clone()
