"""The order training sees its rows in, drawn from the data seed and the epoch (so a resumed run
sees the batches the killed run would have), with as little padding as leaves the optimization
alone.

- **Each optimizer step's rows sorted by length** (`StepsSortedByLength`), where a step is
  several micro-batches (train.grad_accum > 1) of padded rows (packing off; packed, the longest
  examples would share a micro-batch's rows for no saving) in one process: a random order, as
  transformers' default sampler draws, and within each step's rows the longest first, so each
  micro-batch pads to rows of similar length. A step's update is the same in exact arithmetic:
  it sums the same rows' losses over the step's token count (transformers' `num_items_in_batch`),
  whichever micro-batch holds a row. The laptop recipe's 4 × 2 support tickets: 5.0% of a step's
  tokens padding in random micro-batches, 3.1% sorted (bench/RESULTS.md 20).
- **train.group_by_length**: transformers' length-grouped sampler (random groups of up to 50
  steps' rows, each sorted longest first). Less padding still (0.3% on those tickets), but it
  changes which rows share a step and when: on the SmolLM2 demo it cost 0.04–0.05 nats of
  held-out loss (bench/RESULTS.md 20), so it is off unless a recipe asks. transformers builds it
  without a generator (the order then comes from the global RNG as it stands when the epoch
  starts, which a resumed process does not reproduce); ft draws it from the seed and the epoch.
"""

from __future__ import annotations

import torch
from torch.utils.data import RandomSampler, Sampler
from transformers.trainer_pt_utils import LengthGroupedSampler


def train_sampler(chosen: Sampler | None, dataset, args, padded_rows: bool) -> Sampler | None:
    """What trains in place of the sampler transformers chose for `args`."""
    if type(chosen) is LengthGroupedSampler:
        return LengthGroupedEpochs(chosen.lengths, chosen.batch_size, args.data_seed)
    rows_a_step = args.per_device_train_batch_size * args.gradient_accumulation_steps
    if (type(chosen) is RandomSampler and padded_rows and args.gradient_accumulation_steps > 1
            and args.world_size == 1):
        return StepsSortedByLength(row_lengths(dataset), rows_a_step, args.data_seed)
    return chosen


def row_lengths(dataset) -> list[int]:
    return [len(ids) for ids in dataset["input_ids"]]


class EpochSeeded(Sampler):
    """A sampler whose epoch's order is drawn from (seed, epoch): accelerate's data loader calls
    set_epoch at every epoch (as it does for the default random sampler it seeds itself)."""

    def __init__(self, lengths: list[int], rows_a_step: int, seed: int):
        self.lengths, self.rows_a_step, self.seed, self.epoch = lengths, rows_a_step, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed + self.epoch)


class StepsSortedByLength(EpochSeeded):
    def __iter__(self):
        order = torch.randperm(len(self.lengths), generator=self.generator()).tolist()
        return iter(sorted_within_steps(order, self.lengths, self.rows_a_step))


def sorted_within_steps(order: list[int], lengths: list[int], rows_a_step: int) -> list[int]:
    """`order` with each consecutive step's rows sorted longest first (stable: ties keep order)."""
    return [i for start in range(0, len(order), rows_a_step)
            for i in sorted(order[start:start + rows_a_step], key=lambda i: -lengths[i])]


class LengthGroupedEpochs(EpochSeeded):
    def __iter__(self):
        from transformers.trainer_pt_utils import get_length_grouped_indices

        return iter(get_length_grouped_indices(self.lengths, self.rows_a_step, generator=self.generator()))
