"""Resume: the loss curve after resuming from a checkpoint is the uninterrupted run's; half-written checkpoints are
never loaded."""

from __future__ import annotations

import json
import shutil

import pytest
from transformers import TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from tests.testing_utils import build_tokenizer, qa_config, qa_dataset, tiny_llama
from trl_qaloss import QALossSFTTrainer
from trl_qaloss.checkpoints import is_complete_checkpoint

STEPS, SAVE_STEPS = 4, 2


class StopAt(TrainerCallback):
    """Stops training after step `step` (after its checkpoint is saved): a run killed right after a checkpoint."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def make_trainer(output_dir, callbacks=()):
    tokenizer = build_tokenizer()
    # 6 rows in batches of 2: the resumed run ends the first epoch and must restore the second one's data order.
    args = qa_config(
        output_dir,
        max_steps=STEPS,
        save_strategy="steps",
        save_steps=SAVE_STEPS,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
    )
    return QALossSFTTrainer(
        model=tiny_llama(len(tokenizer)),
        args=args,
        train_dataset=qa_dataset(6),
        processing_class=tokenizer,
        callbacks=list(callbacks),
    )


def curve(trainer, first_step=1):
    return {
        e["step"]: (e["loss"], e["set_loss"])
        for e in trainer.state.log_history
        if "set_loss" in e and e["step"] >= first_step
    }


def test_resume_reproduces_the_uninterrupted_loss_curve(tmp_path):
    full = make_trainer(tmp_path / "full")
    full.train()
    expected = curve(full)
    assert len(expected) == STEPS

    stopped = make_trainer(tmp_path / "run", callbacks=[StopAt(SAVE_STEPS)])
    stopped.train()
    assert max(curve(stopped)) == SAVE_STEPS
    checkpoint = tmp_path / "run" / f"checkpoint-{SAVE_STEPS}"
    assert is_complete_checkpoint(checkpoint)

    # A later save that the kill interrupted: weights there, trainer state not yet (or cut short).
    broken = tmp_path / "run" / f"checkpoint-{SAVE_STEPS + 1}"
    shutil.copytree(checkpoint, broken)
    (broken / "trainer_state.json").write_text(json.dumps({"global_step": SAVE_STEPS + 1})[:10])
    half = tmp_path / "run" / f"checkpoint-{SAVE_STEPS + 2}"
    shutil.copytree(checkpoint, half)
    (half / "trainer_state.json").unlink()
    # transformers alone would resume from the highest-numbered directory, whatever it holds.
    assert get_last_checkpoint(str(tmp_path / "run")) == str(half)

    match = rf"checkpoint-{SAVE_STEPS + 2}.*not a complete checkpoint.*Resume from .*checkpoint-{SAVE_STEPS}'"
    with pytest.raises(ValueError, match=match):
        make_trainer(tmp_path / "run").train(resume_from_checkpoint=str(half))

    resumed = make_trainer(tmp_path / "run")
    resumed.train(resume_from_checkpoint=True)
    after = curve(resumed, first_step=SAVE_STEPS + 1)
    assert sorted(after) == list(range(SAVE_STEPS + 1, STEPS + 1))
    for step, values in after.items():
        assert values == pytest.approx(expected[step], rel=1e-5), step
    assert is_complete_checkpoint(half)  # the resumed run saved over it


def test_resume_without_a_complete_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="No complete checkpoint"):
        make_trainer(tmp_path).train(resume_from_checkpoint=True)
