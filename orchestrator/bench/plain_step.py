"""The baseline of `bench startup`: a plain PyTorch script's first training step.

Imports torch and torchvision (nothing of orchestrator), reads the builtin digits the quickstart uses,
resizes them to 32 px as a tensor dataset with a random crop, builds ResNet-18, takes one SGD step
of 32 images and prints `plain first step S s` (seconds since this process started). Run it as
`python -m orchestrator.bench.plain_step`; the package's `__init__` files import nothing.
"""

import os
import time
from pathlib import Path


def process_start_time() -> float:
    """This process's start on the boot-time clock (as orchestrator.train.progress.process_start_time, which
    this script does not import: it measures a script that imports nothing of orchestrator)."""
    return int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    import numpy as np
    import pyarrow.parquet as pq
    import torch
    import torch.nn.functional as F
    import torchvision
    from torchvision.transforms import v2

    table = pq.read_table(str(Path(__file__).resolve().parents[1] / "data" / "digits.parquet"))
    pixels = np.frombuffer(b"".join(table.column("pixels").to_pylist()), dtype=np.uint8).reshape(-1, 1, 8, 8).copy()
    labels = torch.from_numpy(table.column("label").to_numpy().astype(np.int64))
    keep = labels < 5
    images = torch.from_numpy(pixels).repeat(1, 3, 1, 1)[keep]
    images = F.interpolate(images.float() / 255, size=32, mode="bilinear")
    transform = v2.Compose([v2.RandomCrop(32, padding=4), v2.Normalize([0.5] * 3, [0.25] * 3)])

    class Digits(torch.utils.data.Dataset):
        def __len__(self):
            return len(images)

        def __getitem__(self, i):
            return transform(images[i]), labels[keep][i]

    loader = torch.utils.data.DataLoader(Digits(), batch_size=32, shuffle=True, drop_last=True)
    model = torchvision.models.resnet18(num_classes=5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    batch, target = next(iter(loader))
    F.cross_entropy(model(batch), target).backward()
    optimizer.step()
    print(f"plain first step {time.clock_gettime(time.CLOCK_BOOTTIME) - process_start_time():.2f} s", flush=True)


if __name__ == "__main__":
    main()
