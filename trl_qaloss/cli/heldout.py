"""The held-out rows a `trl-qaloss train` run evaluated on, recorded in its `output_dir`, so that
`trl-qaloss evaluate --adapter DIR` scores the same rows with the same settings and gives the same numbers.

`HELDOUT_FILE` names where the rows are: the dataset and split they came from (`dataset_name`, `dataset_config`,
`split`), or, when the run split them off its training rows itself, `ROWS_FILE` next to it holding them. It also
holds the settings of the end-of-training evaluation (`num_rows`, `max_new_tokens`, `batch_size`, `match_questions`)
and `rows_sha256`, a hash of the rows, which tells `evaluate` whether a dataset changed since the run.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

HELDOUT_FILE = "trl_qaloss_heldout.json"
ROWS_FILE = "heldout_rows.jsonl"


@dataclass
class HeldOut:
    """Where a run's eval rows come from: `source` (`{"dataset_name", "dataset_config", "split"}`) when they are a
    split of a named dataset, None when the run made them; `rows`, the eval `datasets.Dataset` as loaded."""

    source: dict | None
    rows: object


def rows_hash(pairs: list[tuple]) -> str:
    """A hash of `(prompt, reference)` pairs, the same for the same rows whichever file or split holds them."""
    return hashlib.sha256(json.dumps(pairs, ensure_ascii=False, sort_keys=True).encode()).hexdigest()


def write_heldout_record(output_dir: str, heldout: HeldOut, settings: dict, pairs: list[tuple]) -> None:
    """Record `heldout` in `output_dir` (the rows themselves in `ROWS_FILE` when the run made them), with the
    evaluation's `settings` and the hash of the `pairs` it scored."""
    record = dict(heldout.source or {"rows_file": ROWS_FILE})
    if heldout.source is None:
        with open(os.path.join(output_dir, ROWS_FILE), "w", encoding="utf-8") as file:
            for row in heldout.rows:
                file.write(json.dumps(row, ensure_ascii=False) + "\n")
    record.update(settings, rows_sha256=rows_hash(pairs))
    with open(os.path.join(output_dir, HELDOUT_FILE), "w") as file:
        json.dump(record, file, indent=2)


def read_heldout_record(directory: str) -> dict:
    """The record `write_heldout_record` left in `directory`, with `dataset_name` the rows file's path when the run
    made the rows; a FileNotFoundError saying what to give instead when there is none."""
    from ..model_source import missing_path_message

    if not os.path.isdir(directory):
        raise FileNotFoundError(missing_path_message(directory, "Directory", "--adapter or --model_name_or_path"))
    path = os.path.join(directory, HELDOUT_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{directory} holds no record of held-out rows ({HELDOUT_FILE}): it was trained without evaluation, or "
            "by an older trl-qaloss. Give the rows to score with `--dataset_name` (and `--dataset_split`)."
        )
    with open(path) as file:
        record = json.load(file)
    if "rows_file" in record:
        record.update(dataset_name=os.path.join(directory, record["rows_file"]), dataset_config=None, split="train")
    return record
