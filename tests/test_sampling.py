import torch

from cluster.engine.sampling import SamplingParams, make_generator, sample, sample_batch


def test_a_batch_of_greedy_and_seeded_rows_samples_each_row_as_alone() -> None:
    logits = torch.randn(5, 100, generator=torch.Generator().manual_seed(0))
    params = [
        SamplingParams(temperature=0),
        SamplingParams(temperature=0.8, seed=7),
        SamplingParams(temperature=0),
        SamplingParams(temperature=1.0, top_k=5, seed=3),
        SamplingParams(temperature=1.0, top_p=0.5, seed=11),
    ]
    alone = [sample(logits[row], p, make_generator(p)) for row, p in enumerate(params)]
    batched = sample_batch(logits, params, [make_generator(p) for p in params])
    assert batched == alone
    assert batched[0] == int(torch.argmax(logits[0])) and batched[2] == int(torch.argmax(logits[2]))
