"""Distillation in checkpointed pieces: exactly the steps of one uninterrupted phase."""

import json

import pytest
import torch

from bgd_dist.finetune import PhaseSpec, PhaseState
from bgd_dist.phases import checkpoint_path, load_checkpoint, run_phase, save_checkpoint, start_digest
from bgd_dist.student import student_state

from toy import quantized_toy


@pytest.fixture(scope="module")
def setup():
    cfg, _, _, plan, student, executor = quantized_toy()
    return cfg, plan, student, executor


SPECS = {
    "global": PhaseSpec("global", 9, 0.05, 0.9, 1e-4, 8, milestones=(4, 7), gamma=0.5, train_mode=True, seed=5),
    "layerwise": None,
}


def _spec(plan, name):
    if name == "global":
        return SPECS["global"]
    return PhaseSpec("layerwise", 9, 0.05, 0.9, 1e-4, 8, layers=tuple(plan.stages[1]), seed=7)


def _bits(state: PhaseState):
    out = {f"c.{k}": v for k, v in state.centroids.items()}
    for i, bufs in enumerate(state.buffers):
        out.update({f"b{i}.{k}": v for k, v in bufs.items()})
    for idx, st in state.optimizer["state"].items():
        out[f"m.{idx}"] = st["momentum_buffer"]
    return out


@pytest.mark.parametrize("phase", ["layerwise", "global"])
def test_pieces_and_a_file_round_trip_equal_one_straight_run(setup, tmp_path, phase):
    cfg, plan, student, ex = setup
    spec = _spec(plan, phase)
    ex.load_student(student_state(student))
    straight = ex.distill(spec)
    assert straight.step == 9 and len(straight.losses) == 9
    ex.load_student(student_state(student))
    state = None
    for stop in (2, 3, 7, 9):   # uneven pieces, across both milestones, each through a file
        state = ex.distill(spec, state, stop)
        save_checkpoint(tmp_path / "c.pt", spec, state, "d")
        state = load_checkpoint(tmp_path / "c.pt", spec, "d", 1)
    a, b = _bits(straight), _bits(state)
    assert a.keys() == b.keys() and len(a) > len(state.centroids)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert state.losses == straight.losses
    assert state.optimizer["param_groups"][0]["lr"] == straight.optimizer["param_groups"][0]["lr"]
    if phase == "global":
        assert straight.optimizer["param_groups"][0]["lr"] == pytest.approx(0.05 * 0.25)
        assert int(state.buffers[0]["bn1.num_batches_tracked"]) == 9


def test_a_checkpoint_of_another_phase_is_not_used(setup, tmp_path):
    cfg, plan, student, ex = setup
    spec = _spec(plan, "layerwise")
    ex.load_student(student_state(student))
    state = ex.distill(spec, None, 3)
    path = tmp_path / "c.pt"
    save_checkpoint(path, spec, state, "d")
    assert load_checkpoint(path, spec, "d", 1).step == 3
    assert load_checkpoint(path, spec, "other start", 1) is None
    assert load_checkpoint(path, PhaseSpec(**{**spec.__dict__, "lr": 0.5}), "d", 1) is None
    path.write_bytes(path.read_bytes()[:50])              # damaged: start again rather than fail
    assert load_checkpoint(path, spec, "d", 1) is None


def test_run_phase_resumes_from_its_checkpoint_and_logs_losses(setup, tmp_path):
    cfg, plan, student, ex = setup
    spec = _spec(plan, "global")
    events = []
    log = lambda name, **f: events.append({"event": name, **f})
    ex.load_student(student_state(student))
    straight = run_phase(ex, spec, tmp_path / "a" / "distill.pt", 4, student, log, show=False)
    assert [e["step"] for e in events if e["event"] == "loss"] == [4, 8, 9]
    # an interrupted phase: its checkpoint at step 4 is there; the rest runs from it
    ex.load_student(student_state(student))
    part = ex.distill(spec, None, 4)
    path = checkpoint_path(tmp_path / "b", spec)
    save_checkpoint(path, spec, part, start_digest(student, spec))
    events.clear()
    ex.load_student(student_state(student))
    resumed = run_phase(ex, spec, path, 4, student, log, show=False)
    assert events[0]["event"] == "phase_start" and events[0]["start_step"] == 4
    assert [e["step"] for e in events if e["event"] == "loss"] == [8, 9]
    assert resumed.losses == straight.losses
    for k, v in _bits(straight).items():
        assert torch.equal(v, _bits(resumed)[k]), k
    json.dumps(events)   # plain data for log.jsonl


class _Tty:
    """A terminal-like stream that records what a bar writes."""

    def __init__(self, tty):
        self.tty, self.text = tty, ""

    def isatty(self):
        return self.tty

    def write(self, s):
        self.text += s

    def flush(self):
        pass


def test_bars_draw_on_a_terminal_and_stay_silent_in_a_redirected_log():
    from bgd_dist.progress import bar

    for tty in (True, False):
        stream = _Tty(tty)
        with bar(10, "global", "step", file=stream) as b:
            b.update(4)
        assert ("4/10" in stream.text) == tty and ("" == stream.text) != tty


def test_the_serial_executor_reports_every_step_to_the_bar(setup):
    cfg, plan, student, ex = setup
    spec = _spec(plan, "layerwise")
    ex.load_student(student_state(student))
    seen = []
    state = ex.distill(spec, None, 5, progress=lambda step, loss: seen.append((step, loss)))
    assert [s for s, _ in seen] == [1, 2, 3, 4, 5] and [l for _, l in seen] == state.losses
