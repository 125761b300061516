"""Time of one Adam update of the cpu preset's trainable parameters: the per-tensor loop, foreach, fused.

    .venv/bin/python bench/optimizer.py [--updates 5]

Gradients are random (the time does not depend on them); each variant takes one untimed update first.
The trainer uses the fused one (training/trainer.py, make_optimizer).
"""

from __future__ import annotations

import argparse
import time

import torch

from mbc import MBCConfig, MBCModel
from mbc.presets import preset
from mbc.training.trainer import TrainConfig, parameter_groups


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--updates", type=int, default=5)
    args = parser.parse_args()
    chosen = preset("cpu")
    model = MBCModel.build(MBCConfig(**{**chosen["model"], "retrieval_top_k": 0}))
    parameters = [p for p in model.parameters() if p.requires_grad]
    for p in parameters:
        p.grad = torch.randn_like(p)
    print(f"{sum(p.numel() for p in parameters):,} trainable parameters in {len(parameters)} tensors")
    for name, options in (("per-tensor loop", {}), ("foreach", {"foreach": True}), ("fused", {"fused": True})):
        optimizer = torch.optim.Adam(parameter_groups(model, TrainConfig(**chosen["train"])), **options)
        optimizer.step()
        start = time.perf_counter()
        for _ in range(args.updates):
            optimizer.step()
        print(f"{name:<16} {1000 * (time.perf_counter() - start) / args.updates:6.0f} ms per update")


if __name__ == "__main__":
    main()
