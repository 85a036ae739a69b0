"""Train a small MNIST CNN with DistributedDataParallel and normlab's SyncBatchNorm on the CPU (gloo).

    torchrun --standalone --nproc-per-node 2 examples/ddp_mnist.py [--steps 300] [--batch-size 64]

Each rank reads its own shard of the training set (DistributedSampler); the batch-norm layers normalize every
shard with the statistics of the global batch, all ranks' shards together. MNIST comes from normlab.lab.data:
``--data-dir``, ``$NORMLAB_DATA``, the user cache, a download (rank 0 only), else the small sample shipped with
normlab (with a warning). Rank 0 prints the loss and accuracy over the global batch, then the test accuracy.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import normlab.nn as nl
from normlab.distributed import DistributedDataParallel
from normlab.lab.data import load_mnist


def cnn() -> torch.nn.Sequential:
    """(N, 1, 28, 28) images to (N, 10) logits: two conv + fused BN-ReLU + max-pool blocks, then a linear layer."""
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 3, padding=1, bias=False), nl.BatchNorm2d(16, activation="relu"), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(16, 32, 3, padding=1, bias=False), nl.BatchNorm2d(32, activation="relu"), torch.nn.MaxPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(32 * 7 * 7, 10),
    )


def tensors(images, labels) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images (N, 28, 28) and labels (N,) as float32 (N, 1, 28, 28) inputs in [0, 1] and int64 targets."""
    return torch.from_numpy(images.copy()).float().div_(255).unsqueeze(1), torch.from_numpy(labels.copy()).long()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300, help="optimizer steps (default 300)")
    ap.add_argument("--batch-size", type=int, default=64, help="per-rank batch size (default 64)")
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--data-dir", default=None, help="MNIST folder (default: $NORMLAB_DATA, then the user cache)")
    ap.add_argument("--download", action=argparse.BooleanOptionalAction, default=True,
                    help="download missing MNIST files (rank 0); without, fall back to the shipped sample")
    args = ap.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if rank == 0:  # rank 0 fetches what is missing; the others read once it is there
        data = load_mnist(args.data_dir, download=args.download)
    dist.barrier()
    if rank != 0:
        data = load_mnist(args.data_dir, download=False, log=lambda msg: None)
    train = TensorDataset(*tensors(data.train_images, data.train_labels))
    sampler = DistributedSampler(train, num_replicas=world, rank=rank, shuffle=True, seed=0)
    loader = DataLoader(train, batch_size=args.batch_size, sampler=sampler, drop_last=True)

    torch.manual_seed(0)
    model = DistributedDataParallel(nl.SyncBatchNorm.convert_sync_batchnorm(cnn()))
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    if rank == 0:
        print(f"{world} ranks x batch {args.batch_size}, {len(train)} training images ({data.source}); "
              f"{model.module[1]}", flush=True)
    step, epoch, start = 0, 0, time.time()
    while step < args.steps:
        sampler.set_epoch(epoch)
        for x, y in loader:
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if step % args.log_every == 0 or step == args.steps:
                s = torch.tensor([loss.item() * len(y), (logits.argmax(1) == y).sum().item(), len(y)])
                dist.all_reduce(s)  # over the global batch
                if rank == 0:
                    print(f"step {step}/{args.steps}  loss {s[0] / s[2]:.4f}  accuracy {s[1] / s[2]:.3f}  "
                          f"({time.time() - start:.1f} s)", flush=True)
            if step == args.steps:
                break
        epoch += 1

    # eval: the running statistics normalize, no statistics are exchanged; each rank scores its shard of the test set
    model.eval()
    test_x, test_y = tensors(data.test_images, data.test_labels)
    with torch.no_grad():
        correct = (model(test_x[rank::world]).argmax(1) == test_y[rank::world]).sum()
    s = torch.tensor([float(correct), float(len(test_y[rank::world]))])
    dist.all_reduce(s)
    bn = model.module[1]
    theirs = bn.running_var.clone()
    dist.broadcast(theirs, 0)
    if rank == 0:
        print(f"test accuracy {s[0] / s[1]:.4f} on {int(s[1])} images; running statistics identical on every rank: "
              f"{torch.equal(theirs, bn.running_var)}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
