"""A reader: a second, larger causal LM that writes open answers from the passages memory recalled.

The HMT memory (SmolLM2 by default) ingests the document and recalls the passages; the reader only
reads those passages and the question and writes the answer. A 135M backbone misses answers that are
in its prompt (COVID-QA dev, gold passage given: token F1 0.16) where a 0.5B instruct model reads
them (0.47); ingestion stays as fast as before, since the reader never sees the whole document.

The reader plays no part in recall, evidence or closed questions: the Memory tab, the evidence list
and the decision heads stay the memory model's own.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from hmt import load_backbone

from .answer_text import short_answer
from .prompts import prompt_frame, question_text, tokenize

# A reader was never trained on our prompt; asked to answer "briefly" a 0.5B chat model writes a
# sentence that restates the question, which costs tokens (latency) and token F1.
READER_INSTRUCTION = "Answer with a short phrase from the context."


@dataclass
class ReaderOutput:
    answer: str  # the short answer the reader wrote (its first sentence, as ``short_answer`` cuts it)
    first_token_s: float  # from ``start`` to the first generated token
    answer_logprob: float | None  # mean log-likelihood of the answer's own tokens, as chosen


class _ShortAnswerEnded(StoppingCriteria):
    """Stops generation once the short answer has ended, and streams it to ``on_token``.

    ``kept`` counts the generated tokens that are all answer (the token that starts the next
    sentence is not), so the answer's likelihood is averaged over its own tokens only.
    """

    def __init__(self, reader: Reader, prompt_len: int, start: float, on_token: Callable[[str], None] | None):
        self.reader, self.prompt_len, self.start, self.on_token = reader, prompt_len, start, on_token
        self.first_token_s: float | None = None
        self.kept = 0
        self.answer = ""

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        if self.first_token_s is None:
            self.first_token_s = time.perf_counter() - self.start
        new = input_ids[0, self.prompt_len :].tolist()
        if new and new[-1] in self.reader.stop_ids:
            return torch.ones(1, dtype=torch.bool, device=input_ids.device)
        text = self.reader.decode(new)
        self.answer = short_answer(text)
        if self.on_token is not None:
            self.on_token(self.answer)
        ended = self.answer != text.strip()  # its first sentence, or its paragraph, ended
        if not ended:
            self.kept = len(new)
        return torch.full((1,), ended, dtype=torch.bool, device=input_ids.device)


class Reader:
    """A chat LM that answers an open question from context passages (loaded once, thread-safe)."""

    def __init__(
        self,
        name: str,
        *,
        dtype: str | torch.dtype = "auto",
        device: str | None = None,
        instruction: str = READER_INSTRUCTION,
    ) -> None:
        self.name, self.instruction = name, instruction
        self.model, self.tokenizer = load_backbone(name, dtype=dtype, device=device)
        self._frame = prompt_frame(self.tokenizer)
        eos = self.model.generation_config.eos_token_id
        eos = eos if isinstance(eos, list) else [eos]
        self.stop_ids = {i for i in [*eos, self.tokenizer.eos_token_id] if i is not None}
        self._lock = threading.Lock()  # one answer at a time: generation and the tokenizer are not shared-safe

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def prompt_ids(self, question: str, context: str | None) -> torch.Tensor:
        """The chat prompt: the frame's control tokens parsed, the user's turn tokenized as text."""
        before, after = self._frame
        user = question_text(question, None, context, self.instruction)
        ids = [
            *tokenize(self.tokenizer, before).input_ids,
            *tokenize(self.tokenizer, user, document=True).input_ids,  # a document's "<|im_end|>" is text
            *tokenize(self.tokenizer, after).input_ids,
        ]
        return torch.tensor([ids], dtype=torch.long, device=self.model.device)

    def answer(
        self,
        question: str,
        context: str | None,
        *,
        max_new_tokens: int,
        no_repeat_ngram: int = 0,
        start: float | None = None,
        on_token: Callable[[str], None] | None = None,
    ) -> ReaderOutput:
        """Greedy answer to ``question`` from ``context``, cut at the end of its first sentence."""
        start = time.perf_counter() if start is None else start
        # Under the lock, tokenizing too: a fast tokenizer switching split_special_tokens is not
        # thread-safe (the web app answers two requests at once).
        with self._lock, torch.inference_mode():
            ids = self.prompt_ids(question, context)
            stop = _ShortAnswerEnded(self, ids.shape[1], start, on_token)
            out = self.model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                no_repeat_ngram_size=no_repeat_ngram or 0,
                stopping_criteria=StoppingCriteriaList([stop]),
                eos_token_id=sorted(self.stop_ids),
                pad_token_id=self.tokenizer.pad_token_id or sorted(self.stop_ids)[0],
                output_scores=True,
                return_dict_in_generate=True,
                # None of the sampling settings a chat model's generation_config may carry.
                temperature=None,
                top_p=None,
                top_k=None,
            )
            new = out.sequences[0, ids.shape[1] :].tolist()
            if not stop.answer and new:  # stopped before the criterion ran (an end token first)
                stop.answer = short_answer(self.decode([t for t in new if t not in self.stop_ids]))
            logprob = None
            if stop.kept:
                # The chosen tokens' log-probabilities under the processed scores (repeats banned).
                steps = torch.stack([torch.log_softmax(s[0].float(), -1) for s in out.scores[: stop.kept]])
                chosen = torch.tensor(new[: stop.kept], device=steps.device)
                logprob = float(steps.gather(1, chosen[:, None]).mean())
        return ReaderOutput(stop.answer, stop.first_token_s or 0.0, logprob)
