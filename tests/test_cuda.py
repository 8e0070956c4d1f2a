"""The library on a CUDA device: the same training as on the CPU (skipped where torch sees no GPU; run on a lent
GPU machine by benchmarks/gpu_check.sh)."""
import copy

import pytest
import torch
from torch import nn

import oialr
from oialr import OIALR, OIALRConfig
from models import MODELS, batches

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no CUDA device")


def run(model, device, data):
    """Train ``model`` on ``device`` through the transition, two basis updates and a rank cut; the losses, the ranks
    and the compact export's output on the first batch."""
    model = model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ctl = OIALR(model, opt, OIALRConfig(warmup_steps=3, update_every=3, cutoff=0.2))
    losses = []
    for x, y in data:
        x, y = x.to(device), y.to(device)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        ctl.step()
        losses.append(loss.item())
    ranks = {name: layer.rank for name, layer in ctl.lowrank_layers().items()}
    model.eval()
    x = data[0][0].to(device)
    with torch.no_grad():
        factored = model(x)
        exported = oialr.compact_lowrank(model)(x)
    assert all(p.device.type == torch.device(device).type for p in model.parameters())
    return losses, ranks, factored.cpu(), exported.cpu()


@pytest.mark.parametrize("name,build,shape,n_out", MODELS, ids=[m[0] for m in MODELS])
def test_cuda_trains_as_the_cpu(name, build, shape, n_out):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    model = build()
    data = batches(shape, n_out, 10)
    cpu = run(copy.deepcopy(model), "cpu", data)
    gpu = run(model, "cuda", data)
    assert gpu[1] == cpu[1]                                         # the same ranks after the cut
    torch.testing.assert_close(torch.tensor(gpu[0]), torch.tensor(cpu[0]), rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(gpu[2], cpu[2], rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(gpu[3], gpu[2], rtol=1e-4, atol=1e-5)  # the export computes the same function
