"""vLLM's `get_tokenizer(name, ...)`, as lm-eval calls it: the tokenizer jaxinfer's engine loads
for that checkpoint (models/loader.py), so lm-eval encodes with exactly the engine's tokenizer."""

from jaxinfer.models.loader import CheckpointSource, load_tokenizer


def get_tokenizer(
    tokenizer_name: str,
    *,
    tokenizer_mode: str = "auto",
    trust_remote_code: bool = False,
    revision: str | None = None,
    **kwargs,
):
    if tokenizer_mode != "auto" or trust_remote_code or kwargs:
        raise ValueError(
            f"get_tokenizer: tokenizer_mode={tokenizer_mode!r}, "
            f"trust_remote_code={trust_remote_code!r}, {kwargs} are not supported by jaxinfer "
            "(accepted: tokenizer_mode='auto', trust_remote_code=False, nothing else)"
        )
    return load_tokenizer(CheckpointSource.resolve(str(tokenizer_name), revision=revision))
