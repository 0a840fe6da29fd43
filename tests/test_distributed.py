"""Two ranks with half the batch each train exactly like one process with the whole batch
(issue 30's first part: bench/distributed.py on the CPU, gloo, 2 processes)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.results import read_result

ROOT = Path(__file__).resolve().parent.parent

METHODS = {"full_ft": {}, "lora": {"lora_rank": 2, "lora_alpha": 4.0},
           "vpt_deep": {"num_prompts": 2, "prompt_depth": 2},
           # frozen backbone + recomputed blocks: DDP without find_unused_parameters must not trip
           "lora+checkpointing": {"lora_rank": 2, "lora_alpha": 4.0},
           # class prompts on the device; the GRU memory must stay the same on every rank
           "vptsp_g": {"num_prompts": 2, "prompt_depth": 2, "num_class_prompts": 1, "class_prompt_depth": 2,
                       "class_prompt_offload": "device"},
           # an offloaded table: sparse row gradients, exchanged by all-gather, updated lazily
           "vptsp_g+offload": {"num_prompts": 2, "prompt_depth": 2, "num_class_prompts": 1, "class_prompt_depth": 2,
                               "class_prompt_offload": "cpu"},
           # the released configurations' dropout on the memory update: one mask, rank 0's, on every rank
           "vptsp_g+dropout": {"num_prompts": 2, "prompt_depth": 2, "num_class_prompts": 1, "class_prompt_depth": 2,
                               "gru_dropout": 0.5}}
STEPS = 3


def _learner(method: str, args: dict):
    from bench.config import CellConfig
    from bench.learner import build_learner

    torch.manual_seed(0)
    name = method.removesuffix("+checkpointing").removesuffix("+offload").removesuffix("+dropout")
    learner = build_learner(CellConfig(backbone="vit_test", weights=None, embedding_size=16, method=name,
                                       method_args=args), 4)
    learner.model.grad_checkpointing = method.endswith("+checkpointing")
    return learner


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 3, 32, 32, generator=g), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])


def _optimizers(learner):
    from bench.config import CellConfig
    from bench.train import build_optimizers

    # SGD: Adam divides each gradient by its own size, so a gradient that is zero in exact arithmetic
    # (the key bias of attention: softmax ignores a constant per query) turns its rounding noise,
    # ~1e-10 and different for any other summation order, into full-size steps of either sign
    return build_optimizers(learner, CellConfig(optimizer="sgd", lr=1e-2, proxy_lr=1e-2, momentum=0.9,
                                                weight_decay=1e-4))


def _train(learner, loss_of, after_backward=lambda: None) -> dict:
    optimizers = _optimizers(learner)
    learner.train()
    record = {"losses": [], "grads": None}
    for step in range(STEPS):
        for o in optimizers:
            o.zero_grad(set_to_none=True)
        loss = loss_of()
        loss.backward()
        after_backward()
        if step == 0:
            record["grads"] = {n: (p.grad.to_dense() if p.grad.is_sparse else p.grad).detach().clone()
                               for n, p in learner.named_parameters() if p.grad is not None}
        for o in optimizers:
            o.step()
        record["losses"].append(loss.detach())
    record["params"] = {n: p.detach().clone() for n, p in learner.named_parameters() if p.requires_grad}
    record["buffers"] = {n: b.detach().clone() for n, b in learner.extras.named_buffers()}  # VPTSP's memory
    return record


def _train_on_rank(rank: int, world: int, init_file: str, cases) -> dict:
    """Each case, ``(name, build the learner)``, trained on this rank's part of the batch."""
    import torch.distributed as dist

    from bench.distributed import exchange_sparse_gradients, global_batch_loss, wrap

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    images, labels = _batch()
    part = slice(rank * 8 // world, (rank + 1) * 8 // world)
    records = {}
    for method, build in cases:
        learner = build()
        if method.endswith("+dropout") and rank:
            torch.manual_seed(1000 + rank)  # this rank's own draws differ: only the shared mask keeps it equal
        ddp = wrap(learner)
        records[method] = _train(learner, lambda: global_batch_loss(ddp, learner, images[part], labels[part]),
                                 lambda: exchange_sparse_gradients(learner))
    dist.destroy_process_group()
    return records


def _rank(rank: int, world: int, init_file: str, out: str) -> None:
    records = _train_on_rank(rank, world, init_file,
                             [(m, lambda m=m, a=a: _learner(m, a)) for m, a in METHODS.items()])
    if rank == 1:  # the other rank's memory: the same rows as rank 0's
        torch.save({m: r["buffers"] for m, r in records.items()}, out + ".rank1")
    if rank == 0:
        torch.save(records, out)


def _rank_every_method(rank: int, world: int, init_file: str, out: str) -> None:
    from tests.test_methods import TRAINED, make_learner

    records = _train_on_rank(rank, world, init_file, [(m, lambda m=m: make_learner(m)) for m in TRAINED])
    if rank == 0:
        torch.save(records, out)


@pytest.mark.slow  # every registered method, on two ranks and in one process: about 40 s
def test_every_registered_method_trains_on_two_ranks_like_one_process(tmp_path):
    """A new method gets this check without a line here: it must keep no state that the ranks'
    halves of the batch would update differently (per-image vectors go through
    ``learner.gather_batch``; sparse tables through ``exchange_sparse_gradients``)."""
    import torch.multiprocessing as mp

    from tests.test_methods import TRAINED, make_learner

    out = tmp_path / "every.pt"
    mp.spawn(_rank_every_method, args=(2, str(tmp_path / "init"), str(out)), nprocs=2, join=True)
    ranks = torch.load(out)
    images, labels = _batch()
    for method in TRAINED:
        learner = make_learner(method)
        one, two = _train(learner, lambda: learner.training_loss(images, labels)), ranks[method]
        torch.testing.assert_close(torch.stack(two["losses"]), torch.stack(one["losses"]), atol=1e-5, rtol=1e-5,
                                   msg=lambda m, where=method: f"{where} losses: {m}")
        for kind in ("params", "buffers"):
            for name, value in one[kind].items():
                torch.testing.assert_close(two[kind][name], value, atol=1e-5, rtol=1e-4,
                                           msg=lambda m, where=f"{method} {kind} {name}": f"{where}: {m}")


def test_rank_batches_partition_the_one_process_batch_exactly():
    from bench.data import ClassBalancedBatchSampler
    from bench.distributed import RankBatches

    labels = np.repeat(np.arange(10), 6)
    one = ClassBalancedBatchSampler(labels, 8, 2, seed=3, num_batches=5)
    ranks = [RankBatches(ClassBalancedBatchSampler(labels, 8, 2, seed=3, num_batches=5), r, 2) for r in range(2)]
    for epoch in (1, 2):
        one.set_epoch(epoch)
        for r in ranks:
            r.set_epoch(epoch)
        for whole, *parts in zip(one, *ranks):
            assert sum(parts, []) == whole and all(len(p) == 4 for p in parts)


def test_two_ranks_train_like_one_process_with_the_whole_batch(tmp_path):
    import torch.multiprocessing as mp

    out = tmp_path / "ranks.pt"
    mp.spawn(_rank, args=(2, str(tmp_path / "init"), str(out)), nprocs=2, join=True)
    ranks = torch.load(out)
    rank1 = torch.load(str(out) + ".rank1")
    for method, buffers in rank1.items():
        for name, value in buffers.items():
            assert torch.equal(value, ranks[method]["buffers"][name]), (method, name)
    images, labels = _batch()
    for method, args in METHODS.items():
        learner = _learner(method, args)
        one = _train(learner, lambda: learner.training_loss(images, labels))
        two = ranks[method]
        torch.testing.assert_close(torch.stack(two["losses"]), torch.stack(one["losses"]), atol=1e-5, rtol=1e-5)
        assert set(two["grads"]) == set(one["grads"]), method
        for kind in ("grads", "params", "buffers"):
            for name, value in one[kind].items():
                torch.testing.assert_close(two[kind][name], value, atol=1e-5, rtol=1e-4,
                                           msg=lambda m, where=f"{method} {kind} {name}": f"{where}: {m}")


def _evaluation_case(case: str):
    """(name, {part: (embeddings, labels)}) of one whole split, with exact duplicates: ties across shards."""
    rng = np.random.default_rng(7)
    vectors = rng.normal(size=(30, 16)).astype(np.float32)
    embeddings = vectors[rng.integers(0, 30, size=90)]
    labels = rng.integers(0, 12, size=90)
    if case == "collapsed":
        return "test", {"test": (np.ones((90, 16), np.float32), labels)}
    if case == "inshop":
        return "test", {"query": (embeddings[:40], labels[:40]), "gallery": (embeddings[40:], labels[40:])}
    return case, {case: (embeddings, labels)}


def _evaluate_shards(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from bench import distributed, rank_evaluation
    from bench.errors import CellFailure
    from bench.ranks import Ranks

    ranks = Ranks(rank, world)
    distributed.start(ranks, torch.device("cpu"), timeout_s=60)
    torch.set_num_threads(1)
    found = {}
    for case in ("test", "val", "inshop", "collapsed"):
        name, whole = _evaluation_case(case)
        mine = {part: (e[ranks.shard(len(e)).start:ranks.shard(len(e)).stop],
                       l[ranks.shard(len(l)).start:ranks.shard(len(l)).stop]) for part, (e, l) in whole.items()}
        try:
            evaluation = rank_evaluation.score_on_main(name, mine, (1, 2, 4, 8), ranks)
            found[case] = (evaluation.metrics, None if evaluation.per_query is None else evaluation.per_query.arrays(),
                           evaluation.embeddings)
        except CellFailure as e:
            found[case] = str(e)
    torch.save(found, f"{out}.{rank}")
    distributed.finish()


@pytest.mark.slow  # spawned gloo processes: about 5 s each
@pytest.mark.parametrize("world_size", [2, 3])
def test_evaluation_on_ranks_equals_the_one_process_evaluation(world_size, tmp_path):
    """Each rank embeds a shard; rank 0 alone receives them, in order, and scores the split: the
    one-process metrics (ties counted alike) and per-query records (bytes of per_query.npz) for
    self-retrieval, a validation split and In-Shop's query/gallery; the other ranks get the
    metrics and hold no embeddings; a collapsed model fails on every rank with one process's
    reason. (Exact ties between identical images are why the search is not sharded too:
    ``bench/rank_evaluation.py``.)"""
    import torch.multiprocessing as mp

    from bench.artifacts import npz_bytes
    from bench.cell_evaluation import score_split
    from bench.errors import CellFailure

    out = str(tmp_path / "found")
    mp.spawn(_evaluate_shards, args=(world_size, _free_port(), out), nprocs=world_size, join=True)
    ranks = [torch.load(f"{out}.{r}", weights_only=False) for r in range(world_size)]
    for case in ("test", "val", "inshop"):
        name, whole = _evaluation_case(case)
        one = score_split(name, whole, (1, 2, 4, 8))
        metrics, arrays, embeddings = ranks[0][case]
        assert metrics == one.metrics, case
        assert npz_bytes(arrays) == npz_bytes(one.per_query.arrays()), case
        np.testing.assert_array_equal(embeddings, one.embeddings)
        assert all(r[case][0] == one.metrics and r[case][1] is None and r[case][2] is None for r in ranks[1:])
    assert one.metrics["ties_checked"] > 0
    with pytest.raises(CellFailure) as collapsed:
        score_split(*_evaluation_case("collapsed"), (1, 2, 4, 8))
    assert [r["collapsed"] for r in ranks] == [str(collapsed.value)] * world_size


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _hanging_peer(rank: int, world: int, port: int, out: str) -> None:
    import time

    from bench.distributed import CollectiveTimeout, gather_labels, leave, start
    from bench.ranks import Ranks

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    start(Ranks(rank, world), torch.device("cpu"), timeout_s=3)
    if rank == 1:
        time.sleep(8)  # never joins the gather: a hung rank
        return  # an ordinary exit after rank 0, the store's host, is gone: must not abort (exit code 0)
    try:
        gather_labels(torch.tensor([0, 1]))
    except CollectiveTimeout as e:
        with open(out, "w") as f:
            f.write(str(e))
        leave(3)  # an ordinary exit would abort in the gloo group's teardown (SIGABRT)


@pytest.mark.slow  # two processes and a 3 s collective timeout: about 18 s
def test_a_collective_a_rank_never_joins_fails_naming_itself_instead_of_waiting(tmp_path):
    import time

    import torch.multiprocessing as mp

    out = tmp_path / "message.txt"
    start = time.monotonic()
    ranks = mp.start_processes(_hanging_peer, args=(2, _free_port(), str(out)), nprocs=2,
                               join=False, start_method="spawn")
    for process in ranks.processes:
        process.join(timeout=60)
    assert time.monotonic() - start < 60
    # the failed rank leaves with the code it chose, not an abort in the teardown
    assert [p.exitcode for p in ranks.processes] == [3, 0]
    message = out.read_text()
    assert "all_gather (labels) did not complete on every rank (rank 0 of 2)" in message
    assert "every other rank is alive: one of them hangs, or never called it" in message  # its heartbeat went on


def _dying_peer(rank: int, world: int, port: int, out: str) -> None:
    import signal
    import time

    from bench.distributed import CollectiveTimeout, gather_labels, leave, start
    from bench.ranks import Ranks

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    start(Ranks(rank, world), torch.device("cpu"), timeout_s=30)
    if rank == 1:
        time.sleep(1)  # a heartbeat or two
        os.kill(os.getpid(), signal.SIGKILL)  # dies as the OOM killer would have it
    try:
        gather_labels(torch.tensor([0, 1]))
    except CollectiveTimeout as e:
        with open(out, "w") as f:
            f.write(str(e))
        leave(3)


@pytest.mark.slow  # two processes, a kill and the heartbeat's wait: about 12 s
def test_a_rank_that_dies_is_named_by_the_others_without_a_launcher(tmp_path):
    """On SLURM no launcher reports which task died: the surviving ranks name it, from the
    heartbeats in the group's store, long before the collective's timeout."""
    import time

    import torch.multiprocessing as mp

    out = tmp_path / "message.txt"
    start = time.monotonic()
    ranks = mp.start_processes(_dying_peer, args=(2, _free_port(), str(out)), nprocs=2, join=False,
                               start_method="spawn")
    for process in ranks.processes:
        process.join(timeout=60)
    assert time.monotonic() - start < 30  # not the 30 s collective timeout
    assert [p.exitcode for p in ranks.processes] == [3, -9]
    message = out.read_text()
    assert "rank 1 stopped answering (its heartbeat ended: it died)" in message, message


# --- a whole cell on two ranks (the launcher, the runner and train_cell) --------------------------

def _cell_args(data_root, out, *extra):
    return [sys.executable, str(ROOT / "run_suite.py"), "cell", "--dataset", "synthetic", "--data-root",
            str(data_root), "--backbone", "vit_test", "--weights", "none", "--method", "vptsp_g",
            "--method-arg", "class_prompt_depth=2", "--method-arg", "prompt_depth=3",
            "--method-arg", "class_prompt_offload=cpu",
            "--epochs", "3", "--out", str(out), "--set", "num_workers=0", "--set", "batch_size=12",
            "--set", "samples_per_class=2", "--set", "embedding_size=32", "--set", "optimizer=sgd",
            "--set", "lr=1e-2", "--set", "device=cpu", "--set", "torch_threads=1", "--set", "val_fraction=0.25",
            *extra]


@pytest.fixture(scope="module")
def cell_data(tmp_path_factory):
    from bench.data import make_synthetic_dataset

    root = tmp_path_factory.mktemp("ranks-data")
    make_synthetic_dataset(root / "synthetic", num_classes=16, images_per_class=10, image_size=40, seed=0)
    return root


def _only_cell(out):
    cells = list(Path(out).glob("adhoc/*"))
    assert len(cells) == 1, cells
    return cells[0]


@pytest.fixture(scope="module")
def one_process_cell(cell_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("one")
    proc = subprocess.run(_cell_args(cell_data, out), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return _only_cell(out)


@pytest.mark.slow  # two launches of a 3-epoch cell: about 12 s
def test_a_cell_on_two_ranks_is_the_one_process_cell(cell_data, one_process_cell, tmp_path):
    """VPTSP-G with an offloaded class-prompt table and validation selection, through
    ``cell --ranks 2``: the same losses, metrics, per-query records and weights as one process;
    one set of files, written by rank 0; the world size and per-rank batch in result.json."""
    proc = subprocess.run(_cell_args(cell_data, tmp_path, "--ranks", "2"), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "on 2 ranks (batch 6 per rank)" in proc.stdout
    two, one = _only_cell(tmp_path), one_process_cell
    a, b = read_result(one / "result.json"), read_result(two / "result.json")
    assert b["status"] == "ok" and b["measurements"]["world_size"] == 2 and b["measurements"]["batch_per_rank"] == 6
    assert a["measurements"]["world_size"] == 1 and a["measurements"]["batch_per_rank"] == 12
    assert [e["train_loss"] for e in b["epochs"]] == pytest.approx([e["train_loss"] for e in a["epochs"]], rel=1e-5)
    assert b["final"] == a["final"]  # the metrics of every split, the validation-selected epoch
    assert (two / "per_query.npz").read_bytes() == (one / "per_query.npz").read_bytes()
    from safetensors.numpy import load_file

    mine, theirs = load_file(two / "trainable.safetensors"), load_file(one / "trainable.safetensors")
    assert mine.keys() == theirs.keys()
    for name in mine:
        np.testing.assert_allclose(mine[name], theirs[name], atol=1e-5, err_msg=name)
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    assert "start on 2 ranks" in (two / "runs.log").read_text()


def _rank_processes(launcher: int) -> tuple[int, list[int]]:
    """(rank 0's pid, the other ranks' pids) among the processes below ``launcher``: rank 0 is
    the one holding the cell's lock file open."""
    below = [p for p in _descendants(launcher) if "spawn_main" in _cmdline(p)]
    main = [p for p in below if _holds_lock(p)]
    assert len(main) == 1, (below, main)
    return main[0], [p for p in below if p != main[0]]


def _descendants(pid: int) -> list[int]:
    children = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            children += [int(child), *_descendants(int(child))]
    return children


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""


def _holds_lock(pid: int) -> bool:
    try:
        return any(os.readlink(fd).endswith("/.lock") for fd in Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return False


@pytest.mark.slow  # two launches of two ranks and a kill: about 30 s
def test_a_rank_that_dies_fails_the_cell_naming_it_and_the_rerun_resumes_exactly(cell_data, one_process_cell,
                                                                                tmp_path):
    import signal
    import time

    args = _cell_args(cell_data, tmp_path, "--ranks", "2", "--set", "collective_timeout_s=30")
    child = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not list(tmp_path.glob("adhoc/*/checkpoint.pt")) and time.time() < deadline:
        time.sleep(0.02)
    _, others = _rank_processes(child.pid)
    assert len(others) == 1, others
    os.kill(others[0], signal.SIGKILL)
    output, _ = child.communicate(timeout=120)
    assert child.returncode == 1, output
    cell = _only_cell(tmp_path)
    failed = read_result(cell / "result.json")
    assert failed["status"] == "failed"
    assert "rank 1 was killed by SIGKILL" in failed["reason"], failed["reason"]
    assert (cell / "checkpoint.pt").exists()  # the last checkpoint stays for the rerun

    proc = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    resumed, expected = read_result(cell / "result.json"), read_result(one_process_cell / "result.json")
    assert resumed["status"] == "ok" and resumed["measurements"]["resumed_from_epoch"] >= 1
    assert resumed["final"] == expected["final"]
    assert [e["train_loss"] for e in resumed["epochs"]] == pytest.approx(
        [e["train_loss"] for e in expected["epochs"]], rel=1e-5)


@pytest.mark.slow  # a suite run on two ranks: about 17 s
def test_run_ranks_runs_each_local_cell_on_that_many_ranks_and_refuses_a_batch_it_cannot_split(tmp_path):
    """``run --ranks N``: each cell of the suite as N processes; a batch that does not split into
    N equal parts is refused before anything runs, naming the cell, the batch and the fix."""
    import yaml

    data = yaml.safe_load((ROOT / "suites" / "smoke.yaml").read_text())
    data["grid"]["method"] = ["bitfit"]
    data["defaults"].update(data_root=str(tmp_path / "data"), torch_threads=1)
    suite = tmp_path / "ranks.yaml"
    suite.write_text(yaml.safe_dump(data))
    base = [sys.executable, str(ROOT / "run_suite.py"), "run", str(suite), "--executor", "local",
            "--out", str(tmp_path / "results"), "--no-report"]
    refused = subprocess.run([*base, "--ranks", "3"], capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "batch_size 8 does not split into 3 equal rank batches" in refused.stdout + refused.stderr
    assert not list((tmp_path / "results").glob("*/*/result.json"))

    proc = subprocess.run([*base, "--ranks", "2"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (result,) = [read_result(p) for p in (tmp_path / "results").glob("*/*/result.json")]
    assert result["status"] == "ok" and result["measurements"]["world_size"] == 2


def test_only_transport_errors_of_a_training_step_become_collective_failures():
    """A lost rank inside the backward (DDP's all-reduce) fails the cell as a collective does; a
    bug in the step's computation stays the bug it is."""
    from bench.distributed import CollectiveTimeout, collective, is_transport_error

    lost = RuntimeError("[gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]:918: Connection reset by peer")
    bug = RuntimeError("mat1 and mat2 shapes cannot be multiplied (8x16 and 32x4)")
    assert is_transport_error(lost) and not is_transport_error(bug)

    def raising(error):
        def run():
            raise error
        return run

    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        collective("the step", raising(bug), only_transport_errors=True)
    import bench.distributed as distributed

    try:
        with pytest.raises(CollectiveTimeout, match="the step did not complete on every rank"):
            collective("the step", raising(lost), only_transport_errors=True)
    finally:
        distributed._peer_lost = False
