"""A user's unlabelled samples as this process's share of each global batch, read as they are needed.

The run is a pure function of the step: global batch ``k`` holds the samples
``k*B .. (k+1)*B`` of a permutation of the data seeded by ``(seed, epoch)``,
so a run resumed from a checkpoint sees exactly the batches an uninterrupted
one would. Under torchrun each of ``W`` processes takes every ``W``-th sample
of each global batch. An iterable that cannot be indexed is read in order
(``step*B ..``; earlier samples are skipped on a resume) and started again
when it ends.

Whatever a user's data does wrong is one sentence naming the sample: a
Dataset that raises while reading it, samples of other shapes, NaN or
infinite values, an iterable that yields nothing or cannot be read twice.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset

from sepify.errors import CalibrationError, ConfigError, first_line

__all__ = ["Samples", "as_arguments"]

_EVAL_STREAM = 256  # samples read once from an iterable given as evaluation data
_CACHE_BYTES = 512 * 2**20  # evaluation batches up to this size are kept after their first pass


def as_arguments(item: Any, n_args: int, what: str, index: int | None = None) -> tuple[Tensor, ...]:
    """A sample (or a batch) as the model's arguments: a tensor, or a tuple/list whose first ``n_args`` elements
    are; what follows them (labels) is dropped."""
    if isinstance(item, Tensor):
        return (item,)
    if isinstance(item, (tuple, list)) and len(item) >= n_args and all(isinstance(t, Tensor) for t in item[:n_args]):
        return tuple(item[:n_args])
    where = f" (sample {index})" if index is not None else ""
    raise CalibrationError(
        f"{what} yields {type(item).__name__} samples{where}; yield tensors, or (input, label) tuples"
    )


class Samples:
    """This process's share of global batch ``k`` of ``data``, for any ``k``; and passes over all of it.

    Args:
        data: a tensor of samples along dim 0, a tuple of such tensors (one per model argument), a map-style
            ``Dataset`` or a list of samples, a ``DataLoader`` (its dataset is used), or an iterable of samples
            (an ``IterableDataset``, a generator). A sample is a tensor, or ``(input, label)``.
        batch_size: the global batch (split across ``world`` processes).
        what: how messages name the data (``"--data"`` in the CLI).
    """

    def __init__(
        self,
        data: Any,
        batch_size: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
        n_args: int = 1,
        what: str = "the distillation data",
    ) -> None:
        if isinstance(data, DataLoader):
            data = data.dataset
        self.batch_size, self.seed, self.rank, self.world, self.n_args, self.what = (
            batch_size, seed, rank, world, n_args, what,
        )  # fmt: skip
        self.items: Any = None
        self.tensors = False  # items are tensors of samples: indexing them gives a batch
        self.stream: Iterable[Any] | None = None
        self.length = 0
        if isinstance(data, Tensor) or (isinstance(data, tuple) and data and all(isinstance(t, Tensor) for t in data)):
            tensors = (data,) if isinstance(data, Tensor) else data
            if any(t.dim() == 0 or t.shape[0] != tensors[0].shape[0] for t in tensors) or tensors[0].shape[0] == 0:
                raise CalibrationError(f"{what} is empty or ragged; pass N >= 1 samples stacked along dim 0")
            self.items, self.length, self.tensors = tensors, int(tensors[0].shape[0]), True
        elif _indexable(data):
            self.items, self.length = data, _length(data, what)
            if self.length == 0:
                raise CalibrationError(f"{what} is empty (a dataset of length 0); pass at least {batch_size} samples")
        elif isinstance(data, Iterable) and not isinstance(data, (str, bytes)):
            self.stream = data
        else:
            raise CalibrationError(
                f"{what} must be a Dataset, a DataLoader, an iterable of samples or a tensor, got {type(data).__name__}"
            )
        if self.items is not None and self.length < batch_size:
            raise ConfigError(f"batch_size {batch_size} is larger than the {self.length} samples given")
        self._iterator: Iterator[Any] | None = None
        self._position = 0  # global samples consumed from the stream
        self._last: tuple[int, list[tuple[Tensor, ...]]] | None = None  # the last global batch read from it
        self._cache: list[tuple[Tensor, ...]] | None = None

    @property
    def sized(self) -> bool:
        return self.items is not None

    def __call__(self, step: int) -> tuple[Tensor, ...]:
        """This process's share of global batch ``step``, stacked."""
        if self.items is not None:
            indices = [int(i) for i in self.global_indices(step)[self.rank :: self.world]]
        else:
            indices = list(range(step * self.batch_size, (step + 1) * self.batch_size))[self.rank :: self.world]
        return self._stacked(indices, self._read(indices) if self.items is not None else self._from_stream(step))

    def global_indices(self, step: int) -> Tensor:
        per_epoch = self.length // self.batch_size
        epoch, k = divmod(step, per_epoch)
        order = torch.randperm(self.length, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))
        return order[k * self.batch_size : (k + 1) * self.batch_size]

    def passes(self) -> Iterator[tuple[Tensor, ...]]:
        """One pass over every sample in order (an iterable: its first samples), this process's share, in batches;
        kept after the first pass when small."""
        if self._cache is not None:
            yield from self._cache
            return
        kept: list[tuple[Tensor, ...]] = []
        size = 0
        for batch in self._pass():
            size += sum(t.numel() * t.element_size() for t in batch)
            if size <= _CACHE_BYTES:
                kept.append(batch)
            yield batch
        if size <= _CACHE_BYTES:
            self._cache = kept

    def _pass(self) -> Iterator[tuple[Tensor, ...]]:
        if self.items is not None:
            for start in range(0, self.length, self.batch_size):
                indices = list(range(start, min(start + self.batch_size, self.length)))[self.rank :: self.world]
                if indices:
                    yield self._stacked(indices, self._read(indices))
            return
        assert self.stream is not None
        samples = []
        for index, item in self._iterate(iter(self.stream), 0):
            samples.append((index, item))
            if len(samples) == _EVAL_STREAM:
                break
        if not samples:
            raise CalibrationError(f"{self.what} is empty: its iterator yielded no sample")
        for start in range(0, len(samples), self.batch_size):
            chunk = samples[start : start + self.batch_size][self.rank :: self.world]
            if chunk:
                yield self._stacked([i for i, _ in chunk], [s for _, s in chunk])

    def _read(self, indices: Sequence[int]) -> list[tuple[Tensor, ...]]:
        if self.tensors:
            index = torch.tensor(list(indices), dtype=torch.long)
            return [tuple(t.index_select(0, index.to(t.device)) for t in self.items)]  # already one batch
        found = []
        for i in indices:
            try:
                item = self.items[i]
            except Exception as e:  # noqa: BLE001 - a user's Dataset may raise anything
                raise CalibrationError(
                    f"{self.what}: reading sample {i} raised {first_line(e)}; fix the dataset or leave that sample out"
                ) from e
            found.append(as_arguments(item, self.n_args, self.what, i))
        return found

    def _stacked(self, indices: Sequence[int], samples: list[tuple[Tensor, ...]]) -> tuple[Tensor, ...]:
        """Samples stacked into one batch (a tensor source is one already), checked for shapes and values."""
        if self.tensors and self.items is not None:
            batch = samples[0]
        else:
            first = samples[0]
            for i, sample in zip(indices, samples):
                for a, b in zip(sample, first):
                    if a.shape != b.shape or a.dtype != b.dtype:
                        raise CalibrationError(
                            f"{self.what}: sample {i} is {_describe(a)} but sample {indices[0]} is {_describe(b)}; "
                            "pass samples of one shape and dtype"
                        )
            batch = tuple(torch.stack([s[k] for s in samples]) for k in range(len(first)))
        for t in batch:
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                bad = int((~torch.isfinite(t.reshape(t.shape[0], -1))).any(1).nonzero()[0])
                raise CalibrationError(
                    f"{self.what}: sample {indices[bad]} holds NaN or infinite values; they would poison the "
                    "training, so drop or clean such samples"
                )
        return batch

    def _from_stream(self, step: int) -> list[tuple[Tensor, ...]]:
        """Global batch ``step`` of an iterable: samples ``step*B ..``; earlier ones are skipped (resume). The last
        batch read is kept: an iterator that cannot start over is then still read once, in order."""
        if self._last is not None and self._last[0] == step:
            return self._last[1]
        batch = self._read_stream(step)
        self._last = (step, batch)
        return batch

    def _read_stream(self, step: int) -> list[tuple[Tensor, ...]]:
        assert self.stream is not None
        start = step * self.batch_size
        if self._iterator is None or self._position > start:
            self._iterator, self._position = iter(self.stream), 0
        batch: list[tuple[Tensor, ...]] = []
        since_restart: int | None = None  # samples read since the iterable was started again
        while len(batch) < self.batch_size:
            try:
                item = next(self._iterator)
            except StopIteration:  # an iterable that ends: read it again (another epoch)
                if self._position == 0 or since_restart == 0:
                    raise CalibrationError(f"{self.what} is empty: its iterator yielded no sample") from None
                again = iter(self.stream)
                if again is self._iterator:  # a generator or an iterator: it cannot be read again
                    raise CalibrationError(
                        f"{self.what} ran out after {self._position} samples and cannot be read again (an iterator "
                        "or a generator); pass a Dataset, a tensor, or an iterable that starts over when iterated"
                    ) from None
                self._iterator, since_restart = again, 0
                continue
            except Exception as e:  # noqa: BLE001 - a user's iterable may raise anything
                raise CalibrationError(
                    f"{self.what}: reading sample {self._position} raised {first_line(e)}; fix the data source"
                ) from e
            if self._position >= start:
                batch.append(as_arguments(item, self.n_args, self.what, self._position))
            self._position += 1
            since_restart = None if since_restart is None else since_restart + 1
        return batch[self.rank :: self.world]

    def _iterate(self, iterator: Iterator[Any], start: int) -> Iterator[tuple[int, tuple[Tensor, ...]]]:
        index = start
        while True:
            try:
                item = next(iterator)
            except StopIteration:
                return
            except Exception as e:  # noqa: BLE001 - a user's iterable may raise anything
                raise CalibrationError(
                    f"{self.what}: reading sample {index} raised {first_line(e)}; fix the data source"
                ) from e
            yield index, as_arguments(item, self.n_args, self.what, index)
            index += 1


def _indexable(data: Any) -> bool:
    """A map-style dataset or a list of samples: indexed by position, with a length."""
    if isinstance(data, IterableDataset):
        return False
    return (isinstance(data, Dataset) and hasattr(data, "__len__")) or isinstance(data, (list, tuple))


def _length(data: Any, what: str) -> int:
    try:
        return len(data)
    except Exception as e:  # noqa: BLE001 - a user's __len__ may raise anything
        raise CalibrationError(f"{what}: its length could not be read ({first_line(e)}); fix its __len__") from e


def _describe(t: Tensor) -> str:
    return f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}"
