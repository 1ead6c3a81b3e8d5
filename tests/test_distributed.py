"""torchrun on CPU (gloo, 2 processes of the tiny model): the same training as one process.

The oracle is the plain one-process run of the same command (fp32; the shares' sums are added in
another order, so not bit for bit): per-step loss within 1e-6, margin within 1e-5 (β times a
difference of log-prob sums of tens of nats, whose fp32 resolution is ~1e-5), gradient norm within
1e-4 relative (Adam is blind to the gradient's scale; the norm is not, so a wrong normalisation
shows here), and the final weights within 1e-6 except in at most 0.1% of the trained entries: Adam's first
update of a fresh optimizer is lr·g/(|g| + 1e-8), which for a gradient entry near 1e-8 depends on
its last bits, so such an entry may differ by up to one update (lr). A resumed 2-process
run equals an uninterrupted one bit for bit, the reference table is the 1-process table, and a
process that fails or is stopped ends the whole job.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_chat_model import make_tiny_training_setup

import train
from clo.errors import CloError
from clo.train.distributed import check_batch
from clo.world import World

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # each torchrun starts 2 Python processes: ~70 s for the file on 2 cores
TOL = 1e-6  # weights, absolute; loss and NLL, relative: 1e-6 of a loss of 3.2 is ~5 fp32 steps (assert_close_runs)
MARGIN_TOL = 1e-5  # β · (difference of sums of log-probs)
GRAD_NORM_RTOL = 1e-4  # relative, of the global gradient norm (assert_close_runs says why)
LR = 1e-3
COMPILED = ("--compile", "on", "--packing", "off", "--length-groups", "1")  # CUDA's default path; one length group: few shapes to compile


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_training_setup(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CLO_CACHE", str(tmp_path / "cache"))


def argv(tiny, out, *extra):
    folder, data = tiny
    return ["--lang", "sw", "--model", str(folder), "--data", str(data), "--out", str(out), "--batch-size", "4",
            "--lr", str(LR), "--amp", "off", "--save-every", "0", "--show-answers", "0", *extra]


def torchrun_cmd(args: list[str], script: Path = REPO / "train.py", processes: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes), str(script), *args]


def torchrun(args: list[str], script: Path = REPO / "train.py", timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(torchrun_cmd(args, script), env=dict(os.environ), capture_output=True, text=True, timeout=timeout, cwd=REPO)


@contextmanager
def launched(cmd: list[str], log: Path, **env):
    """A torchrun launcher running `cmd` (its output in `log`, not a pipe that could fill), stopped at the end if
    it still runs: SIGTERM, which it passes on to its processes, then SIGKILL."""
    with open(log, "w") as out:
        launcher = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT, text=True, cwd=REPO)
        try:
            yield launcher
        finally:
            if launcher.poll() is None:
                launcher.terminate()
                try:
                    launcher.wait(60)
                except subprocess.TimeoutExpired:
                    launcher.kill()
                    launcher.wait()


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def timeless(out: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in metrics(out)]


def weights(folder: Path) -> dict:
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def trained(wa: dict, wb: dict, start: dict | None) -> torch.Tensor:
    """[all entries] bool: the entries that moved from `start` in either run (all of them without a start)."""
    if start is None:
        return torch.ones(sum(w.numel() for w in wa.values()), dtype=torch.bool)
    return torch.cat([((wa[k] != start[k]) | (wb[k] != start[k])).flatten() for k in wa])


def assert_same_run(a: Path, b: Path) -> None:
    """Two runs bit for bit: every metric but the speed, and every saved weight."""
    assert timeless(a) == timeless(b)
    wa, wb = weights(a / "model"), weights(b / "model")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def assert_close_runs(a: Path, b: Path, folder: str = "model", start: dict | None = None, dpo: bool = False) -> None:
    ra, rb = metrics(a), metrics(b)
    assert [r["step"] for r in ra] == [r["step"] for r in rb]
    for x, y in zip(ra, rb):
        # Each rank packs or pads its own half of the batch, so attention and the matmuls run in other calls of
        # other shapes (clo/model/gathered_attention.py): at step 4 of "stages" the loss of 3.23 differed by 1.2e-6
        # (packed rows, uncompiled)
        # DPO's loss is -log σ(margin) alone, whose slope is under 1: it may move by as much as the margin
        # (0.6825 at step 2 of sft-dpo: 1.1e-6 apart); CLO's losses (2.5-3.2, half of it NLL) stay within TOL
        loss_tol = TOL * abs(x.get("loss", 0)) + (MARGIN_TOL if dpo else 0)
        for key, tol in (("loss", loss_tol), ("nll", TOL * abs(x.get("nll", 0))), ("margin", MARGIN_TOL), ("accuracy", 0)):
            if key in x:
                assert abs(x[key] - y[key]) <= tol, (x["step"], key, x[key], y[key])
        # The norm sums every gradient's square (the embedding's too, under stage "all"), reduced in another
        # order on 2 ranks and through matmul kernels of other shapes: 1.6e-5 relative at step 4 of "stages"
        # on an AMD EPYC with AVX-512, no AMX (packed rows, uncompiled; loss within 2.4e-7 there; the other cases
        # and steps under 1.3e-6); 6.4e-6 on the same kind of CPU with the compiled padded blocks (loss 3.7e-7).
        assert abs(x["grad_norm"] - y["grad_norm"]) <= GRAD_NORM_RTOL * x["grad_norm"], (x["step"], x["grad_norm"], y["grad_norm"])
    wa, wb = weights(a / folder), weights(b / folder)
    assert wa.keys() == wb.keys()
    diffs = torch.cat([(wa[k].float() - wb[k].float()).abs().flatten() for k in wa])
    # counted among the entries that trained (moved from `start` in either run), so that the many frozen
    # ones, equal in both, cannot dilute a gap confined to a few tensors
    moved = trained(wa, wb, start)
    far = diffs > TOL
    assert far.sum() <= 1e-3 * moved.sum(), f"{int(far.sum())} of the {int(moved.sum())} trained weights differ by more than {TOL}"
    assert diffs.max() <= LR, diffs.max()


# attention and lora: CPU's default packed rows; lora also accumulates micro-batches of 3, 3 and 2 examples
# (shares of 2 + 1 and 1 + 1: the step's counts are every share's denominators, clo/train/step.py). stages: a stage change (a new optimizer, the embedding trained too)
# on the path several GPUs take by default (padded rows, compiled blocks inside FSDP2's units), with activation
# checkpointing and weight decay (two parameter groups in stage 2; cold inductor cache: ~40 s more). sft-dpo: the
# paper's second baseline, SFT (NLL alone) then DPO from the SFT model (its reference table computed on 2 processes)
EXTRAS = {"attention": ("--stages", "attn:2"), "lora": ("--lora", "--save-merged", "--batch-size", "3", "--grad-accum", "2"),
          "stages": ("--stages", "attn:1,all:1", "--weight-decay", "0.1", "--checkpoint-activations", *COMPILED),
          "sft-dpo": ("--method", "sft-dpo", "--stages", "attn:1")}


@pytest.fixture(scope="module")
def two(tiny, tmp_path_factory):
    """{case: the output folder of a 2-process run}, made once (each case computes its reference table)."""
    runs = {}

    def run(case):
        if case not in runs:
            root = tmp_path_factory.mktemp(f"two-{case}")
            env = {**os.environ, "CLO_CACHE": str(root / "cache")}
            done = subprocess.run(torchrun_cmd(argv(tiny, root / "two", *EXTRAS[case])), env=env, capture_output=True, text=True, timeout=240, cwd=REPO)
            assert done.returncode == 0, done.stderr[-3000:]
            runs[case] = root / "two"
        return runs[case]

    return run


@pytest.mark.parametrize("case", list(EXTRAS))
def test_two_processes_train_as_one(tiny, two, tmp_path, case):
    one, two = train.main(argv(tiny, tmp_path / "one", *EXTRAS[case])), two(case)
    assert_close_runs(one, two, start=weights(tiny[0]), dpo=case == "sft-dpo")
    if case == "lora":
        assert_close_runs(one, two, "adapter")
    if case == "sft-dpo":
        assert_close_runs(one / "sft", two / "sft", start=weights(tiny[0]))
        assert "nll" in metrics(one / "sft")[0] and "margin" in metrics(one)[0]
    assert json.loads((two / "run.json").read_text())["summary"]["steps"] == len(metrics(one))
    assert [p.name for p in two.iterdir() if p.name.startswith((".model.", ".checkpoint.pt."))] == []  # no temporary left
    if case == "attention":
        # the reference table computed by 2 processes is the 1-process table, under the same cache key
        [a], [b] = (list((root / "reference").glob("ref-*.pt")) for root in (tmp_path / "cache", two.parent / "cache"))
        assert a.name == b.name and torch.equal(torch.load(a, weights_only=True), torch.load(b, weights_only=True))
        # and the saved folder loads in transformers with the 1-process folder's logits
        transformers = pytest.importorskip("transformers")
        tokens = torch.tensor([[5, 9, 17, 33, 4, 8, 2]])
        with torch.no_grad():
            la, lb = (transformers.AutoModelForCausalLM.from_pretrained(f / "model", torch_dtype=torch.float32)(tokens).logits for f in (one, two))
        assert torch.allclose(la, lb, atol=1e-5)


def test_cudas_bf16_policy_on_two_processes_trains_as_one_and_saves_frozen_weights_exactly(tiny, tmp_path):
    """The FSDP2 mixed-precision policy that CUDA gets (blocks gathered in bf16 for compute, gradients reduced
    in fp32, fp32 master weights), forced on 2 CPU processes under bf16 autocast (`--amp on`), on CUDA's
    default path (padded rows, compiled blocks): the gathered
    weights really are bf16, the run trains as the 1-process autocast run does (losses to 1e-3; bf16 noise
    may flip the sign of a tiny gradient, and Adam turns that into a 2·lr gap, so up to 5% of the trained
    entries may differ by more than 1e-4), and the weights it does not train are saved bit for bit."""
    seen = tmp_path / "gathered-dtypes.txt"
    script = tmp_path / "bf16_policy.py"
    script.write_text(textwrap.dedent(f"""
        import atexit, os, sys, torch
        sys.path.insert(0, {str(REPO)!r})
        import clo.train.distributed as distributed
        import train
        from clo.errors import run_cli
        from torch.distributed.tensor import DTensor
        real, dtypes, split = distributed.shard, set(), []
        def shard(model, world, compute_dtype, device=None):
            real(model, world, torch.bfloat16, device)  # what train.py passes on CUDA
            model.layers[0].self_attn.q_proj.register_forward_pre_hook(lambda m, args: dtypes.add(str(m.weight.dtype)))
            # every weight, frozen or trained, a DTensor of which this process holds a part only
            split.append(all(isinstance(p, DTensor) and p.to_local().numel() < p.numel() for p in model.parameters()))
        distributed.shard = shard
        if os.environ["RANK"] == "0":
            atexit.register(lambda: open({str(seen)!r}, "w").write(" ".join(sorted(dtypes)) + f" sharded={{split}}"))
        run_cli(lambda: train.main(sys.argv[1:]))
    """))
    args = [*argv(tiny, tmp_path / "two", "--max-steps", "2"), "--amp", "on", *COMPILED]
    done = torchrun(args, script)
    assert done.returncode == 0, done.stderr[-3000:]
    assert seen.read_text() == "torch.bfloat16 sharded=[True]"  # the policy was applied, not only passed along; every weight sharded
    one = train.main([*argv(tiny, tmp_path / "one", "--max-steps", "2"), "--amp", "on", *COMPILED])
    for x, y in zip(metrics(one), metrics(tmp_path / "two"), strict=True):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-3) and y["grad_norm"] == pytest.approx(x["grad_norm"], rel=2e-2), (x, y)
    source, wa, wb = weights(tiny[0]), weights(one / "model"), weights(tmp_path / "two" / "model")
    trained = [k for k in source if not torch.equal(wa[k], source[k])]
    assert trained and all(".self_attn." in k for k in trained)  # train.py's default stage: attention only
    for k in source:
        assert wb[k].dtype == torch.float32, k
        if k not in trained:
            assert torch.equal(wb[k], source[k]), k
    diffs = torch.cat([(wa[k] - wb[k]).abs().flatten() for k in trained])
    # Adam moves an entry by at most ~lr a step (1.0014·lr at step 2), so two runs part by at most ~2·lr a step
    assert (diffs > 1e-4).float().mean() <= 0.05 and diffs.max() <= 4.01 * LR, diffs.max()


def test_one_process_under_torchrun_is_plain_python(tiny, tmp_path):
    """torchrun with 1 process has nothing to shard: it runs the plain path, bit for bit, and writes the same files."""
    plain = train.main(argv(tiny, tmp_path / "plain", "--save-every", "2"))
    done = subprocess.run(torchrun_cmd(argv(tiny, tmp_path / "one", "--save-every", "2"), processes=1), env=dict(os.environ),
                          capture_output=True, text=True, timeout=240, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    strip = [{k: v for k, v in row.items() if k != "tokens_per_s"} for row in metrics(plain)]
    assert strip == [{k: v for k, v in row.items() if k != "tokens_per_s"} for row in metrics(tmp_path / "one")]
    a, b = weights(plain / "model"), weights(tmp_path / "one" / "model")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ca, cb = (torch.load(d / "checkpoint.pt", weights_only=False) for d in (plain, tmp_path / "one"))
    assert not isinstance(cb["rng"], list) and ca["settings"] == cb["settings"]  # either resumes the other


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_machines_of_one_process_train_as_two_processes_of_one(tiny, two, tmp_path):
    """--nnodes 2: two torchrun launchers (here on one machine, as two nodes would run them), each with
    one process of local rank 0, meet at the first one's address; ranks, not local ranks, decide who
    writes and which share each takes, so the run is the 2-process run bit for bit."""
    port, args = free_port(), argv(tiny, tmp_path / "nodes", *EXTRAS["attention"])
    with ExitStack() as stack:
        nodes = [stack.enter_context(launched([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node),
                                               "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", str(port),
                                               str(REPO / "train.py"), *args], tmp_path / f"node-{node}.log",
                                              OMP_NUM_THREADS="1"))  # as torchrun sets it for 2 processes on one machine
                 for node in (0, 1)]
        for node in nodes:
            node.wait(240)
    errors = [(tmp_path / f"node-{node}.log").read_text() for node in (0, 1)]
    assert [node.returncode for node in nodes] == [0, 0], errors[0][-3000:] + errors[1][-3000:]
    assert "model saved to" in errors[0] and "model saved to" not in errors[1]  # process 0 alone writes
    assert_same_run(tmp_path / "nodes", two("attention"))


def worker(tmp_path: Path, body: str, rank: int = 1, call: int = 2) -> Path:
    """A train.py stand-in that patches AdamW.step on process `rank` with `body`, run after its `call`-th update."""
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(f"""
        import os, signal, sys, time, torch
        sys.path.insert(0, {str(REPO)!r})
        import train
        from clo.errors import run_cli
        if os.environ["RANK"] == "{rank}":
            real, calls = torch.optim.AdamW.step, []
            def step(self, *a, **k):
                result = real(self, *a, **k)
                calls.append(1)
                if len(calls) == {call}:
                    {body}
                return result
            torch.optim.AdamW.step = step
        run_cli(lambda: train.main(sys.argv[1:]))
    """))
    return script


def test_sigterm_on_one_process_saves_once_and_resumes_exactly(tiny, two, tmp_path):
    """SIGTERM reaching rank 1 right after its 3rd update (mid-way through stage 2, whose optimizer has one
    step of sharded AdamW state): every process stops after that step with 143, the checkpoint holds step 3,
    and the resumed 2-process run equals an uninterrupted one bit for bit (a resume that restored the
    moments wrongly, or not at all, would part at step 4)."""
    extra, full = EXTRAS["stages"], two("stages")
    part = tmp_path / "part"
    stopped = torchrun(argv(tiny, part, *extra), worker(tmp_path, "os.kill(os.getpid(), signal.SIGTERM)", call=3))
    assert stopped.returncode != 0 and "exitcode  : 143" in stopped.stderr, stopped.stderr[-3000:]
    assert f"interrupted: checkpoint saved to {part / 'checkpoint.pt'} at step 3" in stopped.stderr
    saved = torch.load(part / "checkpoint.pt", weights_only=True)
    assert saved["position"]["step"] == 3 and saved["position"]["stage"] == 1 and len(saved["rng"]) == 2 and saved["weights"] is None
    # sharded: each process wrote its own part, and the two parts hold each trained tensor's entries once,
    # and so do the AdamW moments of stage 2's (sharded) parameters
    shards = part / saved["shards"]["folder"]
    assert sorted(f.name for f in shards.iterdir()) == ["rank-00000-of-00002.pt", "rank-00001-of-00002.pt"]
    a, b = (torch.load(f, weights_only=True) for f in sorted(shards.iterdir()))
    whole = {k.removeprefix("model."): v for k, v in weights(tiny[0]).items()}  # the starting model: HF names
    wa, wb = a["weights"], b["weights"]
    assert wa.keys() == wb.keys() and wa
    for name in wa:
        assert wa[name].numel() + wb[name].numel() == whole[name].numel() and 0 < wa[name].numel() < whole[name].numel(), name
    moments = [(x["exp_avg"], y["exp_avg"]) for x, y in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values())]
    assert moments and sum(x.numel() + y.numel() for x, y in moments) == sum(v.numel() for v in whole.values())  # stage "all"
    assert all(x.abs().sum() > 0 and y.abs().sum() > 0 for x, y in moments)
    # a later save killed half-way left a folder that checkpoint.pt does not name: ignored, then removed
    (part / "checkpoint-shards" / "step-00000099").mkdir()
    (part / "checkpoint-shards" / "step-00000099" / "rank-00000-of-00002.pt").write_bytes(b"torn")
    resumed = torchrun(argv(tiny, part, *extra, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    final = torch.load(part / "checkpoint.pt", weights_only=True)
    assert [f.name for f in (part / "checkpoint-shards").iterdir()] == [Path(final["shards"]["folder"]).name]
    assert_same_run(part, full)
    # another number of processes: refused, not approximated
    with pytest.raises(CloError, match=r"made with the number of processes \(torchrun .*\) 2, this one has 1"):
        train.main(argv(tiny, part, *extra, "--resume", "--max-steps", "3"))


def test_ctrl_c_at_torchrun_saves_once_and_resumes_exactly(tiny, two, tmp_path):
    """Ctrl-C in torchrun's terminal reaches torchrun alone (its processes run in sessions of their own);
    torchrun passes SIGINT on to every process. Here it comes while rank 0 is inside its 2nd update, in the
    middle of stage attn:2 (the packed path): both processes finish that step and save once, and
    the resumed run equals an uninterrupted one bit for bit."""
    part, marker = tmp_path / "part", tmp_path / "in-step-2"
    # rank 0 says it is in step 2, then stays in it until SIGINT has come (at most 60 s): no race with the signal
    wait = ("seen, handler = [], signal.getsignal(signal.SIGINT); "
            "signal.signal(signal.SIGINT, lambda s, f: (seen.append(s), handler(s, f))); "
            f"open({str(marker)!r}, 'w').close(); [time.sleep(0.05) for _ in range(1200) if not seen]")
    script = worker(tmp_path, wait, rank=0, call=2)
    with launched(torchrun_cmd(argv(tiny, part, *EXTRAS["attention"]), script), tmp_path / "launcher.log") as launcher:
        deadline = time.monotonic() + 180
        while not marker.exists() and launcher.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        launcher.send_signal(signal.SIGINT)
        launcher.wait(120)
    stderr = (tmp_path / "launcher.log").read_text()
    assert launcher.returncode != 0 and "got signal: 2" in stderr, stderr[-3000:]  # torchrun's own report
    assert stderr.count(f"interrupted: checkpoint saved to {part / 'checkpoint.pt'} at step 2") == 1, stderr[-3000:]
    saved = torch.load(part / "checkpoint.pt", weights_only=True)
    assert saved["position"]["step"] == 2 and saved["position"]["stage"] == 0  # 2 of the stage's 4 steps: its optimizer goes on
    resumed = torchrun(argv(tiny, part, *EXTRAS["attention"], "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(part, two("attention"))


@pytest.mark.parametrize("failure, shown", [("raise RuntimeError('rank 1 fails on purpose')", "rank 1 fails on purpose"),
                                            ("os.kill(os.getpid(), signal.SIGKILL)", "Signal 9 (SIGKILL)")],  # out of memory, say
                         ids=["raises", "killed"])
def test_a_failing_process_ends_the_job(tiny, tmp_path, failure, shown):
    start = time.monotonic()
    done = torchrun(argv(tiny, tmp_path / "run", "--stages", "attn:4"), worker(tmp_path, failure), timeout=180)
    assert done.returncode != 0
    assert shown in done.stderr, done.stderr[-3000:]
    assert time.monotonic() - start < 120
    assert not (tmp_path / "run" / "model").exists()


def test_a_checkpoint_naming_other_parts_is_refused(tmp_path):
    """checkpoint.pt comes from a folder people share: its "shards" field must name this run's own parts."""
    from clo.train.resume import read_shard

    for shards in ({"folder": "../../elsewhere", "processes": 2}, {"folder": "checkpoint-shards/step-00000002", "processes": 3}, None):
        with pytest.raises(CloError, match="field 'shards'"):
            read_shard(tmp_path, shards, 0, 2)
    with pytest.raises(CloError, match="rank-00001-of-00002.pt: missing"):
        read_shard(tmp_path, {"folder": "checkpoint-shards/step-00000002", "processes": 2}, 1, 2)
    torn = tmp_path / "checkpoint-shards" / "step-00000002" / "rank-00000-of-00002.pt"
    torn.parent.mkdir(parents=True)
    torn.write_bytes(b"torn")
    with pytest.raises(CloError, match="cannot read checkpoint part"):
        read_shard(tmp_path, {"folder": "checkpoint-shards/step-00000002", "processes": 2}, 0, 2)


def test_batch_smaller_than_the_processes_is_refused():
    check_batch(2, World(0, 2, 0, True))
    with pytest.raises(CloError, match="--batch-size 1: smaller than the 2 processes"):
        check_batch(1, World(0, 2, 0, True))
