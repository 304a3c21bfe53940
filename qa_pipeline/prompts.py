"""The one prompt format shared by training and answering, so that both see the same tokens."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

OPEN_INSTRUCTION = "Answer briefly from the document."


def question_text(
    question: str,
    options: list[str] | None = None,
    context: str | None = None,
    instruction: str = OPEN_INSTRUCTION,
) -> str:
    """The user's turn: optional context passages, the question, the allowed answers if closed
    (else ``instruction``: the memory model was trained on the default one)."""
    question = question.strip()
    head = f"Context:\n{context.strip()}\n\nQuestion: " if context else ""
    if options:
        return f"{head}{question}\nAnswer with one of: {', '.join(options)}."
    return f"{head}{question}\n{instruction}"


def question_prompt(
    tokenizer: PreTrainedTokenizerBase,
    question: str,
    options: list[str] | None = None,
    context: str | None = None,
) -> str:
    """Prompt text that opens the question segment; the answer follows it directly.

    Instruction-tuned backbones get their chat template (so answers stay fluent); plain LMs get
    a ``Question: ... Answer:`` frame.
    """
    return _frame(tokenizer, question_text(question, options, context))


def _frame(tokenizer: PreTrainedTokenizerBase, user: str) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
        )
    return f"Question: {user}\nAnswer:"


def prompt_frame(tokenizer: PreTrainedTokenizerBase) -> tuple[str, str]:
    """The prompt's text before and after the user's turn. Tokenizing the three apart lets the frame's
    control tokens count as such while the same strings inside a question or document stay text."""
    sentinel = "\ue000USER\ue000"  # a private-use character: in no template
    before, found, after = _frame(tokenizer, sentinel).partition(sentinel)
    if not found:
        raise ValueError("the chat template does not put the user's message into the prompt verbatim")
    return before, after


def tokenize(tokenizer: PreTrainedTokenizerBase, text: str, *, document: bool = False, offsets: bool = False):
    """``tokenizer(text)`` without special tokens; ``document``: strings such as ``<|im_end|>`` are text,
    not control tokens (parsing them would let a document end the chat turn)."""
    kwargs = {"add_special_tokens": False, "return_offsets_mapping": offsets}
    if document:
        try:
            return tokenizer(text, split_special_tokens=True, **kwargs)
        except TypeError:  # a tokenizer without split_special_tokens
            pass
    return tokenizer(text, **kwargs)


def option_text(option: str, tokenizer: PreTrainedTokenizerBase) -> str:
    """How an option is written right after the prompt (a leading space for plain LMs)."""
    return option if getattr(tokenizer, "chat_template", None) else " " + option


def answer_text(answer: str, tokenizer: PreTrainedTokenizerBase, explanation: str | None = None) -> str:
    """The training target after the prompt: the answer (then an explanation), then end of turn."""
    text = option_text(answer, tokenizer)
    if explanation:
        text += ". " + explanation.strip()
    return text + (tokenizer.eos_token or "")
