"""Step cost and Fisher cost of a tiny BERT (full fine-tuning and LoRA), as EWC runs them: how the Fisher of one
task compares with one epoch of training on it. Offline: the model and tokenizer are made here (tests/test_text_data).

    .venv/bin/python experiments/benchmarks/tiny_transformer_fisher.py --samples 512 --out experiments/benchmarks/tiny_transformer_fisher.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from src.data.text import tokenize
from src.methods.fisher import fisher_diagonal
from src.models.hf_backbone import build_hf_backbone
from tests.test_text_data import make_tiny_bert


def measure(folder, lora, samples, batch_size, length, hidden):
    torch.manual_seed(0)
    backbone = build_hf_backbone((2, length), str(folder), pooling="mean", lora=lora)
    net = torch.nn.Sequential(backbone, torch.nn.Linear(backbone.out_features, 2))
    x = tokenize(str(folder), ["the apple is red and the sky is blue"] * samples, length)
    y = torch.randint(0, 2, (samples,))
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=1e-3)
    net.train()
    steps = samples // batch_size
    start = time.perf_counter()
    for i in range(steps):
        s = slice(i * batch_size, (i + 1) * batch_size)
        loss = F.cross_entropy(net(x[s]), y[s])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    epoch = time.perf_counter() - start
    batches = [(x[i : i + 500], y[i : i + 500]) for i in range(0, samples, 500)]
    coverage: dict = {}
    start = time.perf_counter()
    fisher_diagonal(net, batches, "exact", params={n: p for n, p in net.named_parameters() if p.requires_grad},
                    coverage=coverage)
    fisher = time.perf_counter() - start
    return {"lora": lora, "trainable_params": sum(p.numel() for p in params), "step_ms": 1000 * epoch / steps,
            "epoch_s": epoch, "fisher_s": fisher, "fisher_over_epoch": fisher / epoch, "coverage": coverage}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--length", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_tiny_bert(Path(tmp) / "bert", hidden=args.hidden, layers=2, heads=2)
        rows = [measure(folder, lora, args.samples, args.batch_size, args.length, args.hidden)
                for lora in (None, {"r": 4})]
    result = {"command": "python experiments/benchmarks/tiny_transformer_fisher.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out"),
        "model": f"BERT, {args.hidden} hidden, 2 layers, 2 heads, {args.length} tokens", "samples": args.samples,
        "batch_size": args.batch_size, "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
        "load_average_at_end": os.getloadavg(), "machine": platform.processor() or platform.machine(), "rows": rows}
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
