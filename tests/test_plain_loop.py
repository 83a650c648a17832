"""``examples/plain_loop.py`` (issue 32, item 2): the engine behind the callback, driven by a
hand-written PyTorch loop on real MNIST digits, with no Lightning import; its milestones, its ranks
and a resume from a saved state that continues exactly as the uninterrupted run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from examples import plain_loop
from factorize_plugin import FactorizedLinear

ROOT = Path(__file__).resolve().parents[1]


def ranks(model: torch.nn.Module) -> dict[str, int | None]:
    return {n: (m.rank if isinstance(m, FactorizedLinear) else None) for n, m in model.named_children() if n in "024"}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    torch.set_num_threads(1)
    return plain_loop.train(4, checkpoint=tmp_path_factory.mktemp("plain") / "run.pt", verbose=False)


def test_milestones_apply_at_their_epochs_with_the_scheduled_ranks(uninterrupted):
    engine, model = uninterrupted["engine"], uninterrupted["model"]
    assert engine.done == [1, 3]
    assert [h["epoch"] for h in engine.history] == [1, 3]
    assert [h["statistics"] for h in engine.history] == ["validation", "validation"]  # the observed evaluations
    # rank = fraction x min(in, out); a pair that would not save multiply-adds stays dense (256x256 at 0.5)
    assert engine.history[0]["ranks"] == {"0": 128, "2": None, "4": 32}
    assert ranks(model) == engine.ranks == {"0": 64, "2": 64, "4": 16}
    assert uninterrupted["accuracy"][3] > 0.85  # it still learns the digits at a quarter of the ranks
    assert [h["global_step"] for h in engine.history] == [63, 189]  # 63 optimizer steps per epoch


def test_a_resumed_run_continues_exactly(uninterrupted, tmp_path):
    """Stopped after epoch 2 (one milestone done, one to come) and resumed from its checkpoint in a
    fresh model, optimizer and engine: the same milestones, ranks, history and weights."""
    torch.set_num_threads(1)
    path = tmp_path / "run.pt"
    first = plain_loop.train(4, checkpoint=path, stop_after=2, verbose=False)
    assert first["engine"].done == [1]
    resumed = plain_loop.train(4, checkpoint=path, resume=path, verbose=False)
    engine = resumed["engine"]
    assert engine.done == [1, 3] and ranks(resumed["model"]) == ranks(uninterrupted["model"])
    assert [(h["epoch"], h["ranks"]) for h in engine.history] == [
        (h["epoch"], h["ranks"]) for h in uninterrupted["engine"].history
    ]
    a, b = resumed["model"].state_dict(), uninterrupted["model"].state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["accuracy"][3] == uninterrupted["accuracy"][3]


def test_the_engine_state_is_plain_data(uninterrupted, tmp_path):
    state = uninterrupted["engine"].state_dict()
    torch.save(state, tmp_path / "state.pt")
    assert torch.load(tmp_path / "state.pt", weights_only=True) == state  # torch's safe unpickler


def test_the_plain_loop_imports_no_lightning():
    code = (
        "import sys; sys.argv = ['plain_loop', '--epochs', '2']\n"
        "import runpy; runpy.run_path('examples/plain_loop.py', run_name='__main__')\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning'))\n"
        "assert not bad, bad\n"
        "print('no lightning')"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "no lightning" in out.stdout and "epoch 1: evaluation accuracy" in out.stdout


def test_the_engine_in_a_plain_two_process_ddp_loop(tmp_path):
    """``PlainHost`` in a ``torch.distributed`` job (gloo, 2 processes, each with its own data): the
    statistics are summed over both (the fit is to the union of their batches), the ranks agree and
    both install bit-identical factors at every milestone."""
    from sharded_script import free_port

    out = subprocess.run([sys.executable, str(ROOT / "tests" / "plain_ddp_script.py"), str(tmp_path), str(free_port())],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["world"] == r1["world"] == 2
    assert [h["epoch"] for h in r0["history"]] == [1, 2] and r0["ranks"] == r1["ranks"] == {"0": 12, "2": 16}
    assert [h["ranks"] for h in r0["history"]] == [h["ranks"] for h in r1["history"]]
    assert [h["samples"] for h in r0["history"]] == [h["samples"] for h in r1["history"]]
    assert r0["history"][0]["samples"]["0"] == 2 * 2 * 32  # both processes' evaluation rows
    assert all(torch.equal(r0["weights"][n], r1["weights"][n]) for n in ("0", "2"))


def test_a_driver_adds_milestones_as_it_goes_and_may_not_go_back_up():
    from factorize_plugin import FactorizationEngine

    engine = FactorizationEngine(speed_guard=False)
    assert engine.schedule == {} and not engine.pending()
    engine.add_milestone(2, 0.5)
    engine.add_milestone(4, 0.25)
    assert list(engine.schedule) == [2, 4] and engine.due(3) == [2] and engine.pending()
    with pytest.raises(ValueError, match="goes back up at epoch 6"):
        engine.add_milestone(6, 0.75)
    assert list(engine.schedule) == [2, 4]  # a refused milestone leaves the schedule as it was
