"""Checkpoints: the training state of a run written atomically, so a long run resumes mid-way.

With `checkpoint_every`, the state (the method's trainable state, optimizer(s), learning-rate schedule, loss
scaler, RNG states, loss history, step) goes to <run>/checkpoint/state.pt; a restarted run resumes from it when it
is not past a snapshot still to sample, otherwise from step 0. The checkpoint is deleted once the run is done.

What this module does not hold: what the state means (the method and the updaters own their parts).
"""

from __future__ import annotations

import random
from collections.abc import Collection
from typing import TYPE_CHECKING, Any

import torch

from harness.records import CHECKPOINT_FILE
from harness.store import RunFolder, atomic_path, discard

if TYPE_CHECKING:
    from harness.trainer.session import TrainingSession


def rng_states() -> dict[str, Any]:
    states: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(session: TrainingSession, folder: RunFolder, history: list[dict[str, Any]]) -> None:
    state = {
        "run_key": folder.spec.run_key,
        "step": session.step,
        "method": session.method.state_dict(session.components),
        "updater": session.updater.state_dict(),
        "scaler": session.scaler.state_dict() if session.scaler else None,
        "rng": rng_states(),
        "history": history,
    }
    with atomic_path(folder.file(CHECKPOINT_FILE)) as tmp:
        torch.save(state, tmp)


def load_checkpoint(folder: RunFolder, device: torch.device) -> dict[str, Any] | None:
    path = folder.file(CHECKPOINT_FILE)
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as error:  # a checkpoint cut short by a kill mid-write of an older version, a damaged disk
        discard(f"cannot be read ({type(error).__name__})", path)
        return None
    if state.get("run_key") != folder.spec.run_key:
        raise RuntimeError(f"{path} belongs to run {state.get('run_key')!r}, not {folder.spec.run_key!r}; "
                           "delete it to train this run from step 0.")
    return state


def restore_checkpoint(session: TrainingSession, state: dict[str, Any]) -> list[dict[str, Any]]:
    session.method.load_state_dict(session.components, state["method"])
    session.updater.load_state_dict(state["updater"])
    if session.scaler and state["scaler"]:
        session.scaler.load_state_dict(state["scaler"])
    restore_rng_states(state["rng"])
    session.step = state["step"]
    return list(state["history"])


def usable_checkpoint(state: dict[str, Any] | None, pending: Collection[int], end_step: int) -> bool:
    """A checkpoint serves unless it is past a snapshot still to sample or past the end."""
    if state is None:
        return False
    limit = min([*pending, end_step])
    return state["step"] <= limit
