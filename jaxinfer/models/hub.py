"""Models named by Hugging Face hub id, resolved to files in huggingface_hub's cache.

`LLM(model="HuggingFaceTB/SmolLM2-135M-Instruct")` is how vLLM users name a model. A `model` that
is no local path but a valid repo id is fetched with `huggingface_hub` itself, so everything it
does applies: its cache ($HF_HUB_CACHE, or `download_dir`), `revision` (branch, tag or commit),
$HF_HUB_OFFLINE (cache only), the token from $HF_TOKEN or `hf auth login`, and its progress bars.
Only the files the engine reads are fetched: configs, tokenizer files and safetensors weights,
never the .bin / .onnx / .gguf copies many repos also carry.

GGUF inside a repo, two spellings: transformers' `gguf_file="name.gguf"` beside `model=repo`, and
vLLM's `model="repo:QUANT"` (e.g. "unsloth/Qwen3-0.6B-GGUF:Q4_K_M"), the one file whose name ends
in that quantization type.

Every failure is a ValueError naming the id, the revision and what to do, above all the common
one: offline (or no network) and not in the cache.
"""

from __future__ import annotations

import re
from pathlib import Path

# What the engine reads from a repo: configs (generation, pooling, sentence-transformers modules
# included; "*" spans folders here), tokenizer files, chat templates and safetensors weights.
MODEL_FILES = ("*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.jinja")
TOKENIZER_FILES = ("*.json", "*.txt", "*.model", "*.tiktoken", "*.jinja")

# vLLM's remote GGUF spelling "repo_id:quant_type" (vllm/transformers_utils/gguf_utils.py).
_REMOTE_GGUF = re.compile(r"^([A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*):([A-Za-z0-9_+-]+)$")


def is_hub_id(name: str) -> bool:
    """A valid repo id ("org/name" or "name") or vLLM's "org/name:QUANT" that is no local path."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if Path(name).expanduser().exists():
        return False
    if _REMOTE_GGUF.match(name):
        return True
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def resolve_model(
    model: str,
    gguf_file: str | None = None,
    revision: str | None = None,
    download_dir: str | None = None,
) -> tuple[Path, Path | None]:
    """The hub id `model` as local files: -> (snapshot folder, the GGUF file or None)."""
    remote_gguf = _REMOTE_GGUF.match(model)
    if remote_gguf is not None:
        if gguf_file is not None:
            raise ValueError(
                f"model={model!r} names a quantization type already; pass gguf_file only with "
                f"model={remote_gguf.group(1)!r}"
            )
        repo, quant = remote_gguf.groups()
        return _quant_file(repo, quant, revision, download_dir)
    if gguf_file is not None:
        file = Path(_download(model, revision, download_dir, filename=gguf_file))
        return file.parent, file
    folder = Path(_download(model, revision, download_dir, allow_patterns=MODEL_FILES))
    if not (folder / "config.json").is_file():
        raise ValueError(
            f"hub repo {model!r} (revision {revision or 'main'}) has no config.json in {folder}: "
            f"for a GGUF repo name the file, gguf_file='NAME.gguf' or model='{model}:QUANT' "
            "(e.g. Q4_K_M); offline, a partly downloaded snapshot lacks it too"
        )
    return folder, None


def resolve_tokenizer(
    tokenizer: str, revision: str | None = None, download_dir: str | None = None
) -> Path:
    """The tokenizer files of hub repo `tokenizer` (no weights): -> the snapshot folder."""
    return Path(_download(tokenizer, revision, download_dir, allow_patterns=TOKENIZER_FILES))


def _quant_file(
    repo: str, quant: str, revision: str | None, download_dir: str | None
) -> tuple[Path, Path]:
    """vLLM's "repo:QUANT": the repo's one GGUF file named "...-QUANT.gguf" or "....QUANT.gguf"
    (either case), fetched alone."""
    patterns = [f"*{sep}{q}.gguf" for sep in "-." for q in {quant, quant.lower(), quant.upper()}]
    folder = Path(_download(repo, revision, download_dir, allow_patterns=patterns))
    found = sorted(
        p
        for p in folder.glob("**/*.gguf")
        if p.name.lower().endswith((f"-{quant.lower()}.gguf", f".{quant.lower()}.gguf"))
    )
    if len(found) != 1:
        what = "no GGUF file" if not found else f"{len(found)} GGUF files"
        listed = "".join(f"\n  {p.relative_to(folder)}" for p in found)
        raise ValueError(
            f"{repo}:{quant}: {what} named *-{quant}.gguf in the repo (revision "
            f"{revision or 'main'}){listed}; name one with model={repo!r}, gguf_file='NAME.gguf'"
        )
    return found[0].parent, found[0]


def _download(
    repo: str,
    revision: str | None,
    download_dir: str | None,
    *,
    filename: str | None = None,
    allow_patterns: tuple[str, ...] | list[str] = (),
) -> str:
    """huggingface_hub's download (one file, or a filtered snapshot); its errors as ValueError."""
    from huggingface_hub import constants, hf_hub_download, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    offline = constants.HF_HUB_OFFLINE
    common = {
        "revision": revision,
        "cache_dir": download_dir,
        "local_files_only": offline,
    }
    what = f"hub repo {repo!r} (revision {revision or 'main'})"
    try:
        if filename is not None:
            return hf_hub_download(repo, filename, **common)
        return snapshot_download(repo, allow_patterns=list(allow_patterns), **common)
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as error:
        cache = download_dir or constants.HF_HUB_CACHE
        item = f"{filename} of {what}" if filename else what
        reason = "HF_HUB_OFFLINE is set" if offline else "the Hugging Face hub could not be reached"
        raise ValueError(
            f"{item} is not in the hub cache {cache}, and {reason}. Download it while online "
            f"(`hf download {repo}{' ' + filename if filename else ''}"
            f"{' --revision ' + revision if revision else ''}`), or pass a local folder or file "
            "as model."
        ) from error
    except GatedRepoError as error:
        raise ValueError(
            f"{what} is gated: accept its terms on huggingface.co and make a token available "
            f"(HF_TOKEN, or `hf auth login`). ({error})"
        ) from error
    except RepositoryNotFoundError as error:
        raise ValueError(
            f"{what} was not found on the hub (a private repo needs a token: HF_TOKEN, or "
            f"`hf auth login`), and {repo!r} is no local path either. ({error})"
        ) from error
    except RevisionNotFoundError as error:
        raise ValueError(f"{what}: no such revision in the repo. ({error})") from error
    except RemoteEntryNotFoundError as error:
        raise ValueError(f"{what} has no file {filename!r}. ({error})") from error
    except HfHubHTTPError as error:
        raise ValueError(f"{what}: the hub refused the download: {error}") from error
