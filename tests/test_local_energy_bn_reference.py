"""local-energy --bn recompute measures the noise alone: the σ = 0 reference is the unperturbed net with its
BatchNorm statistics recomputed on the same batches as every draw, so δε = 0 at σ = 0 and δ ≈ 0 at σ = 1e-6,
while the stored-statistics values (which differ here) are reported apart, in the JSON too."""
import json

import numpy as np
import pytest
import torch
from torch import nn

from clitools import invoke
from flatcli.measure.local_energy import local_energy

pytestmark = pytest.mark.usefixtures("one_thread")

BN_NET = """from torch import nn

def bn_net():
    return nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
"""


def bn_net_and_data():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(200, 4, generator=g), torch.randint(0, 3, (200,), generator=g)
    net.train()
    with torch.no_grad():  # stored statistics from shifted, scaled inputs: far from what recompute finds
        for _ in range(3):
            net(torch.randn(64, 4, generator=g) * 3 + 2)
        net[3].weight.mul_(5)  # confident outputs: the statistics matter to the loss
    return net.eval(), (x, y)


def test_recompute_reference_gives_zero_rise_at_zero_and_tiny_noise():
    net, data = bn_net_and_data()
    r = local_energy(net, data, [0.0, 1e-6, 0.3], samples=4, bn="recompute", batch_size=50, bn_batches=4)
    stored = local_energy(net, data, [0.0, 1e-6], samples=4, bn="eval", batch_size=50)
    assert abs(r.stored_loss - r.loss) > 0.02  # the two references really differ on this net
    assert r.stored_loss == pytest.approx(stored.loss, rel=1e-6) and r.stored_error == stored.error
    p0, tiny, big = r.points
    assert (p0.delta_error, p0.delta_loss) == (0.0, 0.0) and p0.loss_mean == r.loss
    assert tiny.delta_error == 0.0 and abs(tiny.delta_loss) < 1e-5  # against stored statistics: > 0.02
    assert abs(big.delta_loss) > 1e-3  # real noise does move it
    assert stored.points[1].delta_error == 0.0 and abs(stored.points[1].delta_loss) < 1e-5


def test_cli_json_carries_both_references(tmp_path, monkeypatch):
    net, (x, y) = bn_net_and_data()
    torch.save(net.state_dict(), tmp_path / "bn.pt")
    np.savez(tmp_path / "d.npz", x=x.numpy(), y=y.numpy())
    (tmp_path / "le_bn.py").write_text(BN_NET)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    result = invoke("local-energy", "bn.pt", "--model", "le_bn:bn_net", "--data", "d.npz", "--sigmas", "0,1e-6",
                    "--samples", 3, "--bn", "recompute", "--batch-size", 50, "--device", "cpu", "--json", "-")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    (details,) = report["settings"]["per_checkpoint"]
    assert abs(details["stored_loss"] - details["loss"]) > 0.02 and "stored_error" in details
    zero, tiny = report["rows"]
    assert zero["delta_error"] == 0.0 and zero["delta_loss"] == 0.0 and zero["loss_mean"] == details["loss"]
    assert tiny["delta_error"] == 0.0 and abs(tiny["delta_loss"]) < 1e-5
