"""Data-parallel DP training over several processes: run it under torchrun. Each rank Poisson-samples
its share of the data set at the same rate, clips its examples, and dpspeed all-reduces the clipped
sums and adds the noise once; the model is the bare module (no DistributedDataParallel).

    torchrun --nproc_per_node 2 examples/torchrun_data_parallel.py          # gloo on CPUs, nccl on GPUs
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dpspeed import PrivacyEngine

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--epochs", type=int, default=2)
args = parser.parse_args()

cuda = torch.cuda.is_available()
dist.init_process_group("nccl" if cuda else "gloo")
rank = dist.get_rank()
device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")

generator = torch.Generator().manual_seed(0)  # every rank loads the same data set
x, y = torch.randn(1024, 20, generator=generator), torch.randint(0, 4, (1024,), generator=generator)
data = DataLoader(TensorDataset(x, y), batch_size=128)  # the logical batch, over all ranks together

torch.manual_seed(0)  # dpspeed also broadcasts rank 0's initial weights
model = nn.Sequential(nn.Linear(20, 64), nn.Tanh(), nn.Linear(64, 4)).to(device)
engine = PrivacyEngine()
model, optimizer, loader = engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
                                               data_loader=data, noise_multiplier=1.0, max_grad_norm=1.0)
for epoch in range(args.epochs):
    for xb, yb in loader:
        nn.functional.cross_entropy(model(xb.to(device)), yb.to(device)).backward()
        optimizer.step()
        optimizer.zero_grad()
    if rank == 0:
        print(f"epoch {epoch + 1}: epsilon {engine.get_epsilon(1e-5):.2f} over {dist.get_world_size()} processes")
dist.barrier()  # every rank done before the group goes
dist.destroy_process_group()
