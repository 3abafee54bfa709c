"""Constrained decoding for the transformers engine: the ``lines`` answer layout, and any other
regex or JSON schema through xgrammar (:class:`Grammars`).

vLLM constrains answers with its structured-output backends (a regular
expression); transformers has no built-in equivalent, so this logits processor
enforces the same layout: exactly one ``<number>: <text>`` line per region, in
order, each caption at least one character, at most ``max_caption_tokens``
tokens and ``max_caption_chars`` characters (the limits of the vLLM regex), then
end of sequence. A model (even a random one) can therefore neither skip,
repeat nor invent a region, and every answer parses.

Only ``<number>:`` is forced. The space after the colon is left to the
model's own tokens: BPE tokenizers (Qwen's among them) write ``1: a red
circle`` as ``1`` ``:`` `` a`` `` red`` `` circle``, so forcing a lone space
token would put the model in a state it never saw in training and derail its
answer. The first caption token must start with a space instead, as a
regex-driven decoder (vLLM's) also allows.

torch is imported inside the factory, so importing this module stays cheap.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence


class _Vocab:
    """Per-tokenizer token classes, computed once (decoding 150k ids takes about a second)."""

    _cache: Dict[int, "_Vocab"] = {}

    def __init__(self, tokenizer: Any, size: int) -> None:
        import torch

        n = len(tokenizer)
        texts = tokenizer.batch_decode([[i] for i in range(n)], skip_special_tokens=False)
        special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
        text_ok = torch.zeros(size, dtype=torch.bool)
        lengths = torch.full((size,), 1 << 30, dtype=torch.long)
        spaced = torch.zeros(size, dtype=torch.bool)
        for i, t in enumerate(texts):
            if i < size and i not in special and t and "\n" not in t and "\r" not in t and "\ufffd" not in t:
                text_ok[i] = True
                lengths[i] = len(t)
                spaced[i] = t.startswith(" ")
        self.text_ok = text_ok
        #: Text tokens that start with a space: the ones that may follow ``<number>:``.
        self.spaced = spaced
        #: Characters each token adds to a caption (huge for tokens never allowed in one).
        self.lengths = lengths
        newline = tokenizer.encode("\n", add_special_tokens=False)
        if len(newline) != 1:
            raise ValueError("tokenizer has no single newline token; cannot constrain the lines layout")
        self.newline = newline[0]
        self.encode = lambda s: tokenizer.encode(s, add_special_tokens=False)

    @classmethod
    def get(cls, tokenizer: Any, size: int) -> "_Vocab":
        key = id(tokenizer) * 1_000_003 + size
        if key not in cls._cache:
            cls._cache[key] = cls(tokenizer, size)
        return cls._cache[key]


class _NewTokens:
    """The token each row of a batch added since the last call of a logits processor (``generate``
    calls it once per step; the first call, on the prompt alone, has none)."""

    def __init__(self, prompt_len: int) -> None:
        self.prompt_len = prompt_len
        self.seen = 0

    def __call__(self, input_ids: Any) -> Optional[List[int]]:
        generated = input_ids.shape[1] - self.prompt_len
        if generated <= self.seen:
            return None
        self.seen = generated
        return [int(t) for t in input_ids[:, -1].tolist()]


class _RowState:
    def __init__(self, numbers: Sequence[int], vocab: _Vocab) -> None:
        self.numbers = list(numbers)
        self.vocab = vocab
        self.line = 0
        self.queue: List[int] = vocab.encode(f"{self.numbers[0]}:")
        #: The next token must start with the space after ``<number>:``.
        self.space_due = True
        self.caption_tokens = 0
        #: Characters of the caption so far, not counting that space.
        self.caption_chars = 0
        self.done = False

    def observe(self, token: int, eos_ids: set) -> None:
        if self.done:
            return
        if self.queue:
            self.queue.pop(0)
            return
        if self.space_due:
            self.space_due = False
            self.caption_tokens += 1
            self.caption_chars += int(self.vocab.lengths[token]) - 1
        elif token == self.vocab.newline:
            self.line += 1
            self.queue = self.vocab.encode(f"{self.numbers[self.line]}:")
            self.space_due = True
            self.caption_tokens = 0
            self.caption_chars = 0
        elif token in eos_ids:
            self.done = True
        else:
            self.caption_tokens += 1
            self.caption_chars += int(self.vocab.lengths[token])


def lines_processor(
    tokenizer: Any,
    numbers_per_row: Sequence[Optional[Sequence[int]]],
    *,
    prompt_len: int,
    eos_ids: Sequence[int],
    vocab_size: int,
    max_caption_tokens: int = 48,
    max_caption_chars: int = 160,
) -> Any:
    """A ``LogitsProcessor`` for a batch whose row ``b`` must answer ``numbers_per_row[b]``.

    Rows whose entry is None are left unconstrained. ``prompt_len`` is the
    (left-padded) prompt length: tokens after it are the answer so far.
    """
    import torch
    from transformers import LogitsProcessor

    vocab = _Vocab.get(tokenizer, vocab_size)
    eos = set(int(e) for e in eos_ids)
    eos_list = sorted(eos)
    states = [(_RowState(nums, vocab) if nums else None) for nums in numbers_per_row]

    class _Lines(LogitsProcessor):
        def __init__(self) -> None:
            self.new_tokens = _NewTokens(prompt_len)

        def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
            last = self.new_tokens(input_ids)
            if last is not None:
                for b, st in enumerate(states):
                    if st is not None:
                        st.observe(last[b], eos)
            allowed = torch.zeros_like(scores, dtype=torch.bool)
            for b, st in enumerate(states):
                if st is None:
                    allowed[b] = True
                elif st.done:
                    allowed[b, eos_list] = True
                elif st.queue:
                    allowed[b, st.queue[0]] = True
                elif st.space_due:
                    # " a", " red", or a lone " " (then at least one more character follows).
                    fits = vocab.spaced & (vocab.lengths <= max_caption_chars + 1)
                    allowed[b, : fits.shape[0]] = fits.to(scores.device)
                else:
                    last_line = st.line == len(st.numbers) - 1
                    end = eos_list if last_line else [vocab.newline]
                    room = max_caption_chars - st.caption_chars
                    if st.caption_tokens < max_caption_tokens and room > 0:
                        fits = vocab.text_ok & (vocab.lengths <= room)
                        allowed[b, : fits.shape[0]] = fits.to(scores.device)
                    if st.caption_chars >= 1:
                        allowed[b, end] = True
            return scores.masked_fill(~allowed, float("-inf"))

    return _Lines()


class Grammars:
    """Any other answer constraint (a regular expression, a JSON schema), enforced with xgrammar.

    The same structured-output library vLLM uses by default: each constraint is
    compiled once per tokenizer into a token-level automaton (cached here by its
    text), and :meth:`processor` masks, at every step, the tokens that would
    leave it. When the automaton accepts, only the stop tokens are allowed, so a
    constrained answer is whole unless ``max_tokens`` cuts it. JSON schemas are
    compiled without free whitespace (one fixed layout, the separators of
    ``json.dumps``): with it, a weak model can
    spend its whole budget on newlines inside a list, as vLLM's default allows.

    Raises ``ImportError`` when xgrammar is not installed (the engine then warns
    once and leaves such requests unconstrained).
    """

    def __init__(self, tokenizer: Any, *, vocab_size: int, eos_ids: Sequence[int]) -> None:
        import xgrammar as xgr

        self._xgr = xgr
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=int(vocab_size),
                                                  stop_token_ids=sorted(int(e) for e in eos_ids))
        self.vocab_size = int(vocab_size)
        self.compiler = xgr.GrammarCompiler(info, max_threads=1)
        self._cache: Dict[str, Any] = {}

    def grammar(self, *, regex: Optional[str] = None, json_schema: Optional[Dict[str, Any]] = None) -> Any:
        """The compiled grammar of ``regex`` when it is given (not empty), else of ``json_schema`` (as a
        request carries them). Raises ``ValueError`` when it cannot be compiled (with the message of xgrammar)."""
        import json

        key = ("regex:" + regex) if regex else ("json:" + json.dumps(json_schema, sort_keys=True))
        if key not in self._cache:
            try:
                if regex:
                    self._cache[key] = self.compiler.compile_regex(regex)
                else:
                    self._cache[key] = self.compiler.compile_json_schema(json.dumps(json_schema),
                                                                         any_whitespace=False, strict_mode=True)
            except Exception as exc:  # xgrammar raises RuntimeError / its own errors on a bad pattern
                what = "regex" if regex else "JSON schema"
                raise ValueError(f"cannot compile the answer {what}: {type(exc).__name__}: {exc}") from exc
        return self._cache[key]

    def processor(self, grammars: Sequence[Optional[Any]], *, prompt_len: int) -> Any:
        """A ``LogitsProcessor`` for a batch whose row ``b`` follows ``grammars[b]`` (None: unconstrained).
        ``prompt_len`` is the (left-padded) prompt length: tokens after it are the answer so far."""
        import torch
        from transformers import LogitsProcessor

        xgr = self._xgr
        matchers = [xgr.GrammarMatcher(g) if g is not None else None for g in grammars]
        bitmask = xgr.allocate_token_bitmask(len(matchers), self.vocab_size)

        class _Grammar(LogitsProcessor):
            def __init__(self) -> None:
                self.new_tokens = _NewTokens(prompt_len)

            def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
                last = self.new_tokens(input_ids)
                if last is not None:
                    for b, m in enumerate(matchers):
                        if m is not None and not m.is_terminated():
                            m.accept_token(last[b])
                rows = [b for b, m in enumerate(matchers) if m is not None and not m.is_terminated()]
                if not rows:
                    return scores
                for b in rows:
                    matchers[b].fill_next_token_bitmask(bitmask, b)
                out = scores.clone()
                xgr.apply_token_bitmask_inplace(out, bitmask.to(out.device), indices=rows)
                return out

        return _Grammar()
