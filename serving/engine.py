"""The transformers generation worker: one thread owns the model and decodes every reply.

The fallback engine (`serving/backends.py` picks llama.cpp first): models llama.cpp cannot load,
and wherever a torch model is the point (tests of batching against solo decoding).

Every browser session and the batch CLI submit requests here. The worker keeps one left-padded
batch and a KV cache; a request that arrives mid-batch is prefilled alone and merged into the
running batch (its cache left-padded to the same length), so several people chatting at once
all see their replies progress, and the two cores never run two generations side by side.
Finished or stopped rows are dropped from the batch. Each reply's tokens go only to its own
`Reply`, so nobody's text is mixed with another's.

A `Reply` keeps the whole text so far: a page interrupted by a rerun opens `stream()` again
and gets everything from the start, then the rest as it comes.
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from serving.base import EngineBase
from serving.config import GenerationSettings, ServingConfig
from serving.model import LoadedModel
from serving.reply import Reply

log = logging.getLogger(__name__)


@dataclass
class _Row:
    reply: Reply
    prompt_ids: list[int]
    generated: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None


class Engine(EngineBase):
    """The shared worker. `submit` returns at once with a `Reply`; `generate` waits for many."""

    kind = "transformers"

    def __init__(self, loaded: LoadedModel, config: ServingConfig | None = None) -> None:
        self._init_worker(loaded, config)
        self._thread = threading.Thread(target=self._run, name="generation-worker", daemon=True)
        self._thread.start()

    def describe(self) -> str:
        model = (self._next or self._model).model
        return f"transformers, {str(model.dtype).removeprefix('torch.')}"

    def swap_model(self, loaded: LoadedModel) -> None:
        """Serve `loaded` for new replies once the replies in flight have finished."""
        self._next = loaded

    def submit(self, messages: list[dict[str, str]],
               settings: GenerationSettings | None = None) -> Reply:
        """Queue a reply to `messages` (user/assistant turns, oldest first, ending with user)."""
        settings, prompt = self._start(messages, settings)
        reply = Reply(settings, prompt.trimmed)
        gen = None
        if settings.seed is not None:
            gen = torch.Generator().manual_seed(settings.seed)
        self._queue.put(_Row(reply, prompt.input_ids, generator=gen))
        return reply

    def close(self) -> None:
        self._closed.set()
        self._thread.join(timeout=10)

    # ---- the worker ---------------------------------------------------------------------------
    def _run(self) -> None:
        active: list[_Row] = []
        cache = mask = None
        while not self._closed.is_set():
            new: list[_Row] = []
            try:
                if not active and self._next is not None:
                    self._model, self._next = self._next, None
                new = self._admit(block=not active, room=self.config.max_batch - len(active))
                if not active and not new:
                    continue
                if new:
                    # Running rows pause for one step while the newcomers are prefilled.
                    logits, new_cache, new_mask = self._prefill(new)
                    keep = self._sample_and_emit(new, logits)
                    new = [new[i] for i in keep]
                    new_cache, new_mask = _select(new_cache, new_mask, keep)
                    if new and active:
                        cache, mask = _merge(cache, mask, new_cache, new_mask)
                    elif new:
                        cache, mask = new_cache, new_mask
                    active = active + new
                else:
                    logits, mask = self._decode(active, cache, mask)
                    keep = self._sample_and_emit(active, logits)
                    if len(keep) < len(active):
                        active = [active[i] for i in keep]
                        cache, mask = _select(cache, mask, keep)
            except Exception as exc:  # fail the replies in flight, keep serving others
                log.exception("generation failed")
                for row in active + new:
                    if not row.reply.done:
                        row.reply._finish("error", f"generation failed: {exc}")
                active, cache, mask = [], None, None
        self._cancel_the_rest(active)

    def _admit(self, *, block: bool, room: int) -> list[_Row]:
        if self._next is not None and not block:
            return []  # let the batch drain before the new version takes over
        rows: list[_Row] = []
        try:
            if block:
                rows.append(self._queue.get(timeout=0.2))
            if block and self._next is not None:  # idle: the new version takes over now
                self._model, self._next = self._next, None
            while len(rows) < room:
                rows.append(self._queue.get_nowait())
        except queue.Empty:
            pass
        for row in rows:
            row.reply.version = self._model.version
        live = [r for r in rows if not r.reply.cancelled]
        for r in rows:
            if r.reply.cancelled:
                r.reply._finish("cancelled")
        return live

    @torch.inference_mode()
    def _prefill(self, rows: list[_Row]):
        model = self._model.model
        width = max(len(r.prompt_ids) for r in rows)
        pad = self._model.tokenizer.pad_token_id or 0
        ids = torch.tensor([[pad] * (width - len(r.prompt_ids)) + r.prompt_ids for r in rows])
        mask = torch.tensor([[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids)
                             for r in rows])
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions,
                    past_key_values=cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1, :].float(), out.past_key_values, mask

    @torch.inference_mode()
    def _decode(self, rows: list[_Row], cache, mask):
        ids = torch.tensor([[r.generated[-1]] for r in rows])
        positions = mask.sum(-1, keepdim=True)
        mask = torch.cat([mask, torch.ones(len(rows), 1, dtype=mask.dtype)], dim=-1)
        out = self._model.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                                 past_key_values=cache, use_cache=True)
        return out.logits[:, -1, :].float(), mask

    def _sample_and_emit(self, rows: list[_Row], logits: torch.Tensor) -> list[int]:
        """Pick each row's next token, publish its text; returns the rows still going."""
        tok = self._model.tokenizer
        keep = []
        tokens = _sample(logits, rows)
        for i, row in enumerate(rows):
            reply = row.reply
            if reply.cancelled:
                reply._finish("cancelled")
                continue
            token = tokens[i]
            if token in self._model.eos_ids:
                reply._finish("stop")
                continue
            row.generated.append(token)
            reply.n_tokens = len(row.generated)
            text = tok.decode(row.generated, skip_special_tokens=True)
            if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                reply._set_text(text)
            total = len(row.prompt_ids) + len(row.generated)
            if (len(row.generated) >= reply.settings.max_new_tokens
                    or total >= self._model.context_window):
                reply._set_text(text.rstrip("\ufffd"))
                reply._finish("length")
                continue
            keep.append(i)
        return keep


