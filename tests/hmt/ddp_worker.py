"""Run by test_training under torchrun: one training step per rank, then report what each rank saw."""

import hashlib
import json
import sys

import torch

from hmt import HMTConfig, HMTModel
from hmt.training import TrainConfig, close_distributed, init_distributed, train
from tests.tiny import VOCAB, tiny_backbone


class Recording(list):
    """A sample list that remembers which rows this rank read."""

    seen: list

    def __getitem__(self, i):
        self.seen.append(i)
        return super().__getitem__(i)


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    rank, world = init_distributed()
    torch.manual_seed(100 + rank)  # different init per rank: training must broadcast rank 0's
    model = HMTModel(tiny_backbone(), HMTConfig(segment_length=16, sensory_length=4, num_cached=8))
    g = torch.Generator().manual_seed(0)
    samples = Recording(
        {"input_ids": ids, "labels": ids}
        for ids in torch.randint(0, VOCAB, (8, 48), generator=g).tolist()
    )
    samples.seen = []
    cfg = TrainConfig(stage=2, steps=1, grad_accum=2, lr=1e-2, trainable="hmt", out_dir=f"{out_dir}/run", resume=False)
    train(model, samples, cfg, progress=False)
    digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.hmt_parameters())).hexdigest()
    with open(f"{out_dir}/rank{rank}.json", "w") as f:
        json.dump({"rank": rank, "world": world, "seen": samples.seen, "params": digest}, f)
    close_distributed()


if __name__ == "__main__":
    main(sys.argv[1])
