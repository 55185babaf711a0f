"""Where a model comes from (a local directory, the Hugging Face cache or the Hub), checked before anything loads it.

Without these checks, a model that is neither local nor cached stops a command only after transformers has retried
the Hub for half a minute, with a message that does not say what to do. `check_model_source` answers in a second,
naming the model and the two ways on: a local copy, or a download on a machine that has access.
"""

from __future__ import annotations

import os

from .errors import closest

# Seconds to wait for the Hub's answer about a model's config.json: a reachable Hub answers in well under a second.
HUB_TIMEOUT = 3.0


def missing_path_message(path: str, what: str, field: str) -> str:
    """`"<what> not found: 'outputs/demo-cpu-typo' (from `--adapter`). Did you mean 'outputs/demo-cpu'?"`: the
    message for a directory or file that does not exist, with the closest entry of its parent directory."""
    parent, name = os.path.split(os.path.normpath(os.path.expanduser(path)))
    entries = os.listdir(parent or ".") if os.path.isdir(parent or ".") else []
    close = closest(name, entries)
    hint = f" Did you mean {os.path.join(os.path.dirname(path), close)!r}?" if close else ""
    return f"{what} not found: {path!r} (from `{field}`).{hint}"


def is_local_path(name_or_path: str) -> bool:
    """Whether `name_or_path` is written as a path (`./...`, `/...`, `~/...`) rather than a Hub id."""
    # A Hub id is `name` or `owner/name`: a second slash makes it a path (`outputs/run/checkpoint-10`).
    return name_or_path.startswith((".", "/", "~")) or name_or_path.rstrip("/").count("/") > 1


def how_to_get(name: str, give: str) -> str:
    # `hf` is huggingface_hub's command line (`huggingface-cli` before huggingface_hub 1.0).
    return (
        f"Give a local copy {give} (on a machine with Hub access, `hf download {name} --local-dir "
        "/path/to/local/copy` makes one)."
    )


def check_model_source(
    name_or_path: str | None, revision: str | None = None, field: str = "--model_name_or_path", give: str | None = None
):
    """Raise an `OSError` (a `ValueError` when unset) unless `name_or_path` can be loaded: a local directory, a Hub id
    whose config.json is in the local cache, or a Hub id the Hub answers for (asked once, `HUB_TIMEOUT` seconds).
    `field` names where the name came from; `give`, how to give a local copy instead (default: with `field`).

    With `HF_HUB_OFFLINE=1`, or when the Hub does not answer, a Hub id that is not cached fails at once, naming the
    model and how to get it. An answer from the Hub other than "found" (private, gated, no such model) is left to
    transformers, whose messages say what to do about those.
    """
    if not name_or_path:
        raise ValueError(f"`{field.lstrip('-')}` must be set (a Hub id or a local directory).")
    if os.path.isdir(os.path.expanduser(name_or_path)):
        return
    if is_local_path(name_or_path) or os.path.exists(name_or_path):
        raise FileNotFoundError(missing_path_message(name_or_path, "Model directory", field))
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url, try_to_load_from_cache
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError

    try:
        cached = try_to_load_from_cache(name_or_path, "config.json", revision=revision)
    except HFValidationError as error:
        raise FileNotFoundError(
            f"Model {name_or_path!r} (from `{field}`) is neither a local directory nor a Hub id: {error}"
        ) from error
    if isinstance(cached, str):
        return
    if constants.is_offline_mode():
        raise OSError(
            f"Model {name_or_path!r} is not a local directory and not in the Hugging Face cache, and HF_HUB_OFFLINE=1 "
            f"keeps the Hub out of reach. {how_to_get(name_or_path, give or f'with `{field} /path/to/local/copy`')}"
        )
    try:
        get_hf_file_metadata(hf_hub_url(name_or_path, "config.json", revision=revision), timeout=HUB_TIMEOUT)
    except HfHubHTTPError:
        return  # the Hub answered: transformers reports what it said
    except Exception as error:  # noqa: BLE001  (no answer at all: DNS, refused connection, timeout, proxy)
        raise OSError(
            f"Model {name_or_path!r} is not a local directory and not in the Hugging Face cache, and the Hub "
            f"({constants.ENDPOINT}) cannot be reached ({type(error).__name__}: {error}). "
            f"{how_to_get(name_or_path, give or f'with `{field} /path/to/local/copy`')}"
        ) from error
