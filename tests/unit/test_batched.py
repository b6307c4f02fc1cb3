"""decoding/batched.py: many prompts decoding together give each prompt exactly its own greedy output."""
import random

import pytest
import torch

from skiplayer.decoding.batched import generate_batched
from skiplayer.decoding.generate import GenerationConfig, generate_ids
from skiplayer.decoding.stopping import StopCriteria
from skiplayer.errors import UserError
from skiplayer.model.llama import Transformer
from skiplayer.model.optimize import native_kernels_available, optimize_model
from skiplayer.train.calibrate import CalibrationPrompt, Sequence, teacher_force
from tests.conftest import tiny_hf_model

native = pytest.mark.skipif(not native_kernels_available(), reason="native CPU kernels cannot be built here")


def prompts_and_steps(n, vocab, seed=0):
    rng = random.Random(seed)
    prompts = [[rng.randrange(4, vocab) for _ in range(rng.randrange(1, 12))] for _ in range(n)]
    return prompts, [rng.randrange(1, 16) for _ in range(n)]


def one_by_one(model, prompts, steps, eos=()):
    return [generate_ids(model, p, GenerationConfig(max_steps=s), eos_token_ids=eos)[0] for p, s in zip(prompts, steps)]


@pytest.mark.parametrize("kernels", ["torch", pytest.param("native", marks=native)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_batched_outputs_equal_one_prompt_at_a_time(kernels, dtype):
    model = optimize_model(Transformer.from_hf(tiny_hf_model("llama", seed=11), dtype=dtype), kernels=kernels)
    prompts, steps = prompts_and_steps(9, model.args.vocab_size)
    eos = [max(one_by_one(model, prompts, steps), key=len)[2]]  # a token some output has early: it stops there
    expected = one_by_one(model, prompts, steps, eos)
    assert any(len(e) < s for e, s in zip(expected, steps))
    for batch_size in (1, 3, 16):
        got = {f.index: f.tokens for f in generate_batched(model, prompts, lambda i: StopCriteria(steps[i], eos),
                                                           batch_size)}
        assert [got[i] for i in range(len(prompts))] == expected, batch_size


@native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kept_rows_equal_teacher_forcing_bitwise(dtype):
    """The rows kept while decoding in a batch are the teacher-forced hidden states, bit for bit (batch-invariant
    kernels): what calibration trains on is what drafting computes."""
    model = optimize_model(Transformer.from_hf(tiny_hf_model("llama", seed=12), dtype=dtype))
    prompts, steps = prompts_and_steps(6, model.args.vocab_size, seed=1)
    exits, keep = [1, 2], 4
    done = sorted(generate_batched(model, prompts, lambda i: StopCriteria(steps[i], []), 4,
                                   (*exits, model.n_layers), keep), key=lambda f: f.index)
    seqs = [Sequence(CalibrationPrompt(prompts[f.index]), f.tokens) for f in done]
    ref = teacher_force(model, seqs, exits, prompt_positions=keep - 1)
    for n in exits:
        assert torch.equal(torch.cat([torch.cat(f.rows[n]) for f in done]), ref.hidden[n])
    assert torch.equal(torch.cat([torch.cat(f.rows[model.n_layers]) for f in done]), ref.final)


def test_admission_stops_when_told_and_running_prompts_finish():
    model = Transformer.from_hf(tiny_hf_model("llama", seed=13))
    prompts, steps = prompts_and_steps(10, model.args.vocab_size, seed=2)
    admitted = []

    def admit():
        admitted.append(1)
        return len(admitted) <= 3

    done = list(generate_batched(model, prompts, lambda i: StopCriteria(steps[i], []), 8, admit=admit))
    assert sorted(f.index for f in done) == [0, 1, 2]
    assert all(len(f.tokens) == steps[f.index] for f in done)


def test_too_long_prompt_is_a_clear_error():
    model = Transformer.from_hf(tiny_hf_model("llama", seed=13))
    with pytest.raises(UserError, match="exceeds the model's"):
        list(generate_batched(model, [[5] * 10], lambda i: StopCriteria(model.max_seq_len, [])))
