"""`data.decode: gpu`: packed shards' training JPEGs decoded in batches on the training device.

The loader processes only read (the stream with no transform yields encoded bytes, labels and each
image's augmentation seed); `DeviceDecoded` decodes each batch with one call of torchvision's batched
`decode_jpeg(..., device=...)` and applies the run's training transform to every image on the device,
its random parameters drawn from the image's seed as the CPU path draws them. On a CPU device it is the
same code with libjpeg-turbo (what the tests run here).
"""

from __future__ import annotations

import torch

from orchestrator.data.decode import decode_image

JPEG_MAGIC = b"\xff\xd8"


def decode_batch(blobs: list[torch.Tensor], seeds: list[int], transform, device: torch.device,
                 exif_transpose: bool = True) -> torch.Tensor:
    """A stacked batch on `device` from encoded images (uint8 tensors): JPEGs in one batched decode there,
    anything else decoded on the CPU and moved; then `transform` per image, seeded by `seeds`."""
    from torchvision.io import ImageReadMode, decode_jpeg

    if all(bytes(blob[:2].tolist()) == JPEG_MAGIC for blob in blobs):
        upright = exif_transpose and device.type == "cpu"   # torchvision applies EXIF on the CPU decoder only
        images = decode_jpeg(blobs, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=upright)
    else:
        images = [decode_image(bytes(blob.numpy()), "a packed shard", exif_transpose).to(device) for blob in blobs]
    out = []
    for image, seed in zip(images, seeds):
        torch.default_generator.manual_seed(seed)   # random crop and flip parameters come from the CPU generator
        out.append(transform(image))
    return torch.stack(out)


class DeviceDecoded:
    """A training loader of encoded batches, yielding (images on `device`, labels): what the loop iterates.
    `dataset`, `sampler` and `generator` are the wrapped loader's (start_epoch and the seeding use them)."""

    def __init__(self, loader, transform, device: torch.device, exif_transpose: bool = True):
        self.loader, self.transform, self.device, self.exif_transpose = loader, transform, device, exif_transpose
        self.dataset, self.sampler, self.generator = loader.dataset, loader.sampler, loader.generator

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for blobs, labels, seeds in self.loader:
            yield decode_batch(blobs, seeds, self.transform, self.device, self.exif_transpose), labels
