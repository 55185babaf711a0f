"""Where the answer orders that read the model ("preferred", "aligned") get its scores: a scorer.

A scorer answers two questions about one batch, each from a teacher-forced forward on the batch as given:
`logits_at(positions)`, the logits at a few positions, and `argmax(targets)`, the predicted token at every labelled
position. `LogitsScorer` reads them from logits already computed; `ModelScorer` runs the model for them, without
gradient and with dropout off, building only what is read.

Dimension letters as in `loss.py`: B rows, T positions (un-shifted), P = T - 1 target positions, V vocabulary, H
hidden size, K kept positions.
"""

from __future__ import annotations

import contextlib
import inspect

import torch

from .logprobs import row_chunks, rows_per_chunk, vocab_stats


def argmax_predictions(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """`[B, P]` the argmax of `logits` `[B, >= P, V]` at every labelled target position (0 elsewhere), read in
    chunks: no copy of the logits is made."""
    rows_b, rows_p = (targets != -100).nonzero(as_tuple=True)
    predictions = torch.zeros_like(targets)
    predictions[rows_b, rows_p] = vocab_stats(logits, rows_b * logits.size(1) + rows_p, with_lse=False).argmax
    return predictions


class LogitsScorer:
    """Scores read from `logits` `[B, T, V]`, un-shifted, of a forward on the batch."""

    def __init__(self, logits: torch.Tensor):
        self.logits = logits

    def logits_at(self, positions: torch.Tensor) -> torch.Tensor:
        """`[B, K, V]` logits at the sorted `positions` `[K]`."""
        return self.logits[:, positions]

    def argmax(self, targets: torch.Tensor) -> torch.Tensor:
        """`[B, P]` the predicted token at every labelled position of the shifted `targets` `[B, P]` (0 elsewhere)."""
        return argmax_predictions(self.logits, targets)


def peft_base(model):
    """`model` without its PEFT wrapper, if it has one."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def accepts_logits_to_keep(model) -> bool:
    """Whether `model` (a PEFT model is read through to its base) takes `logits_to_keep` in its forward."""
    base = peft_base(model)
    return "logits_to_keep" in inspect.signature(type(base).forward).parameters


def backbone_and_head(model):
    """`(backbone, lm_head)` of a causal LM (a PEFT model is read through to its base), or None if it has no such
    split: a backbone that returns `last_hidden_state` and a linear head."""
    base = peft_base(model)
    backbone = getattr(base, "base_model", None)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if backbone is None or backbone is base or not isinstance(getattr(head, "weight", None), torch.Tensor):
        return None
    if not hasattr(head, "out_features"):
        return None
    return backbone, head


@contextlib.contextmanager
def dropout_off(model):
    """Dropout layers in eval mode, so that a scoring forward does not depend on a random mask. Only them: in eval
    mode, bitsandbytes' 4-bit layers repack their weights in place on some CPUs, which breaks the next training
    step."""
    dropouts = [m for m in model.modules() if isinstance(m, torch.nn.Dropout) and m.training]
    for m in dropouts:
        m.eval()
    try:
        yield
    finally:
        for m in dropouts:
            m.train()


class ModelScorer:
    """Scores from forwards of `model` without gradient on `inputs`, dropout off.

    Args:
        model: the model as training calls it (wrapped by DDP, FSDP or DeepSpeed, or not).
        inputs: the batch, as passed to the model (`labels` is not passed on).
        keeps_logits: whether the model takes `logits_to_keep` (see `accepts_logits_to_keep`); then only the kept
            positions' logits are built.
        unwrapped_model: `model` without its distributed wrapper, whose backbone and LM head `argmax` calls apart so
            that no `[B, T, V]` logits are built. None when the parameters are sharded (FSDP, DeepSpeed ZeRO-3), which
            gathers them only inside the wrapped model's forward: `argmax` then reads the logits of that forward.
    """

    def __init__(self, model, inputs: dict, keeps_logits: bool, unwrapped_model=None):
        self.model = model
        self.forward_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        self.forward_inputs["use_cache"] = False
        self.keeps_logits = keeps_logits
        self.unwrapped_model = unwrapped_model

    @torch.no_grad()
    def logits_at(self, positions: torch.Tensor) -> torch.Tensor:
        """`[B, K, V]` logits at the sorted `positions` `[K]`."""
        forward_inputs = dict(self.forward_inputs)
        if self.keeps_logits:
            # A tail is kept with an int (every model takes it); other positions with a 1-D index tensor.
            contiguous = int(positions[-1]) - int(positions[0]) + 1 == positions.numel()
            ends_the_row = contiguous and int(positions[-1]) == forward_inputs["input_ids"].size(1) - 1
            forward_inputs["logits_to_keep"] = positions.numel() if ends_the_row else positions
        with dropout_off(self.model):
            logits = self.model(**forward_inputs).logits
        return logits if self.keeps_logits else logits[:, positions]

    @torch.no_grad()
    def argmax(self, targets: torch.Tensor) -> torch.Tensor:
        """`[B, P]` the predicted token at every labelled position of the shifted `targets` `[B, P]` (0 elsewhere).

        With the backbone and LM head apart, only the hidden states are kept and the head runs on chunks of the
        labelled rows. Final-logit scaling and soft-capping, which some models apply after the head, are monotone and
        leave the argmax as it is.
        """
        valid = targets != -100
        first = int(valid.any(0).nonzero()[0])
        predictions = torch.zeros_like(targets)
        parts = backbone_and_head(self.unwrapped_model) if self.unwrapped_model is not None else None
        if parts is None:
            tail = torch.arange(first, targets.size(1) + 1, device=targets.device)  # logits positions first..T-1
            predictions[:, first:] = argmax_predictions(self.logits_at(tail), targets[:, first:])
            return predictions
        backbone, head = parts
        with dropout_off(self.model):
            hidden = backbone(**self.forward_inputs).last_hidden_state  # [B, T, H]
        rows_b, rows_p = valid.nonzero(as_tuple=True)  # logits[:, p] predicts targets[:, p]
        for start, end in row_chunks(rows_b.numel(), rows_per_chunk(head.out_features, hidden.device)):
            b, p = rows_b[start:end], rows_p[start:end]
            predictions[b, p] = head(hidden[b, p].to(head.weight.device)).argmax(-1).to(predictions.device)
        return predictions
