"""The fused Gumbel-max choice (sampling/noise_kernel.py) picks the torch path's token, row for row.

The Triton kernel runs compiled on a GPU, and on the CPU through Triton's interpreter
(`TRITON_INTERPRET=1`, in a subprocess: the variable must be set before triton is imported).
"""

from __future__ import annotations

import pytest
import torch

from conftest import run_in_triton_interpreter
from personas.sampling import chooser
from personas.sampling.chooser import gumbel_noise, row_keys, token_salts
from personas.sampling.noise_kernel import BLOCK, fused_noisy_argmax, fused_noisy_scores


def torch_choice(tempered, seeds, step, salts):
    return gumbel_noise(seeds, step, salts).add_(tempered).argmax(dim=-1)


def check_against_torch(device: str) -> None:
    """Vocabularies inside one block, at a block's edge and past it; scores small beside the noise
    (so the noise decides), the scores themselves (bit for bit on CUDA), masked tokens, per-row steps; a row
    with every token masked; two +inf scores in one block and in two blocks (the lowest id wins)."""
    generator = torch.Generator().manual_seed(3)
    for rows, vocabulary in ((1, 1000), (5, BLOCK), (7, BLOCK + 1), (17, 3 * BLOCK + 77)):
        salts = token_salts(vocabulary, torch.device(device))
        for trial in range(3):
            tempered = (torch.randn(rows, vocabulary, generator=generator) * 0.3).to(device)
            tempered[:, ::7] = float("-inf")
            seeds = torch.randint(0, 2**62, (rows,), generator=generator).to(device)
            step = torch.randint(0, 500, (rows,), generator=generator).to(device)
            first, second = row_keys(seeds, step)
            got = fused_noisy_argmax(tempered, first, second, salts)
            assert got.tolist() == torch_choice(tempered, seeds, step, salts).tolist(), (rows, vocabulary, trial)
            if trial == 0:  # the numbers themselves, not only their argmax
                want = gumbel_noise(seeds, step, salts).add_(tempered)
                scores = fused_noisy_scores(tempered, first, second, salts)
                if device == "cuda":
                    assert torch.equal(scores, want), (rows, vocabulary)
                else:  # the interpreter takes numpy's logarithm, at times one unit in the last place off torch's
                    assert torch.allclose(scores, want, rtol=1e-15, atol=1e-14), (rows, vocabulary)
    vocabulary = 3 * BLOCK
    salts = token_salts(vocabulary, torch.device(device))
    tempered = torch.zeros(3, vocabulary, device=device)
    tempered[0] = float("-inf")
    tempered[1, [100, 200]] = float("inf")
    tempered[2, [BLOCK + 5, 2 * BLOCK + 1]] = float("inf")
    seeds, step = torch.tensor([1, 2, 3], device=device), torch.tensor([0, 0, 0], device=device)
    first, second = row_keys(seeds, step)
    assert fused_noisy_argmax(tempered, first, second, salts).tolist() == [0, 100, BLOCK + 5]
    assert torch_choice(tempered, seeds, step, salts).tolist() == [0, 100, BLOCK + 5]


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the compiled kernel is tested instead")
def test_the_kernel_picks_the_torch_paths_tokens_in_tritons_interpreter():
    run_in_triton_interpreter("test_sampling_noise_kernel", "check_against_torch")


@pytest.mark.gpu
def test_the_kernel_picks_the_torch_paths_tokens_on_cuda():
    check_against_torch("cuda")


@pytest.mark.gpu
def test_the_chooser_on_cuda_uses_the_kernel_and_a_graph_replays_it():
    """`choose` on CUDA takes the kernel (its tokens equal the torch path's at a 128k vocabulary);
    captured in a graph, a replay after the step advances in place equals an eager call."""
    rows, vocabulary = 64, 128_256
    salts = token_salts(vocabulary, torch.device("cuda"))
    scores = torch.randn(rows, vocabulary, device="cuda") * 4
    temperatures = torch.full((rows,), 0.8, device="cuda")
    seeds = torch.arange(rows, device="cuda") * 7919 + 11
    step = torch.zeros(rows, dtype=torch.long, device="cuda")
    fused = chooser.choose(scores, temperatures, seeds, step, salts)
    chooser.FUSED_NOISE_ON_CUDA = False
    try:
        plain = chooser.choose(scores, temperatures, seeds, step, salts)
    finally:
        chooser.FUSED_NOISE_ON_CUDA = True
    assert fused.tolist() == plain.tolist()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = chooser.choose(scores, temperatures, seeds, step, salts)
    step.add_(5)
    graph.replay()
    assert captured.tolist() == chooser.choose(scores, temperatures, seeds, step.clone(), salts).tolist()
