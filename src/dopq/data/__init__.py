"""Image data: preprocessing from model cards, ImageFolder splits from folders or tar archives, subsets.

A data root holds one folder per split in torchvision's ImageFolder layout,
``root/<split>/<class>/<image>``. The root may be a directory, a plain ``.tar`` or a
``.tar.gz``/``.tgz``; an archive may wrap the splits in one top-level folder. Samples are ordered
exactly as ``torchvision.datasets.ImageFolder`` orders them, so class indices and sample indices agree
with torchvision.

Data streams: images are decoded one at a time when a loader asks for them. A plain ``.tar`` is read
by member offset; a ``.tar.gz`` is decompressed once per machine into a temporary plain tar (in
``$TMPDIR``, shared by the processes of one machine, such as torchrun's, and removed when the last of
them exits) and then read the same way. Each archive is indexed once per process
(cached by path, modification time and size), however many splits and listings a run asks for.

Bad images: an image file that cannot be decoded (zero bytes, not an image, truncated, corrupt) is an
error naming the file, unless the dataset is opened with ``skip_bad_images=True``: then the loaders
drop it and record it (:class:`SkippedImage`). Files without an image extension are ignored, as
torchvision does. A class folder without images keeps its class index (a warning is logged).

One job per module:

* :mod:`~dopq.data.preprocess`: a model's evaluation preprocessing (card or timm config) and transform;
* :mod:`~dopq.data.archives`: tar archives indexed once per process, ``.tar.gz`` decompressed once per machine;
* :mod:`~dopq.data.sources`: splits, classes and samples of folders and archives in torchvision's order;
* :mod:`~dopq.data.dataset`: the dataset of one split and its bad-image policy;
* :mod:`~dopq.data.sampling`: seeded calibration draws and strided evaluation subsets;
* :mod:`~dopq.data.loaders`: loaders that drop and record bad images, worker error messages.

Example:
    >>> strided_indices(10_000, 4)
    [0, 2500, 5000, 7500]
"""

from dopq.data.dataset import ImageFolderDataset, SkippedImage, as_rgb, open_split
from dopq.data.loaders import (
    ImageLoader,
    LoadedImages,
    default_workers,
    load_batch,
    load_images,
    make_loader,
    single_line_errors,
    skipped_report,
)
from dopq.data.preprocess import (
    Preprocess,
    build_transform,
    card_path_for,
    preprocess_for,
    preprocess_from_card,
    preprocess_from_model,
)
from dopq.data.sampling import calibration_indices, strided_indices
from dopq.data.sources import IMG_EXTENSIONS, list_splits, resolve_eval_split

__all__ = [
    "IMG_EXTENSIONS",
    "ImageFolderDataset",
    "ImageLoader",
    "LoadedImages",
    "Preprocess",
    "SkippedImage",
    "as_rgb",
    "build_transform",
    "calibration_indices",
    "card_path_for",
    "default_workers",
    "list_splits",
    "load_batch",
    "load_images",
    "make_loader",
    "open_split",
    "preprocess_for",
    "preprocess_from_card",
    "preprocess_from_model",
    "resolve_eval_split",
    "single_line_errors",
    "skipped_report",
    "strided_indices",
]
