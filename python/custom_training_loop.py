"""Drop ``avme_ext.AVMECore`` into your own training loop.

The core is a plain ``nn.Module`` (two LSTMCells, two Linears): you own the loss, the
optimiser and the data. Here: a Bernoulli reconstruction term on the final canvas, the
per-step Gaussian KL from mu/logvar, plus an extra penalty of our own on the per-step canvases.
It runs the fused CUDA kernels on a GPU (when the extension is built) and the pure-PyTorch
reference on the CPU.

    python python/custom_training_loop.py                 # CPU, small sizes, a few seconds
    python python/custom_training_loop.py --device cuda --data-dim 784 --hidden 400 --latent 100 --steps 12
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from avme_ext.core import AVMECore


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--data-dim", type=int, default=64, help="D, pixels (default 64 = 8x8)")
    parser.add_argument("--hidden", type=int, default=32, help="He = Hd, LSTM units")
    parser.add_argument("--latent", type=int, default=8, help="Z, latent size per step")
    parser.add_argument("--steps", type=int, default=4, help="K, drawing steps")
    parser.add_argument("--classes", type=int, default=0, help="C, condition on one-hot labels (0: no)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    core = AVMECore(
        data_dim=args.data_dim,
        num_classes=args.classes,
        enc_hidden=args.hidden,
        dec_hidden=args.hidden,
        latent_dim=args.latent,
        steps=args.steps,
        device=device,
    )
    print(f"AVMECore running {core.resolved_impl(device)!r} on {device}: {core.extra_repr()}")
    optimizer = torch.optim.Adam(core.parameters(), lr=args.lr)

    # Toy data: random binary "images" with a fixed structure per class, so there is something to learn.
    num_protos = max(args.classes, 4)
    protos = (torch.rand(num_protos, args.data_dim, device=device) < 0.3).float()

    start = time.perf_counter()
    for it in range(1, args.iters + 1):
        labels = torch.randint(0, num_protos, (args.batch,), device=device)
        flips = (torch.rand(args.batch, args.data_dim, device=device) < 0.05).float()
        x = (protos[labels] + flips) % 2
        y = F.one_hot(labels % args.classes, args.classes).float() if args.classes else None

        out = core(x, y, return_canvases=True)  # eps drawn inside; pass eps= to control it
        recon = F.binary_cross_entropy_with_logits(out.canvas, x, reduction="sum") / args.batch
        kl = 0.5 * (out.mu.square() + out.logvar.exp() - 1.0 - out.logvar).sum() / args.batch
        # our own extra term: keep the intermediate canvases' logits bounded
        smooth = 1e-4 * out.canvases.square().mean()
        loss = recon + kl + smooth

        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(core.parameters(), 10.0)
        optimizer.step()
        if it == 1 or it % 10 == 0 or it == args.iters:
            print(f"iter {it:4d}  loss {loss.item():9.3f}  recon {recon.item():9.3f}  kl {kl.item():7.3f}")

    with torch.no_grad():  # generation: decoder + write only, z ~ N(0, I)
        y = F.one_hot(torch.arange(4, device=device) % args.classes, args.classes).float() if args.classes else None
        samples = torch.sigmoid(core.sample(y=y, batch_size=4).canvas)
    print(f"done in {time.perf_counter() - start:.1f}s; sample pixel means: "
          + " ".join(f"{v:.2f}" for v in samples.mean(dim=1).tolist()))


if __name__ == "__main__":
    main()
