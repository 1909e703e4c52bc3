"""``tfds.testing.mock_data`` with VTAB's split sizes and a distinct example at every index.

tfds' default mock yields the same ``num_examples`` random examples for every split and slice. The
``as_dataset_fn`` here follows the slice instead: ``train[45000:45200]`` yields examples 45000 ..
45199 of a fixed random ``train`` split (example ``i`` of a split is the same wherever it is read;
train and test differ), generated from the builder's own features by tfds' ``RandomFakeGenerator``,
with the split sizes of :data:`~petl_lightning.data.vtab_splits.VTAB_SOURCES`. Where a label depends
on a feature, that feature gets values the real data has: CLEVR scenes hold 3-10 objects, KITTI
objects lie 2-29 m away, boxes are valid, dSprites pixels are 0/1. Nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import tensorflow as tf  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402
from tensorflow_datasets.testing.mocking import RandomFakeGenerator  # noqa: E402

# petl_lightning (torch, timm: triton's native library) must load before TensorFlow: loading triton
# after TensorFlow segfaults (tensorflow-cpu 2.21 with triton 3.x). The package always does so.
from petl_lightning.data.vtab_splits import VTAB_SOURCES, slice_ranges


def _sizes(builder: Any) -> dict[str, int]:
    return next(s.sizes for s in VTAB_SOURCES.values() if s.builder.split("/")[0] == builder.name)


def _boxes(random: np.ndarray) -> np.ndarray:
    """Random (ymin, xmin, ymax, xmax) boxes made valid (min <= max), as tfds' BBox feature requires."""
    pairs = np.asarray(random).reshape(-1, 2, 2)
    return np.sort(pairs, axis=1).reshape(np.shape(random))


def _realistic(name: str, index: int, example: dict[str, Any]) -> dict[str, Any]:
    if name == "clevr":  # 3..10 objects, cycling with the index, and one question: the fields of a
        # sequence need one length, which tfds' generator does not ensure
        n = 3 + index % 8
        example["objects"] = {k: np.resize(v, (n, *np.shape(v)[1:])) for k, v in example["objects"].items()}
        example["question_answer"] = {k: [str(v[0])] for k, v in example["question_answer"].items()}
    if name == "kitti":  # 1-4 objects (one length for all their fields) at depths 2-29 m
        n = 1 + index % 4
        example["objects"] = {k: np.resize(v, (n, *np.shape(v)[1:])) for k, v in example["objects"].items()}
        example["objects"]["location"][:, 2] = 2.0 + 3.0 * ((index + np.arange(n)) % 10)
        example["objects"]["bbox"] = _boxes(example["objects"]["bbox"])
    if name == "oxford_iiit_pet":
        example["head_bbox"] = _boxes(example["head_bbox"])
    if name == "dsprites":
        example["image"] = (example["image"] > 127).astype(np.uint8)
    return example


def mock_example(builder: Any, split: str, index: int) -> dict[str, Any]:
    """Example ``index`` of tfds split ``split`` of the mocked ``builder`` (decoded)."""
    gen = RandomFakeGenerator(builder.info.features, num_examples=index + 1, seed=zlib.crc32(split.encode()))
    return _realistic(builder.name, index, gen[index])


def _arrays(encoded: Any) -> Any:
    """Sequence features encode to lists (of 0-d arrays for text), which ``from_generator`` takes only
    as plain arrays."""
    if isinstance(encoded, dict):
        return {k: _arrays(v) for k, v in encoded.items()}
    if isinstance(encoded, list):
        return np.asarray([e.item() if isinstance(e, np.ndarray) and e.ndim == 0 else e for e in encoded])
    return encoded


def _as_dataset(
    self: Any, split: str, decoders: Any = None, read_config: Any = None, shuffle_files: bool = False
) -> tf.data.Dataset:
    features = self.info.features
    ranges = slice_ranges(str(split), _sizes(self))

    def examples() -> Iterator[Any]:
        for part, start, stop in ranges:
            for i in range(start, stop):
                yield _arrays(features.encode_example(mock_example(self, part, i)))

    specs = features.get_serialized_info()
    ds = tf.data.Dataset.from_generator(
        examples, output_signature=tf.nest.map_structure(lambda t: tf.TensorSpec(t.shape, t.tf_dtype), specs)
    )
    return ds.map(lambda ex: features.decode_example(ex, decoders=decoders))


@contextlib.contextmanager
def vtab_mock_data() -> Iterator[None]:
    """Every tfds builder reads the sized random data above; download_and_prepare does nothing."""
    with tfds.testing.mock_data(as_dataset_fn=_as_dataset):
        yield