TOP_CANDIDATES = 256  # top-p is cut within the likeliest 256 tokens of each row


def _sample(logits: torch.Tensor, rows: list[_Row]) -> list[int]:
    """Every row's next token at once: repetition penalty, temperature, top-p over each row's
    top 256 candidates (one batched `topk`, no full-vocabulary sort), then a draw; greedy rows
    take the argmax. Rows with a seed draw from their own generator."""
    logits = logits.clone()
    settings = [r.reply.settings for r in rows]
    penalised = [i for i, s in enumerate(settings) if s.repetition_penalty != 1.0]
    if penalised:
        seen = torch.zeros_like(logits, dtype=torch.bool)
        for i in penalised:
            ids = torch.tensor(rows[i].prompt_ids[-256:] + rows[i].generated, dtype=torch.long)
            seen[i, ids] = True
        penalty = torch.tensor([s.repetition_penalty for s in settings])[:, None]
        adjusted = torch.where(logits > 0, logits / penalty, logits * penalty)
        logits = torch.where(seen, adjusted, logits)
    out = logits.argmax(-1).tolist()
    sampled = [i for i, s in enumerate(settings) if s.temperature > 0]
    if not sampled:
        return out
    index = torch.tensor(sampled)
    temps = torch.tensor([settings[i].temperature for i in sampled])[:, None]
    top_p = torch.tensor([settings[i].top_p for i in sampled])[:, None]
    k = min(TOP_CANDIDATES, logits.shape[-1])
    values, candidates = torch.topk(logits[index] / temps, k, dim=-1)  # sorted, descending
    probs = torch.softmax(values, dim=-1)
    beyond = probs.cumsum(-1) - probs > top_p  # tokens after the nucleus is full
    probs = probs.masked_fill(beyond, 0.0)
    unseeded = [j for j, i in enumerate(sampled) if rows[i].generator is None]
    if unseeded:
        picks = torch.multinomial(probs[unseeded], 1)[:, 0]
        for j, pick in zip(unseeded, picks.tolist()):
            out[sampled[j]] = int(candidates[j, pick])
    for j, i in enumerate(sampled):
        if rows[i].generator is not None:
            pick = int(torch.multinomial(probs[j], 1, generator=rows[i].generator))
            out[i] = int(candidates[j, pick])
    return out


# ---- KV cache surgery: the batch is left-padded, so rows line up on the right ----------------

def _layers(cache: DynamicCache) -> list[DynamicLayer]:
    layers = cache.layers
    assert all(type(layer) is DynamicLayer for layer in layers), \
        "the batching worker supports models with a plain (non-sliding) dynamic cache"
    return layers


def _left_pad(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    extra = width - t.shape[dim]
    if extra == 0:
        return t
    shape = list(t.shape)
    shape[dim] = extra
    return torch.cat([torch.zeros(shape, dtype=t.dtype), t], dim=dim)


def _merge(cache, mask, new_cache, new_mask):
    width = max(mask.shape[1], new_mask.shape[1])
    for old, new in zip(_layers(cache), _layers(new_cache)):
        old.keys = torch.cat([_left_pad(old.keys, width, 2), _left_pad(new.keys, width, 2)])
        old.values = torch.cat([_left_pad(old.values, width, 2),
                                _left_pad(new.values, width, 2)])
    return cache, torch.cat([_left_pad(mask, width, 1), _left_pad(new_mask, width, 1)])


def _select(cache, mask, keep: list[int]):
    if not keep:
        return None, None
    index = torch.tensor(keep)
    mask = mask[index]
    # Columns that are padding in every remaining row carry nothing: cut them off the left.
    start = int((mask.sum(0) > 0).float().argmax())
    for layer in _layers(cache):
        layer.keys = layer.keys[index, :, start:]
        layer.values = layer.values[index, :, start:]
    return cache, mask[:, start:]
