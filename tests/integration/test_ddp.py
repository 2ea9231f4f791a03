"""Data-parallel training: ``trainer.loop.distributed`` and the schedule shared by ranks.

The two slow tests run the real thing on 127.0.0.1: ``python -m torch.distributed.run
--nproc-per-node=2 -m trainer`` (gloo on CPU, one consumer endpoint per rank) fed by two
``python -m producer run`` processes that each connect to both ranks. The others check the
pieces in-process.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from producer.sending import route_producer_id
from shared.limits import MAX_PRODUCER_ID_CHARS
from shared.recording import RecordingReader
from trainer.data.consumer import DatasetConsumer
from trainer.data.stats import StreamStats, merge_stream_stats
from trainer.diagnostics.state import Diagnostics
from trainer.loop.distributed import Ranks, parameter_digest, rank_endpoint, rank_path

from helpers import ROOT
from helpers.processes import Children, Process, free_ports, run_module
from helpers.processes import Diagnostics as DiagnosticsClient
from helpers.producers import OrderServer, listed
from helpers.wire import make_meta, make_tensors, recorded_batches

WORDS = ("the a of to and in is it that was for on are with as be at by this have from or one had not but what "
         "all were when we there can an your which their said if do will each about how up out them then she").split()
# 4-row messages and 8-row batches: two messages per batch. val-fraction 0.05 of the corpus below
# gives a small val set (a few messages), so the val set is complete long before the trainer's queue fills.
DATA = ["--block-size", "64", "--rows-per-message", "4", "--val-fraction", "0.05"]
TRAINER = ["--device", "cpu", "--batch-size", "8", "--n-layer", "1", "--n-head", "2", "--n-embd", "32",
           "--warmup-iters", "5", "--log-interval", "5", "--wait-timeout", "60"]
STEPS = 30
ROWS_PER_MESSAGE, BATCH_SIZE = 4, 8


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """400 lines of 3-9 random words (the built-in corpus has a much larger val set)."""
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("corpus") / "words.txt"
    path.write_text("".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))) + "\n" for _ in range(400)))
    return path


def start_producers(children: Children, corpus, endpoints, *flags) -> list[Process]:
    """Producers pA and pB, each connected to every endpoint, each in a session of its own."""
    connects = [arg for endpoint in endpoints for arg in ("--connect", endpoint)]
    return [children.start("producer", "run", "--corpus", corpus, *DATA, "--producer-id", producer_id, *connects, *flags,
                           name=producer_id, new_session=True)
            for producer_id in ("pA", "pB")]


def torchrun(children: Children, out_dir, bind, *flags) -> Process:
    """Two ranks of ``python -m trainer``; the session (torchrun and its workers) is killed at teardown."""
    return children.start("torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "trainer", "--bind", bind,
                          "--out-dir", out_dir, *TRAINER, *flags, name="torchrun", new_session=True)


def recorded_messages(path: Path) -> list:
    with RecordingReader(path) as reader:
        return recorded_batches(reader)


class StateDict:
    def __init__(self, state: dict) -> None:
        self._state = state

    def state_dict(self) -> dict:
        return self._state


@pytest.mark.slow
def test_two_ranks_share_the_stream_and_stay_in_sync(tmp_path, corpus, children):
    """Rank r trains on train messages k = r, r + 2, r + 4, ...: together every k below 2 * 60
    exactly once, each ordered by its own rank from either producer."""
    ports = free_ports(2)
    endpoints = [f"tcp://127.0.0.1:{port}" for port in ports]
    per_rank = STEPS * BATCH_SIZE // ROWS_PER_MESSAGE  # train messages each rank trains on
    producers = start_producers(children, corpus, endpoints)
    trainer = torchrun(children, tmp_path, ",".join(endpoints), "--max-iters", str(STEPS), "--eval-interval", "15",
                       "--http-port", "0", "--data-timeout", "30", "--record", str(tmp_path / "run.lpr"))
    assert trainer.wait(90) == 0, trainer.output()
    for proc in producers:
        proc.popen.send_signal(signal.SIGTERM)
        proc.wait(10)

    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    (summary,) = [record for record in records if record["kind"] == "summary"]
    assert summary["steps"] == STEPS and summary["world_size"] == 2

    # Parameters: identical on both ranks, and equal to the final checkpoint rank 0 wrote.
    digest_rank0, digest_rank1 = summary["parameter_digests"]
    assert digest_rank0 == digest_rank1
    checkpoint = torch.load(tmp_path / "ckpt.pt", map_location="cpu", weights_only=False)
    assert checkpoint["step"] == STEPS
    assert parameter_digest(StateDict(checkpoint["model"])) == digest_rank0
    assert checkpoint["cursor"] == {"position": per_rank, "rows_used": 0, "world": 2}

    # Accounting: each rank saw only its own endpoint's producer ids, without gaps, and dropped nothing.
    ranks = summary["stream"]["ranks"]
    assert [entry["rank"] for entry in ranks] == [0, 1]
    assert [entry["endpoint"] for entry in ranks] == endpoints
    for rank, entry in enumerate(ranks):
        assert set(entry["producers"]) <= {f"pA/{rank}", f"pB/{rank}"}
        for row in entry["producers"].values():
            assert (row["gaps"], row["duplicates"], row["out_of_order"]) == (0, 0, 0)
        assert entry["orders_unordered"] == entry["orders_duplicate"] == 0
        assert entry["val_messages_seen"] == entry["val_messages_total"] and entry["consumed_batches"] == STEPS
    assert summary["stream"]["received"] == sum(entry["received"] for entry in ranks)

    # The recordings of what each rank trained on: its own k in order, the ranks' disjoint and
    # together every k once; the whole val set on each rank.
    trained = []
    for rank in (0, 1):
        messages = recorded_messages(tmp_path / f"run.rank{rank}.lpr")
        train = [m for m in messages if m.split == "train"]
        assert [m.index for m in train] == list(range(rank, 2 * per_rank, 2))
        assert {m.val_index for m in messages if m.split == "val"} == set(range(ranks[rank]["val_messages_total"]))
        trained.append(train)
    contents = [{hashlib.sha256(m.tensors["x"].tobytes()).hexdigest() for m in train} for train in trained]
    assert len(contents[0]) == len(contents[1]) == per_rank and not contents[0] & contents[1]


@pytest.mark.slow
def test_lost_producers_stop_the_run_with_a_timeout(tmp_path, corpus, children):
    """Producers killed mid-run: each rank gives up after --data-timeout with a clear message,
    and torchrun ends (no hang). Before that, rank 0's /diagnostics shows both ranks."""
    zmq_port, _, http_port = free_ports(3)
    endpoints = [f"tcp://127.0.0.1:{zmq_port}", f"tcp://127.0.0.1:{zmq_port + 1}"]  # base port + local rank
    producers = start_producers(children, corpus, [",".join(endpoints)])  # the comma-separated form
    trainer = torchrun(children, tmp_path, f"tcp://127.0.0.1:{zmq_port}", "--max-iters", "1000000",
                       "--eval-interval", "100000", "--http-port", str(http_port), "--data-timeout", "5")
    both_ranks = lambda s: s["stream"] is not None and len(s["stream"].get("ranks") or []) >= 2 \
        and s["stream"]["ranks"][1]["as_of_step"] is not None
    stream = DiagnosticsClient(http_port, trainer, poll_s=0.5).wait_for(both_ranks, "both ranks in /diagnostics")["stream"]
    assert [entry["endpoint"] for entry in stream["ranks"]] == endpoints
    assert stream["received"] == sum(entry["received"] for entry in stream["ranks"])
    assert stream["ranks"][1]["received"] > 0

    for proc in producers:
        proc.kill()
    killed = time.monotonic()
    assert trainer.wait(60) != 0
    output = trainer.text()
    assert "no train batch for 5 s (--data-timeout)" in output, output[-3000:]
    assert time.monotonic() - killed < 60


