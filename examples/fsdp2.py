"""DP training of a model sharded by FSDP2 (torch.distributed.fsdp.fully_shard): each rank holds a
shard of every layer's weights; dpspeed reduce-scatters the clipped sums to their shards and adds
the noise once per coordinate.

    torchrun --nproc_per_node 2 examples/fsdp2.py
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader, TensorDataset

from dpspeed import PrivacyEngine

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--epochs", type=int, default=2)
args = parser.parse_args()

cuda = torch.cuda.is_available()
dist.init_process_group("nccl" if cuda else "gloo")
device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")

generator = torch.Generator().manual_seed(0)
x, y = torch.randn(512, 32, generator=generator), torch.randint(0, 4, (512,), generator=generator)
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(32, 128), nn.LayerNorm(128), nn.Tanh(), nn.Linear(128, 4)).to(device)
for layer in (model[0], model[3]):
    fully_shard(layer)
fully_shard(model)
engine = PrivacyEngine()
model, optimizer, loader = engine.make_private(
    module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
    data_loader=DataLoader(TensorDataset(x, y), batch_size=64), noise_multiplier=1.0, max_grad_norm=1.0,
    clipping_mode="bk",
)
for epoch in range(args.epochs):
    for xb, yb in loader:
        nn.functional.cross_entropy(model(xb.to(device)), yb.to(device)).backward()
        optimizer.step()
        optimizer.zero_grad()
    if dist.get_rank() == 0:
        print(f"epoch {epoch + 1}: epsilon {engine.get_epsilon(1e-5):.2f}, weights sharded over {dist.get_world_size()}")
dist.barrier()  # every rank done before the group goes
dist.destroy_process_group()
