"""Image datasets for examples/train_gan.py, as float tensors in [-1, 1] of shape (N, C, S, S).

* ``digits``: scikit-learn's bundled 8x8 handwritten digits (1797 images, 10
  classes, no download), upsampled bilinearly to ``size`` (grey, or repeated
  on 3 channels for CIFAR-shaped inputs).
* ``cifar10``: the CIFAR-10 "python version" batches (``data_batch_1`` ..
  ``data_batch_5``, pickled dicts with ``data`` uint8 [N, 3072] and ``labels``),
  from the folder ``cifar-10-batches-py`` (or its parent).
* ``folder``: every image file under a folder (PIL), resized to ``size``;
  labels are the names of the first-level subfolders when there are any.

Each loader returns ``(images, labels)``; labels are int64 class ids or None.
"""

import os
import pickle

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def _resize(images, size):
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def load_digits(size=16, channels=1):
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("load_digits: expected scikit-learn to be installed (pip install scikit-learn)") from exc
    bunch = sk_load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0  # values 0..16
    x = _resize(x, size).clamp(0, 1) * 2 - 1
    return x.expand(-1, channels, -1, -1).contiguous(), torch.tensor(bunch.target, dtype=torch.int64)


def load_cifar10(root, size=32, train=True):
    folder = root
    if not os.path.exists(os.path.join(folder, "batches.meta")):
        folder = os.path.join(root, "cifar-10-batches-py")
    names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
    paths = [os.path.join(folder, n) for n in names]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(
            f"load_cifar10: expected the CIFAR-10 python batches in {folder}, got no {', '.join(map(os.path.basename, missing))}"
        )
    data, labels = [], []
    for p in paths:
        with open(p, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        data.append(np.asarray(batch[b"data"], dtype=np.uint8))
        labels.extend(batch[b"labels"])
    x = torch.from_numpy(np.concatenate(data)).view(-1, 3, 32, 32).float() / 255.0
    x = _resize(x, size).clamp(0, 1) * 2 - 1
    return x, torch.tensor(labels, dtype=torch.int64)


def load_folder(root, size=32, channels=3, limit=None):
    try:
        from PIL import Image
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("load_folder: expected Pillow to be installed (pip install pillow)") from exc
    if not os.path.isdir(root):
        raise FileNotFoundError(f"load_folder: expected a folder of images, got {root!r}")
    files = []
    for dirpath, _, filenames in sorted(os.walk(root)):
        files += [os.path.join(dirpath, f) for f in sorted(filenames) if f.lower().endswith(IMAGE_EXTENSIONS)]
    if limit:
        files = files[:limit]
    if not files:
        raise FileNotFoundError(f"load_folder: expected image files ({', '.join(IMAGE_EXTENSIONS)}) under {root!r}, got none")
    classes = sorted({os.path.relpath(f, root).split(os.sep)[0] for f in files if os.sep in os.path.relpath(f, root)})
    mode = "RGB" if channels == 3 else "L"
    images, labels = [], []
    for f in files:
        with Image.open(f) as im:
            im = im.convert(mode).resize((size, size), Image.BICUBIC)
            a = np.asarray(im, dtype=np.float32) / 255.0
        images.append(a.reshape(size, size, channels).transpose(2, 0, 1))
        if classes:
            top = os.path.relpath(f, root).split(os.sep)[0]
            labels.append(classes.index(top) if top in classes else -1)
    x = torch.from_numpy(np.stack(images)) * 2 - 1
    y = torch.tensor(labels, dtype=torch.int64) if classes and min(labels) >= 0 else None
    return x, y


def load(name, root=None, size=None, channels=None):
    if name == "digits":
        return load_digits(size or 16, channels or 1)
    if name == "cifar10":
        if root is None:
            raise ValueError("load: expected --data-root for cifar10, got none")
        return load_cifar10(root, size or 32)
    if name == "folder":
        if root is None:
            raise ValueError("load: expected --data-root for folder, got none")
        return load_folder(root, size or 32, channels or 3)
    raise ValueError(f"load: expected dataset 'digits', 'cifar10' or 'folder', got {name!r}")
