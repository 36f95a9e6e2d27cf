"""Baselines measured in the same run as nearstore: PyTorch DataLoader + Pillow, and NVIDIA DALI (CPU).

Both read the same store (the tar shards through the index), so only the
pipeline differs. The PyTorch baseline reimplements torchvision's
RandomResizedCrop/flip/ToTensor/Normalize on Pillow (torchvision is not a
dependency); DALI runs ``decoders.image_random_crop`` on the CPU.
"""

from __future__ import annotations

import io
import math
import os
import random
import time
from pathlib import Path

import numpy as np

from nearstore.store.manifest import Manifest, node_dir_name

__all__ = ["sample_files", "timed_batches", "torch_pillow_throughput", "dali_throughput", "dali_available"]

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def sample_files(store: str | Path) -> list[tuple[str, int, int, int]]:
    """(tar path, offset, size, label) of every sample, from the store's indexes."""
    from nearstore.store.format import ShardIndex

    store = Path(store)
    man = Manifest.load(store)
    out = []
    for s in man.shards:
        tar = store / node_dir_name(s.nodes[0]) / f"{s.name}.tar"
        idx = ShardIndex.load(tar.with_name(f"{s.name}.idx.arrow"))
        out.extend((str(tar), int(o), int(z), int(l)) for o, z, l in zip(idx.offset, idx.size, idx.label))
    return out


def _rrc_params(w: int, h: int, rnd: random.Random) -> tuple[int, int, int, int]:
    area = w * h
    for _ in range(10):
        target = area * rnd.uniform(0.08, 1.0)
        aspect = math.exp(rnd.uniform(math.log(3 / 4), math.log(4 / 3)))
        cw, ch = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            return rnd.randint(0, w - cw), rnd.randint(0, h - ch), cw, ch
    return 0, 0, w, h


class _PillowDataset:
    """torchvision-style map dataset: Pillow decode, RandomResizedCrop, flip, ToTensor, Normalize."""

    def __init__(self, items: list[tuple[str, int, int, int]], size: int) -> None:
        self.items, self.size = items, size
        self._fds: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):  # noqa: ANN204
        import torch
        from PIL import Image

        path, off, size, label = self.items[i]
        fd = self._fds.get(path)
        if fd is None:
            fd = self._fds[path] = os.open(path, os.O_RDONLY)
        img = Image.open(io.BytesIO(os.pread(fd, size, off))).convert("RGB")
        rnd = random.Random(i)
        x, y, cw, ch = _rrc_params(img.width, img.height, rnd)
        img = img.resize((self.size, self.size), Image.BILINEAR, box=(x, y, x + cw, y + ch))
        if rnd.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        t = torch.from_numpy(np.array(img)).permute(2, 0, 1).float().div_(255)
        t.sub_(torch.tensor(MEAN).view(3, 1, 1)).div_(torch.tensor(STD).view(3, 1, 1))
        return t, label


def torch_pillow_throughput(store: str | Path, *, n: int, batch_size: int = 64, workers: int = 2,
                            size: int = 224, warmup_batches: int = 2) -> dict:
    """Images/s of torch.utils.data.DataLoader over the store (first ``warmup_batches`` excluded)."""
    import torch

    items = sample_files(store)
    ds = _PillowDataset(items, size)
    sampler = torch.randperm(len(items), generator=torch.Generator().manual_seed(0)).tolist()
    total = n + warmup_batches * batch_size
    sampler = (sampler * (1 + total // len(items)))[:total]
    dl = torch.utils.data.DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=workers,
                                     persistent_workers=False, prefetch_factor=2 if workers else None)
    return timed_batches((len(x) for x, _ in dl), warmup_batches)


def timed_batches(sizes, warmup_batches: int) -> dict:
    """Time an iterator of batch sizes: the clock starts once ``warmup_batches`` batches have arrived."""
    seen, t0 = 0, time.perf_counter()
    for b, size in enumerate(sizes):
        if b == warmup_batches - 1 or (warmup_batches == 0 and b == 0):
            t0 = time.perf_counter()
            seen = 0 if warmup_batches else size
        else:
            seen += size
    dt = time.perf_counter() - t0
    return {"images": seen, "seconds": dt, "images_per_s": seen / dt if seen and dt > 0 else 0.0}


def dali_available() -> tuple[bool, str]:
    try:
        import nvidia.dali  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure means "skip with a note"
        return False, f"nvidia-dali not importable ({type(exc).__name__}: {exc}); pip install 'nearstore[dali]'"
    return True, ""


def dali_throughput(store: str | Path, *, n: int, batch_size: int = 64, threads: int = 2, size: int = 224,
                    warmup_batches: int = 2) -> dict:
    """Images/s of a DALI CPU pipeline: image_random_crop decode + resize + flip + normalize (NCHW float)."""
    from nvidia.dali import fn, pipeline_def, types

    items = sample_files(store)
    order = np.random.default_rng(0).permutation(len(items))
    fds: dict[str, int] = {}

    def source(info):  # noqa: ANN001, ANN202
        path, off, sz, label = items[order[info.idx_in_epoch % len(items)]]
        fd = fds.get(path)
        if fd is None:
            fd = fds[path] = os.open(path, os.O_RDONLY)
        return np.frombuffer(os.pread(fd, sz, off), np.uint8), np.int64(label)

    @pipeline_def(batch_size=batch_size, num_threads=threads, device_id=None, seed=0, prefetch_queue_depth=2)
    def pipe():  # noqa: ANN202
        jpegs, labels = fn.external_source(source=source, num_outputs=2, batch=False, parallel=False,
                                           dtype=[types.UINT8, types.INT64])
        images = fn.decoders.image_random_crop(jpegs, device="cpu", output_type=types.RGB)
        images = fn.resize(images, resize_x=size, resize_y=size)
        images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW",
                                          mean=[m * 255 for m in MEAN], std=[s * 255 for s in STD],
                                          mirror=fn.random.coin_flip())
        return images, labels

    p = pipe()
    p.build()
    total_batches = warmup_batches + -(-n // batch_size)
    return timed_batches((len(p.run()[0]) for _ in range(total_batches)), warmup_batches)
