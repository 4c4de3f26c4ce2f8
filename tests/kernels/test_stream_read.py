"""Stream-read kernel (dualfuse.kernels.stream_read): each program's wrapping int32 sum of the words it reads."""
import pytest
import torch

from dualfuse.kernels.stream_read import BLOCK, stream_read


def expected(words, programs):
    """Program p reads blocks p, p + programs, p + 2 * programs, ... of BLOCK words; sums wrap at 32 bits."""
    steps = -(-words.numel() // (programs * BLOCK))
    padded = torch.zeros(steps * programs * BLOCK, dtype=torch.int64)
    padded[: words.numel()] = words.cpu().long()
    sums = padded.view(steps, programs, BLOCK).sum(dim=(0, 2))
    return ((sums + 2**31) % 2**32 - 2**31).to(torch.int32)


@pytest.mark.parametrize("n,programs", [(3 * BLOCK + 5, 2), (BLOCK // 2, 4)])
def test_per_program_sums(n, programs, kernel_device):
    words = torch.randint(-2**20, 2**20, (n,), dtype=torch.int32).to(kernel_device)
    out = stream_read(words, programs)
    want = expected(words, min(programs, -(-n // BLOCK)))  # never more programs than blocks
    assert torch.equal(out.cpu(), want)


@pytest.mark.parametrize("readers", [2, 3])
def test_readers_read_each_block_together(readers, kernel_device):
    """readers=R: programs R*p .. R*p + R - 1 each read what program p reads alone."""
    n, programs = 3 * BLOCK + 5, 2
    words = torch.randint(-2**20, 2**20, (n,), dtype=torch.int32).to(kernel_device)
    out = stream_read(words, programs, readers=readers)
    assert torch.equal(out.cpu(), expected(words, programs).repeat_interleave(readers))


def test_bad_input_is_refused(kernel_device):
    with pytest.raises(ValueError, match="1-D int32"):
        stream_read(torch.randn(8, device=kernel_device))
    with pytest.raises(ValueError, match="readers must be an int >= 1"):
        stream_read(torch.zeros(8, dtype=torch.int32, device=kernel_device), readers=0)
