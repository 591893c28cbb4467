"""Sanity check (not a test): is each finding of the sample dataset learnable, and how hard?

Trains (a) a logistic regression on 48 px pixels and (b) a tiny CNN from scratch at
128 px on the official train_val list, and prints per-finding ROC AUC on test_list.

    .venv/bin/python benchmarks/sample_learnability.py [DATA_DIR] [--epochs 8]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from hybridmednet.config import NIH_FINDINGS, Config
from hybridmednet.data.datasets import build_index
from hybridmednet.data.synthetic import cached_sample_dataset


def load(paths, size):
    return np.stack(
        [
            np.asarray(Image.open(p).convert('L').resize((size, size), Image.BILINEAR), dtype=np.float32) / 255.0
            for p in paths
        ]
    )


def aucs(y, scores):
    return np.array(
        [roc_auc_score(y[:, k], scores[:, k]) if 0 < y[:, k].sum() < len(y) else np.nan for k in range(y.shape[1])]
    )


def tiny_cnn(x_train, y_train, x_test, epochs, seed=0):
    torch.manual_seed(seed)

    def block(i, o):
        return [torch.nn.Conv2d(i, o, 3, padding=1), torch.nn.BatchNorm2d(o), torch.nn.ReLU(), torch.nn.MaxPool2d(2)]

    net = torch.nn.Sequential(
        *block(1, 16),
        *block(16, 32),
        *block(32, 64),
        *block(64, 96),
        *block(96, 128),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(128, 14),
    )
    opt = torch.optim.AdamW(net.parameters(), 3e-3, weight_decay=1e-4)
    xt, yt = torch.from_numpy(x_train[:, None]), torch.from_numpy(y_train)
    steps = epochs * (len(xt) // 32)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=steps)
    for epoch in range(epochs):
        net.train()
        for idx in torch.randperm(len(xt)).split(32)[: len(xt) // 32]:
            loss = torch.nn.functional.binary_cross_entropy_with_logits(net(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        print(f'  cnn epoch {epoch + 1}/{epochs} loss {loss.item():.3f}', flush=True)
    net.eval()
    with torch.no_grad():
        return torch.cat([net(b) for b in torch.from_numpy(x_test[:, None]).split(128)]).sigmoid().numpy()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument('data_dir', nargs='?', type=Path)
    parser.add_argument('--epochs', type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(2)
    config = Config()
    config.DATA['data_dir'] = str(args.data_dir or cached_sample_dataset())
    index = build_index(config)
    split = index.records['split'].to_numpy()
    train, test = np.isin(split, ['train', 'val']), split == 'test'
    print(f'{train.sum()} train, {test.sum()} test images')
    x48 = load(index.records['path'], 48).reshape(len(split), -1)
    t0 = time.time()
    logistic = np.stack(
        [
            LogisticRegression(C=0.05, max_iter=300)
            .fit(x48[train], index.labels[train, k])
            .decision_function(x48[test])
            for k in range(14)
        ],
        1,
    )
    print(f'logistic regression: {time.time() - t0:.0f}s')
    x128 = load(index.records['path'], 128)
    t0 = time.time()
    cnn = tiny_cnn(x128[train], index.labels[train], x128[test], args.epochs)
    print(f'tiny CNN: {time.time() - t0:.0f}s')
    y = index.labels[test]
    a_lr, a_cnn = aucs(y, logistic), aucs(y, cnn)
    print(f'{"finding":20s} {"test pos":>8s} {"logreg48":>9s} {"cnn128":>7s}')
    for k, name in enumerate(NIH_FINDINGS):
        print(f'{name:20s} {int(y[:, k].sum()):8d} {a_lr[k]:9.3f} {a_cnn[k]:7.3f}')
    print(f'{"mean":20s} {"":8s} {np.nanmean(a_lr):9.3f} {np.nanmean(a_cnn):7.3f}')


if __name__ == '__main__':
    main()
