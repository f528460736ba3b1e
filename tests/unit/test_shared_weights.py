"""The shared-memory weight file (rl.sync.weight_sync.write_shared / read_shared): what a reader maps is
what the writer wrote, tensor for tensor and bit for bit, across dtypes and odd sizes, also when the
file is rewritten in place; a file that cannot be mapped is a clear error naming the way around it."""
import os

import pytest
import torch

from rl.sync.weight_sync import ALIGN, read_shared, write_shared


def tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(7, 3, generator=g),
        "norm.weight": torch.randn(5, generator=g).to(torch.bfloat16),  # 10 bytes: the next offset is padded
        "scalar": torch.tensor(3.5, dtype=torch.float64),
        "empty": torch.zeros(0, 4),
        "strided": torch.randn(4, 6, generator=g).t(),  # not contiguous
        "steps": torch.arange(3, dtype=torch.int64),
    }


def test_a_reader_maps_exactly_what_was_written_and_rewritten():
    fd = os.memfd_create("test-weights")
    try:
        for seed in (0, 1):  # the second write rewrites the same file in place
            want = tensors(seed)
            manifest, size = write_shared(fd, want.items())
            assert all(offset % ALIGN == 0 for *_, offset, _ in manifest)
            assert size == os.fstat(fd).st_size
            got = dict(read_shared(f"/proc/{os.getpid()}/fd/{fd}", manifest, size))
            assert list(got) == list(want)
            for name, tensor in want.items():
                assert got[name].dtype == tensor.dtype and got[name].shape == tensor.shape, name
                assert torch.equal(got[name], tensor), name
    finally:
        os.close(fd)


def test_a_file_that_cannot_be_mapped_says_how_to_do_without():
    with pytest.raises(RuntimeError, match=r"Cannot map .* Set sync.shared_memory=false"):
        list(read_shared("/nonexistent/weights", [["w", "float32", [2], 0, 8]], 8))
