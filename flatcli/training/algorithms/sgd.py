"""Plain SGD (with torch.optim.SGD's momentum, Nesterov and weight decay)."""
import torch

from flatcli.training.algorithms.base import Algorithm


class SGDAlgorithm(Algorithm):
    """One minibatch gradient, one ``torch.optim.SGD`` step."""

    def __init__(self, models, ids, cfg, batch, device, dist=None, global_batch: int = 1):
        super().__init__(models, ids, cfg, batch, device, dist, global_batch)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                         nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)

    def step(self):
        sums = self.gradient()
        self.optimizer.step()
        return sums
