"""lm-eval imports `LoRARequest` at module level; jaxinfer has no LoRA adapters (`LLM()` refuses
`enable_lora=True` and `generate()` a non-None `lora_request`), so building one fails here too."""


class LoRARequest:
    def __init__(self, *args, **kwargs) -> None:
        raise ValueError("LoRARequest: LoRA adapters are not supported by jaxinfer")