def test_rank_endpoints():
    assert rank_endpoint("tcp://*:5555", 0) == "tcp://*:5555"
    assert rank_endpoint("tcp://0.0.0.0:5555", 3) == "tcp://0.0.0.0:5558"
    assert rank_endpoint("tcp://a:1, tcp://b:7", 1) == "tcp://b:7"
    with pytest.raises(ValueError, match="local rank 2 has none"):
        rank_endpoint("tcp://a:1,tcp://b:7", 2)
    with pytest.raises(ValueError, match="comma-separated"):
        rank_endpoint("ipc:///tmp/linepack", 1)
    assert rank_path("runs/x.lpr", Ranks(rank=1, local_rank=1, world_size=2)) == "runs/x.rank1.lpr"
    assert rank_path("runs/x.lpr", Ranks()) == "runs/x.lpr"


def test_bind_all_interfaces_for_producers_on_other_hosts():
    """``--bind tcp://0.0.0.0:PORT`` (what a multi-host trainer uses) accepts TCP producers."""
    with DatasetConsumer("tcp://0.0.0.0:*", batch_size=4) as consumer:
        port = consumer.endpoint.rsplit(":", 1)[1]
        meta = make_meta(block_size=32, val_messages=0)
        tensors = make_tensors(meta, meta.rows_per_message, np.random.default_rng(0))
        with OrderServer(f"tcp://127.0.0.1:{port}", meta, listed([tensors]), producer_id="remote"):
            batch = consumer.next_batch(timeout=10)
    assert consumer.endpoint.startswith("tcp://0.0.0.0:") and batch["x"].shape == (4, meta.block_size)


def test_each_endpoint_of_a_producer_has_its_own_wire_id():
    assert route_producer_id("p", 1) == "p/1"
    assert len(route_producer_id("x" * MAX_PRODUCER_ID_CHARS, 12)) == MAX_PRODUCER_ID_CHARS


