"""Synced over 2 CPU processes (gloo), a metric equals the single-process value on the same data."""

import json

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from metrics import ConceptMetrics, load_clip_backbone, load_dino_backbone, tiny_backbone_folder

TEMPLATES = ["a {} on the beach", "a red {}", "a {} in the snow", "a shiny {}", "a wet {}"]


def _data():
    g = torch.Generator().manual_seed(0)
    gen = torch.rand(5, 3, 32, 32, generator=g)  # odd count: the ranks see different numbers of images
    real = torch.rand(3, 3, 32, 32, generator=g)
    return gen, real


def _metrics(clip_dir, dino_dir):
    return ConceptMetrics(clip_backbone=load_clip_backbone(clip_dir), dino_backbone=load_dino_backbone(dino_dir))


def _worker(rank, world, init_file, clip_dir, dino_dir, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        gen, real = _data()
        cm = _metrics(clip_dir, dino_dir)
        cm.set_concept(real, superclass="dog")
        mine = list(range(rank, len(gen), world))  # rank r takes images i % world == r
        cm.update(gen[mine], [TEMPLATES[i] for i in mine])
        values = cm.compute()  # all-reduces the sums and counts
        with open(f"{out_dir}/rank{rank}.json", "w") as f:
            json.dump(values, f)
    finally:
        dist.destroy_process_group()


def test_two_process_sync_equals_single_process(tmp_path):
    clip_dir, dino_dir = str(tiny_backbone_folder("clip")), str(tiny_backbone_folder("dino"))
    # fork: the children inherit the imported modules (CPU only here, so forking is safe)
    mp.start_processes(_worker, args=(2, str(tmp_path / "pg"), clip_dir, dino_dir, str(tmp_path)), nprocs=2,
                       join=True, start_method="fork")

    gen, real = _data()
    cm = _metrics(clip_dir, dino_dir)
    cm.set_concept(real, superclass="dog")
    cm.update(gen, TEMPLATES)
    single = cm.compute()
    # a rank's own, unsynced value differs: the sync is what makes them equal
    cm.set_concept(real, superclass="dog")
    cm.update(gen[0::2], TEMPLATES[0::2])
    rank0_alone = cm.compute()

    for rank in range(2):
        synced = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for name in ("clip_i", "clip_t", "dino"):
            assert abs(synced[name] - single[name]) < 1e-6, (rank, name, synced[name], single[name])
    assert any(abs(rank0_alone[n] - single[n]) > 1e-4 for n in single)
