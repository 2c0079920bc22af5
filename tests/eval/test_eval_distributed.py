"""`idefics eval` on 2 processes (torch.distributed, gloo on loopback) gives exactly the results of 1 process:
same per-query outputs, same scores, same report."""

from __future__ import annotations

import argparse
import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from idefics.eval import cli as eval_cli


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(rank: int, world_size: int, port: int, argv: list[str]) -> None:
    """One process of a torchrun-like launch: the environment torchrun sets, then the CLI."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)  # the same kernels in every run, whatever the process count
    parser = argparse.ArgumentParser(prog="idefics")
    eval_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    if args.func(args) != 0:
        raise SystemExit(f"rank {rank}: idefics eval failed")


@pytest.fixture(scope="module")
def mini_data(tmp_path_factory):
    from idefics.data.synthetic import make_mini_data

    folder = tmp_path_factory.mktemp("mini")
    make_mini_data(str(folder), seed=0, n_train=0, n_val=30, n_test=80, progress=False)
    return folder


def test_two_processes_give_the_one_process_results(reference_checkpoint, mini_data, tmp_path):
    folder = reference_checkpoint("small_9b")[0]
    outputs = {}
    for world_size in (1, 2):
        out = tmp_path / f"world{world_size}"
        argv = ["eval", "--model", str(folder), "--task", "mini-vqa,mini-digits", "--data", str(mini_data),
                "--shots", "0,2", "--selection", "rices", "--seed", "3", "--limit", "7", "--batch-size", "2",
                "--out", str(out), "--quiet"]
        mp.spawn(run_cli, args=(world_size, free_port(), argv), nprocs=world_size, join=True)
        outputs[world_size] = out
    one, two = (json.loads((outputs[n] / "results.json").read_text()) for n in (1, 2))
    # 7 queries in batches of 2: rank 0 takes batches 0 and 2 (4 queries), rank 1 batches 1 and 3 (3)
    assert [r["extra"].pop("queries_per_process") for r in one["results"]] == [[7]] * 4
    assert [r["extra"].pop("queries_per_process") for r in two["results"]] == [[4, 3]] * 4
    assert one == two
    assert [r["n"] for r in one["results"]] == [7, 7, 7, 7]
    for name in sorted(os.listdir(outputs[1] / "predictions")):
        records = (outputs[1] / "predictions" / name).read_text()
        assert records == (outputs[2] / "predictions" / name).read_text(), name
        assert len(records.splitlines()) == 7
    assert (outputs[2] / "results.md").read_text() == (outputs[1] / "results.md").read_text()