def rank_stats(rank: int, producers: dict, **numbers) -> StreamStats:
    stats = {
        "rank": rank, "endpoint": f"tcp://h:{5555 + rank}", "as_of_step": None if rank == 0 else 10,
        "received": 10, "accepted": 9, "rejected": {"bad_dtype": 1}, "rejected_total": 1, "consumed_messages": 8,
        "consumed_batches": 4, "gaps": 0, "duplicates": 0, "out_of_order": 0,
        "producers": producers, "starved": False, "seconds_since_last_message": 1.0, "queue_depth": 2,
        "val_messages_seen": 3, "val_messages_total": 3, "meta_digest": "d",
    }
    stats.update(numbers)
    return StreamStats.from_dict({**stats, "producers": {name: dict(row) for name, row in stats["producers"].items()}})


ROW = {"messages": 6, "meta": 1, "train": 4, "val": 1, "first_seq": 0, "last_seq": 5, "gaps": 0, "duplicates": 0,
       "out_of_order": 0, "seconds_since_last": 0.1}


def test_merge_stream_stats_and_diagnostics():
    per_rank = [
        rank_stats(0, {"p/0": ROW, "q": ROW}),
        rank_stats(1, {"p/1": ROW, "q": ROW}, starved=True, seconds_since_last_message=7.5, val_messages_seen=1,
                   rejected={"bad_dtype": 2, "meta_mismatch": 1}, rejected_total=3),
    ]
    total = merge_stream_stats(per_rank)
    snapshot = Diagnostics(stream_stats=lambda: total).snapshot()
    total = total.to_dict()
    assert (total["received"], total["accepted"], total["consumed_batches"], total["queue_depth"]) == (20, 18, 8, 4)
    assert total["rejected"] == {"bad_dtype": 3, "meta_mismatch": 1} and total["rejected_total"] == 4
    assert set(total["producers"]) == {"p/0", "p/1", "q@rank0", "q@rank1"}
    assert total["starved"] and total["seconds_since_last_message"] == 7.5 and total["val_messages_seen"] == 1
    assert merge_stream_stats([per_rank[0], rank_stats(1, {}, seconds_since_last_message=None)]).seconds_since_last_message is None

    assert snapshot.stream.received == 20
    assert [(entry.rank, entry.as_of_step) for entry in snapshot.stream.ranks] == [(0, None), (1, 10)]
    assert snapshot.stream.ranks[1].producers["p/1"].train == 4


def test_rank_zero_ages_the_other_ranks_silence_since_their_last_gather(monkeypatch):
    ranks = Ranks(rank=0, local_rank=0, world_size=2)
    clock = [100.0]
    monkeypatch.setattr("trainer.loop.distributed.time.monotonic", lambda: clock[0])
    ranks._gathered, ranks._gathered_at = [rank_stats(0, {}), rank_stats(1, {}, seconds_since_last_message=1.0)], clock[0]

    class Consumer:
        endpoint = "tcp://h:5555"

        def stats(self):
            return dataclasses.replace(rank_stats(0, {}), rank=None, endpoint=None, as_of_step=None)

    clock[0] += 6.0  # rank 1 has not reported for 6 s: no log step happened anywhere
    stream = ranks.stream_stats(Consumer()).to_dict()
    assert [entry["seconds_since_last_message"] for entry in stream["ranks"]] == [1.0, 7.0]
    assert stream["seconds_since_last_message"] == 7.0


def test_single_process_ranks_are_a_no_op():
    ranks = Ranks()
    model = torch.nn.Linear(2, 2)
    loss = torch.tensor(3.0)
    assert ranks.wrap(model) is model and ranks.mean_(loss).item() == 3.0 and ranks.gather("x") == ["x"]

    class Consumer:
        endpoint = "tcp://h:1"

        def stats(self):
            return StreamStats(received=1)

    ranks.gather_stream_stats(Consumer(), 5)
    assert ranks.stream_stats(Consumer()) == StreamStats(received=1)  # the one-process numbers, no ``ranks``


def test_producers_only_compose_file():
    """Every variable of ``docker-compose.producers.yml`` is a real ``producer run`` flag, it passes on
    every variable the main compose file gives producers, and the endpoint is required."""
    yaml = pytest.importorskip("yaml")
    service = yaml.safe_load((ROOT / "docker-compose.producers.yml").read_text())["services"]["producer"]
    main_service = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["producer"]
    names = set(service["environment"])
    assert set(main_service["environment"]) <= names
    assert service["command"] == ["producer"] and ":?" in service["environment"]["LINEPACK_CONNECT"]
    help_text = run_module("producer", "run", "--help", check=True).stdout
    for name in names:
        assert "--" + name.removeprefix("LINEPACK_").lower().replace("_", "-") in help_text, name
