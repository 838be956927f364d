"""Stochastic depth in a plain PyTorch training loop: the torch-only core, no Lightning Trainer.

Steps, all with functions of ``lightning_sd.core`` (which never imports Lightning):

1. ``inject_stochastic_depth(model, lambda L: survival_rates("linear", L, budget), drop="batch")``
   puts a gate on each of the 9 residual branches of a CIFAR ResNet-20 (1 input channel); in
   training mode every forward draws a new mask and skips the dropped blocks.
2. ``estimate_sensitivities`` measures S_l = dLoss/dm_l on a few training batches at the start, and
   ``survival_rates("sensemode", L, budget, sensitivities=S, p_min=...)`` turns them into rates for the
   same budget (Hayou & Ayed 2021, section 5); ``handle.set_survival`` installs them.
3. An ordinary loop (SGD, cosine schedule) on scikit-learn's digits, loaded with
   ``sklearn.datasets.load_digits`` directly; evaluation in ``model.eval()`` (with the default
   ``scaling="inverted"`` the evaluation network is the plain network).
4. ``handle.remove()`` takes the gates out: the ``state_dict`` loads into a freshly built plain
   model (strict), which gives the same logits and test accuracy.

    OMP_NUM_THREADS=1 python examples/plain_pytorch.py               # ~20 s on one CPU core
    OMP_NUM_THREADS=1 python examples/plain_pytorch.py --budget 0.7 --epochs 20
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import Tensor, nn

from lightning_sd.core import estimate_sensitivities, inject_stochastic_depth, supervised_loss, survival_rates
from lightning_sd.models import CifarResNet


def digits_tensors(seed: int = 0, test_fraction: float = 0.2) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(x_train, y_train, x_test, y_test): 8x8 digits as 1x8x8 images, standardised with training statistics."""
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    num_test = round(len(y) * test_fraction)
    test, train = perm[:num_test], perm[num_test:]
    mean, std = x[train].mean(), x[train].std()
    x = (x - mean) / std
    return x[train], y[train], x[test], y[test]


def batches(x: Tensor, y: Tensor, batch_size: int, generator: torch.Generator | None = None) -> list[tuple[Tensor, Tensor]]:
    order = torch.randperm(len(y), generator=generator) if generator is not None else torch.arange(len(y))
    return [(x[i], y[i]) for i in order.split(batch_size)]


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor) -> tuple[float, Tensor]:
    """Accuracy and logits in evaluation mode."""
    model.eval()
    logits = torch.cat([model(xb) for xb, _ in batches(x, y, 256)])
    return float((logits.argmax(dim=1) == y).float().mean()), logits


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description="Stochastic depth from a plain PyTorch loop (digits, CIFAR ResNet-20)")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--budget", type=float, default=0.5, help="expected fraction of the 9 blocks kept, (0, 1]")
    parser.add_argument("--p-min", type=float, default=0.1, help="smallest SenseMode rate (> 0: inverted scaling divides by p)")
    parser.add_argument("--sensitivity-batches", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    x_train, y_train, x_test, y_test = digits_tensors(args.seed)

    def build() -> nn.Module:
        return CifarResNet(20, num_classes=10, in_channels=1, stable=True)

    model = build()

    # 1. gates on every residual branch, linear rates for the budget to start with
    handle = inject_stochastic_depth(model, lambda L: survival_rates("linear", L, args.budget), drop="batch", seed=args.seed)
    print(f"{handle.num_blocks} residual branches: {', '.join(b.name for b in handle.branches)}")
    print("linear rates:    " + " ".join(f"{p:.2f}" for p in handle.survival.tolist()))

    # 2. SenseMode: sensitivities on a few training batches (train mode: the loss the steps see)
    model.train()
    probe = batches(x_train, y_train, args.batch_size)[: args.sensitivity_batches]
    S = estimate_sensitivities(model, probe, supervised_loss(F.cross_entropy))
    rates = survival_rates("sensemode", handle.num_blocks, args.budget, sensitivities=S, p_min=args.p_min)
    handle.set_survival(rates)
    print("sensitivities:   " + " ".join(f"{s:+.3f}" for s in S.tolist()))
    print(f"sensemode rates: {' '.join(f'{p:.2f}' for p in handle.survival.tolist())}  (sum {float(handle.survival.sum()):.3f} = {args.budget} x {handle.num_blocks})")

    # 3. an ordinary training loop; each training-mode forward draws a new mask
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-4)
    steps_per_epoch = -(-len(y_train) // args.batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs * steps_per_epoch)
    shuffle = torch.Generator().manual_seed(args.seed)
    kept_blocks = 0
    num_steps = 0
    start = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        total = 0.0
        for xb, yb in batches(x_train, y_train, args.batch_size, shuffle):
            loss = F.cross_entropy(model(xb), yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += loss.item() * len(yb)
            kept_blocks += int(handle.kept.sum())
            num_steps += 1
        if epoch % 5 == 4 or epoch == args.epochs - 1:
            acc, _ = evaluate(model, x_test, y_test)
            print(f"epoch {epoch + 1:3d}  train loss {total / len(y_train):.4f}  test acc {acc:.4f}")
    seconds = time.perf_counter() - start
    print(f"training: {seconds:.1f} s, {kept_blocks / num_steps:.2f} of {handle.num_blocks} blocks computed per step on average")

    acc, logits = evaluate(model, x_test, y_test)

    # 4. remove the gates: the plain model, whose state_dict loads into a freshly built one
    handle.remove()
    plain = build()
    plain.load_state_dict(model.state_dict(), strict=True)
    plain_acc, plain_logits = evaluate(plain, x_test, y_test)
    assert np.isclose(plain_acc, acc), (plain_acc, acc)
    assert torch.allclose(plain_logits, logits, atol=1e-5), float((plain_logits - logits).abs().max())
    print(f"plain model after handle.remove(): state_dict loads (strict), same logits, test acc {plain_acc:.4f}")
    print(f"test accuracy: {acc:.4f}")
    return acc


if __name__ == "__main__":
    main()
