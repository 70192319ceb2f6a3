import dataclasses

import torch

from cluster.engine.sampling import SamplingParams, draws_for, sample, sample_batch


def test_a_batch_of_greedy_and_seeded_rows_samples_each_row_as_alone() -> None:
    logits = torch.randn(5, 100, generator=torch.Generator().manual_seed(0))
    params = [
        SamplingParams(temperature=0),
        SamplingParams(temperature=0.8, seed=7),
        SamplingParams(temperature=0),
        SamplingParams(temperature=1.0, top_k=5, seed=3),
        SamplingParams(temperature=1.0, top_p=0.5, seed=11),
    ]

    def generator(p: SamplingParams) -> torch.Generator | None:
        draws = draws_for(p)
        return draws.at(17) if draws else None

    alone = [sample(logits[row], p, generator(p)) for row, p in enumerate(params)]
    batched = sample_batch(logits, params, [generator(p) for p in params])
    assert batched == alone
    assert batched[0] == int(torch.argmax(logits[0])) and batched[2] == int(torch.argmax(logits[2]))


def test_a_seeded_continuation_from_the_tokens_sent_draws_what_the_whole_request_would_have(make_ckpt) -> None:  # type: ignore[no-untyped-def]
    # What lets a stream whose replica died go on elsewhere with the same tokens (cluster.serve.ingress).
    from cluster.engine.build import local_engine
    from mixtral.checkpoint import Checkpoint

    engine = local_engine(Checkpoint.open(make_ckpt()))
    prompt, params = [5, 9, 2, 7], SamplingParams(max_tokens=20, temperature=1.0, seed=1234, ignore_eos=True)
    [whole] = engine.generate([prompt], [params])
    sent = whole.output_ids[:8]
    [rest] = engine.generate([prompt + sent], [dataclasses.replace(params, max_tokens=12)])
    assert sent + rest.output_ids == whole.output_ids
    [other_seed] = engine.generate([prompt], [dataclasses.replace(params, seed=4321)])
    assert other_seed.output_ids != whole.output_ids  # the draws do depend on the seed
