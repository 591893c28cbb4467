"""Training throughput: HybridMedNet(convnext_tiny, modern + cross-scale attention) vs bare timm convnext_tiny.

Both models take the same optimizer step (AdamW, BCE-with-logits, 14 findings) on the same
random 224 px batches, in one process; rounds alternate between them so a change in machine
load hits both. Prints images/s for each and the time ratio (target: <= 1.2x).

    python benchmarks/bench_train.py                      # CPU or GPU, whichever is there
    python benchmarks/bench_train.py --batch-size 32 --steps 20 --amp   # on a GPU
"""

from __future__ import annotations

import argparse
import statistics
import time

import timm
import torch
import torch.nn.functional as F
from torch import nn

from hybridmednet.models.hybrid import create_model
from hybridmednet.models.summary import count_parameters


def hybrid(num_classes: int, image_size: int) -> nn.Module:
    return create_model(
        'convnext_tiny',
        num_classes=num_classes,
        image_size=image_size,
        use_modern_attention=True,
        use_cross_scale_attention=True,
    )


def bare(num_classes: int, image_size: int) -> nn.Module:
    return timm.create_model('convnext_tiny', pretrained=False, num_classes=num_classes)


def images_per_second(
    model: nn.Module, optimizer: torch.optim.Optimizer, batch: tuple[torch.Tensor, torch.Tensor], steps: int, amp: bool
) -> float:
    x, y = batch
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        with torch.autocast(x.device.type, enabled=amp, dtype=torch.float16 if x.is_cuda else torch.bfloat16):
            loss = F.binary_cross_entropy_with_logits(model(x).float(), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    sync()
    return steps * x.shape[0] / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--batch-size', type=int, default=8)
    parser.add_argument('--image-size', type=int, default=224)
    parser.add_argument('--steps', type=int, default=3, help='timed steps per round')
    parser.add_argument('--rounds', type=int, default=3, help='alternating rounds; the median is reported')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--amp', action='store_true', help='fp16 autocast (CUDA) / bf16 (CPU)')
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    torch.manual_seed(0)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    y = (torch.rand(args.batch_size, 14, device=device) < 0.2).float()
    runs = {}
    for name, build in (('HybridMedNet convnext_tiny (modern + cross-scale)', hybrid), ('timm convnext_tiny', bare)):
        model = build(14, args.image_size).to(device).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        images_per_second(model, optimizer, (x, y), 1, args.amp)  # warm-up: allocations, kernels
        runs[name] = (model, optimizer, [], count_parameters(model))
    for _ in range(args.rounds):
        for model, optimizer, rates, _ in runs.values():
            rates.append(images_per_second(model, optimizer, (x, y), args.steps, args.amp))

    print(
        f'device {device} ({torch.get_num_threads()} threads), batch {args.batch_size}, {args.image_size} px, '
        f'amp {args.amp}, {args.rounds} rounds x {args.steps} steps'
    )
    medians = {}
    for name, (_, _, rates, params) in runs.items():
        medians[name] = statistics.median(rates)
        print(f'  {name:52s} {params / 1e6:6.1f}M params  {medians[name]:8.2f} img/s')
    hybrid_rate, bare_rate = medians.values()
    print(f'training time ratio HybridMedNet / timm: {bare_rate / hybrid_rate:.2f}x (target <= 1.2x)')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
