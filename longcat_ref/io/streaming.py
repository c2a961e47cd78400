"""Streaming text out of generate(): transformers' streamer protocol (put / end) with this package's tokenizer.

    streamer = TextIteratorStreamer(tok)                      # skip_prompt=True by default
    thread = threading.Thread(target=model.generate, args=(ids, 64), kwargs={"streamer": streamer})
    thread.start()
    for text in streamer:                                     # pieces of text as they are decoded
        print(text, end="", flush=True)
    thread.join()

or, without writing the thread: `for text in stream(model, tok, ids, max_new_tokens=64): ...`.

generate() (model/generate.py) calls put(prompt ids (b, s)) once, put(new ids (b,)) after every step and end() at
the end, as transformers' generate does with its BaseStreamer; any object with those two methods works (transformers'
own TextStreamer needs a transformers tokenizer). Text is decoded incrementally by `Tokenizer.stream()`
(tokenizers' DecodeStream), so a character split over several tokens comes out whole. One sequence only (batch 1),
as in transformers. The streamer lives here, not in model/, because it needs the tokenizer (model/ imports nothing
from io/).
"""

from __future__ import annotations

import queue
import threading

import torch


class TextStreamer:
    """put(ids) / end() -> on_text(piece) for each new piece of decoded text (default: print it)."""

    def __init__(self, tokenizer, skip_prompt: bool = True, skip_special_tokens: bool = True):
        self.tok, self.skip_prompt = tokenizer, skip_prompt
        self.decoder = tokenizer.stream(skip_special_tokens=skip_special_tokens)
        self.next_is_prompt = True

    def put(self, value):
        ids = torch.as_tensor(value)
        if ids.dim() == 2:  # (1, s): the prompt, or (1, 1)
            if ids.shape[0] != 1:
                raise ValueError(f"{type(self).__name__} streams one sequence; got a batch of {ids.shape[0]}")
            ids = ids[0]
        elif ids.dim() == 1 and ids.numel() != 1 and not self.next_is_prompt:
            raise ValueError(f"{type(self).__name__} streams one sequence; got a batch of {ids.numel()}")
        if self.skip_prompt and self.next_is_prompt:
            self.next_is_prompt = False
            return
        self.next_is_prompt = False
        piece = "".join(self.decoder.put(int(i)) for i in ids.tolist())
        if piece:
            self.on_text(piece, stream_end=False)

    def end(self):
        self.on_text(self.decoder.flush(), stream_end=True)
        self.next_is_prompt = True

    def on_text(self, text: str, stream_end: bool = False):
        print(text, flush=True, end="" if not stream_end else None)


class TextIteratorStreamer(TextStreamer):
    """A TextStreamer whose text is read by iterating over it (from another thread than the generating one).

    timeout: seconds to wait for the next piece before raising queue.Empty (None: forever)."""

    _END = object()

    def __init__(self, tokenizer, skip_prompt: bool = True, timeout: float | None = None,
                 skip_special_tokens: bool = True):
        super().__init__(tokenizer, skip_prompt, skip_special_tokens)
        self.queue: queue.Queue = queue.Queue()
        self.timeout = timeout

    def on_text(self, text: str, stream_end: bool = False):
        if text:
            self.queue.put(text, timeout=self.timeout)
        if stream_end:
            self.queue.put(self._END, timeout=self.timeout)

    def __iter__(self):
        return self

    def __next__(self) -> str:
        v = self.queue.get(timeout=self.timeout)
        if v is self._END:
            raise StopIteration
        return v


def stream(model, tokenizer, input_ids, **generate_kwargs):
    """Yield the text of model.generate(input_ids, **generate_kwargs) piece by piece (generate runs in a thread;
    an error there is raised here, after the text streamed so far)."""
    streamer = TextIteratorStreamer(tokenizer)
    error = []

    def run():
        try:
            model.generate(input_ids, streamer=streamer, **generate_kwargs)
        except BaseException as e:  # noqa: BLE001 -- handed to the reading thread
            error.append(e)
            streamer.queue.put(streamer._END)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    yield from streamer
    thread.join()
    if error:
        raise error[0]
