"""Chat formatting: how a single-turn (prompt, response) pair becomes token ids.

Training and generation both call `encode_prompt` and `encode_response`, so a prompt is formatted
identically in both. The prompt ends exactly where the model's answer starts; the response ends with
the format's end-of-turn token, which is also where generation stops.

    format   prompt (BOS is an id, added once)                                      response ends with
    chatml   <|im_start|>system\\n{sys}<|im_end|>\\n<|im_start|>user\\n{p}<|im_end|>\\n<|im_start|>assistant\\n   <|im_end|>
    llama3   <|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\n{p}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\\n\\n   <|eot_id|>
    llama2   <s>[INST] <<SYS>>\\n{sys}\\n<</SYS>>\\n\\n{p} [/INST]                            " </s>" (a space, then EOS)
    mistral  <s>[INST] {p} [/INST]                                                       </s>
    plain    <s>### Instruction:\\n{p}\\n\\n### Response:\\n  (base models; BOS if the tokenizer adds one)  EOS

Qwen-2.5 and SmolLM2 templates insert a default system prompt; we read it from the checkpoint's
template so our ids equal `apply_chat_template`'s. Llama-3.1's date header is not reproduced.
"""

import re
from dataclasses import dataclass

from clo.errors import CloError
from clo.model.tokenizer import Tokenizer

FORMATS = ("chatml", "llama3", "llama2", "mistral", "plain")


@dataclass
class ChatFormat:
    name: str
    system: str | None = None  # system prompt put before every user turn, if any

    def prompt_text(self, prompt: str) -> str:
        """The text of a one-turn prompt, up to where the answer starts (BOS not included)."""
        sys = self.system
        if self.name == "chatml":
            head = f"<|im_start|>system\n{sys}<|im_end|>\n" if sys else ""
            return f"{head}<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
        if self.name == "llama3":
            head = f"<|start_header_id|>system<|end_header_id|>\n\n{sys.strip()}<|eot_id|>" if sys else ""
            return (
                f"{head}<|start_header_id|>user<|end_header_id|>\n\n{prompt.strip()}<|eot_id|>"
                "<|start_header_id|>assistant<|end_header_id|>\n\n"
            )
        if self.name == "llama2":
            head = f"<<SYS>>\n{sys}\n<</SYS>>\n\n" if sys else ""
            return f"[INST] {head}{prompt.strip()} [/INST]"
        if self.name == "mistral":
            return f"[INST] {prompt.strip()} [/INST]"
        return f"### Instruction:\n{prompt}\n\n### Response:\n"

    @property
    def end_of_turn(self) -> str | None:
        """The special token that closes an answer (None: the tokenizer's EOS)."""
        return {"chatml": "<|im_end|>", "llama3": "<|eot_id|>"}.get(self.name)

    @property
    def uses_bos(self) -> bool | None:
        """Whether the format starts with BOS (None: follow the tokenizer's own default)."""
        return {"chatml": False, "llama3": True, "llama2": True, "mistral": True}.get(self.name)


def _template_system_prompt(template: str) -> str | None:
    """The literal default system prompt a ChatML template inserts (Qwen-2.5, SmolLM2), if any."""
    for m in re.finditer(r"<\|im_start\|>system(?:\n|\\n)(.*?)<\|im_end\|>", template, re.S):
        text = m.group(1)
        if not re.search(r"['\"{}]", text):
            return text.replace("\\n", "\n")
    return None


def detect_format(tokenizer: Tokenizer, name: str = "auto", system: str | None = None) -> ChatFormat:
    """The chat format for this checkpoint when `name` is "auto", else `name`.

    auto: the format train.py recorded when it saved the checkpoint (a model trained with
    `--chat-format plain` is served in plain), else the one its template implies.
    """
    template = tokenizer.chat_template or ""
    if name == "auto" and tokenizer.chat_format in FORMATS:
        name = tokenizer.chat_format
    if name == "auto":
        if "<|im_start|>" in template:
            name = "chatml"
        elif "<|start_header_id|>" in template:
            name = "llama3"
        elif "<<SYS>>" in template:
            name = "llama2"
        elif "[INST]" in template:
            name = "mistral"
        else:
            name = "plain"  # base checkpoints, which the paper trained, ship no template
    if name not in FORMATS:
        raise CloError(f"unknown chat format {name!r}; supported: auto, {', '.join(FORMATS)}")
    if system is None and name == "chatml":
        system = _template_system_prompt(template)
    fmt = ChatFormat(name, system)
    if fmt.end_of_turn is not None and tokenizer.token_id(fmt.end_of_turn) is None:
        raise CloError(f"{tokenizer.folder}: chat format {name!r} needs token {fmt.end_of_turn!r}, which it lacks")
    return fmt


def encode_prompt(tokenizer: Tokenizer, fmt: ChatFormat, prompt: str) -> list[int]:
    """Token ids of a formatted one-turn prompt, BOS included exactly once when the model uses it."""
    bos = tokenizer.adds_bos if fmt.uses_bos is None else fmt.uses_bos
    ids = tokenizer.encode(fmt.prompt_text(prompt))
    if bos and tokenizer.bos_id is not None and (not ids or ids[0] != tokenizer.bos_id):
        ids = [tokenizer.bos_id] + ids
    return ids


def encode_response(tokenizer: Tokenizer, fmt: ChatFormat, response: str) -> list[int]:
    """Token ids of an answer followed by the end-of-turn token (the target of training).

    llama2: `{answer} </s>`, a space before EOS, as Meta's reference code and the Llama-2-chat template
    write it. mistral: the answer is encoded on its own (so it starts with "▁"), as Mistral's reference
    tokenizer (mistral-common) does; Mistral-7B-Instruct-v0.1's HF template glues it to "[/INST]" instead.
    """
    text = response.strip() if fmt.name in ("llama2", "mistral", "llama3") else response
    if fmt.name == "llama2":
        text += " "
    return tokenizer.encode(text) + [end_of_turn_id(tokenizer, fmt)]


def end_of_turn_id(tokenizer: Tokenizer, fmt: ChatFormat) -> int:
    if fmt.end_of_turn is not None:
        return tokenizer.token_id(fmt.end_of_turn)
    if tokenizer.eos_id is None:
        raise CloError(f"{tokenizer.folder}: the tokenizer defines no EOS token")
    return tokenizer.eos_id


def stop_ids(tokenizer: Tokenizer, fmt: ChatFormat) -> set[int]:
    """Ids that end generation: the end-of-turn token and every EOS the checkpoint declares."""
    return tokenizer.stop_ids | {end_of_turn_id(tokenizer, fmt)}
