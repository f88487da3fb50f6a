"""The llama.cpp engine: every reply decoded by llama.cpp, several conversations in one batch.

One worker thread owns a llama.cpp context with one sequence per conversation slot (its batch
API with sequence ids, as llama.cpp's own server does). Each step puts one token of every
running reply and a chunk of every newcomer's prompt into one `llama_decode` call, so a new
chat's first token never waits behind another's whole reply, and the cores are shared by all.
A slot keeps its conversation's evaluated tokens after the reply ends: the next turn of that
conversation (whose prompt starts with the same tokens) only evaluates what is new, as the
server's prompt cache does. Each slot has its own context window of cache (not one cache shared
by all: with a shared one every token attends over every slot's cells, which made 32 streams
several times slower here).

Prompts are rendered and trimmed by `serving/chat.py` with the model's transformers tokenizer
(the same vocabulary as the GGUF file: `serving/gguf_export.py` checks it), so every engine
answers exactly the same prompt tokens. Sampling is llama.cpp's own sampler chain per reply:
repetition penalty over the last 256 tokens (prompt included), the 256 likeliest tokens,
temperature, top-p, a seeded draw; greedy at temperature 0.

Weight repacking (`CHAT_LLAMA_REPACK`: auto, on, off): llama.cpp can copy a model's weights into
layouts for the CPU's fastest kernels (its "extra buffer types": AMX tiles, interleaved blocks).
On an Intel Xeon with AMX (a 2-core VM, llama-cpp-python 0.3.36 built natively) its AMX matrix
multiply crashed the whole process with a segmentation fault on the first reply, for the
embedded Q4_1 file and for our Q8_0 versions alike (as llama.cpp#20824 reports). So `auto`
leaves the weights as the file has them on CPUs where llama.cpp reports AMX, and repacks
elsewhere; `on` tries AMX anyway.
"""

from __future__ import annotations

import codecs
import ctypes
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import llama_cpp as ll

from serving.base import EngineBase
from serving.config import GenerationSettings, ServingConfig
from serving.hardware import BadSetting
from serving.model import ModelUnavailable
from serving.reply import Reply

log = logging.getLogger(__name__)

PENALTY_LAST_N = 256
TOP_CANDIDATES = 256  # as serving/engine.py: top-p is cut within the likeliest 256 tokens
FLASH_ATTENTION = {"auto": ll.LLAMA_FLASH_ATTN_TYPE_AUTO, "on": ll.LLAMA_FLASH_ATTN_TYPE_ENABLED,
                   "off": ll.LLAMA_FLASH_ATTN_TYPE_DISABLED}
GGML_LOG_LEVEL_ERROR = 3  # ggml.h's enum ggml_log_level
REPACK_ENV = "CHAT_LLAMA_REPACK"
_library_model_defaults = ll.llama_model_default_params
_backend_ready = threading.Lock()
_backend_started = False


def _init_backend() -> None:
    global _backend_started
    with _backend_ready:
        if not _backend_started:
            ll.llama_log_set(_quiet, ctypes.c_void_p())
            ll.llama_backend_init()
            _backend_started = True


@ll.llama_log_callback
def _quiet(level, text, user_data):  # llama.cpp's chatter would drown the app's own log
    if level == GGML_LOG_LEVEL_ERROR:
        log.warning("llama.cpp: %s", text.decode("utf-8", "replace").rstrip())


def repack_setting() -> tuple[bool, str]:
    """Whether llama.cpp may repack weights for this CPU (`CHAT_LLAMA_REPACK`), and why."""
    value = (os.environ.get(REPACK_ENV) or "auto").strip().lower()
    if value in ("on", "off"):
        return value == "on", f"{value} (set by {REPACK_ENV})"
    if value != "auto":
        raise BadSetting(f"{REPACK_ENV} must be auto, on or off, not {value!r}.")
    if "AMX_INT8 = 1" in ll.llama_print_system_info().decode("utf-8", "replace"):
        return False, (f"off: the CPU has AMX, whose llama.cpp path crashed with a segmentation "
                       f"fault ({REPACK_ENV}=on tries it)")
    return True, "on"


def model_params():
    """llama.cpp's default model parameters, weight repacking as `repack_setting` says (logged
    when off)."""
    params = _library_model_defaults()
    params.use_extra_bufts, why = repack_setting()
    if not params.use_extra_bufts:
        log.info("llama.cpp weight repacking %s", why)
    return params


def repack_as_set_for_library() -> None:
    """For llama.cpp loaded by llama-cpp-python's own `Llama` (the benchmarks' anchor, its
    OpenAI-compatible server) in this process: it has no switch for repacking, so its model
    defaults become `model_params`."""
    import llama_cpp.llama_cpp as low_level  # where `Llama` looks its defaults up

    low_level.llama_model_default_params = model_params


class GGUFModel:
    """A GGUF file loaded by llama.cpp, with a context of `slots` sequences, and the
    transformers tokenizer that renders its prompts."""

    def __init__(self, path: Path, *, version: str, tokenizer, config: ServingConfig,
                 threads: int) -> None:
        _init_backend()
        self.path, self.version, self.tokenizer = Path(path), version, tokenizer
        params = model_params()
        self.repacked = params.use_extra_bufts
        self.model = ll.llama_model_load_from_file(str(path).encode(), params)
        if not self.model:
            raise ModelUnavailable(f"llama.cpp could not load {path}")
        self.vocab = ll.llama_model_get_vocab(self.model)
        self.slots = config.slots
        self.context_window = min(config.max_context_tokens,
                                  ll.llama_model_n_ctx_train(self.model))
        cparams = ll.llama_context_default_params()
        cparams.n_ctx = self.slots * self.context_window
        cparams.n_batch = cparams.n_ubatch = config.prefill_chunk
        cparams.n_seq_max = self.slots
        cparams.kv_unified = False  # each sequence attends over its own cells only
        cparams.n_threads = cparams.n_threads_batch = threads
        cparams.flash_attn_type = FLASH_ATTENTION[config.flash_attention]
        self.ctx = ll.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            ll.llama_model_free(self.model)
            raise ModelUnavailable(f"llama.cpp could not make a context for {path}")
        self.memory = ll.llama_get_memory(self.ctx)
        self.n_ctx = ll.llama_n_ctx(self.ctx)
        self.n_batch = config.prefill_chunk
        self.threads = threads
        self._piece = ctypes.create_string_buffer(256)
        eos = tokenizer.eos_token_id
        self.eos_ids = {eos} if eos is not None else set()

    def is_end(self, token: int) -> bool:
        return bool(ll.llama_vocab_is_eog(self.vocab, token)) or token in self.eos_ids

    def piece(self, token: int) -> bytes:
        n = ll.llama_token_to_piece(self.vocab, token, self._piece, len(self._piece), 0, False)
        return self._piece.raw[:max(n, 0)]

    def close(self) -> None:
        if self.ctx:
            ll.llama_free(self.ctx)
            self.ctx = None
        if self.model:
            ll.llama_model_free(self.model)
            self.model = None


@dataclass
class _Slot:
    seq: int
    cached: list[int] = field(default_factory=list)  # tokens whose keys/values are in the cache
    row: _Row | None = None
    last_used: float = 0.0


@dataclass
class _Row:
    reply: Reply
    prompt: list[int]
    sampler: object = None
    slot: _Slot | None = None
    pending: list[int] = field(default_factory=list)  # tokens still to evaluate
    generated: int = 0
    decoder: codecs.IncrementalDecoder = field(
        default_factory=lambda: codecs.getincrementaldecoder("utf-8")("replace"))
    text: str = ""


def _sampler(model: GGUFModel, settings: GenerationSettings, prompt: list[int]):
    chain = ll.llama_sampler_chain_init(ll.llama_sampler_chain_default_params())
    if settings.repetition_penalty != 1.0:
        ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_penalties(
            ll.llama_vocab_n_tokens(model.vocab), PENALTY_LAST_N, settings.repetition_penalty,
            0.0, 0.0))
    if settings.temperature <= 0:
        ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_greedy())
    else:
        # the likeliest TOP_CANDIDATES first (a partial sort, not the whole vocabulary), then
        # temperature before top-p, as the transformers path samples
        ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_top_k(TOP_CANDIDATES))
        ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_temp(settings.temperature))
        if settings.top_p < 1.0:
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_top_p(settings.top_p, 1))
        seed = ll.LLAMA_DEFAULT_SEED if settings.seed is None else settings.seed & 0xFFFFFFFF
        ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_dist(seed))
    for token in prompt[-PENALTY_LAST_N:]:  # the penalty counts the prompt's tokens too
        ll.llama_sampler_accept(chain, token)
    return chain


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class LlamaEngine(EngineBase):
    """The shared llama.cpp worker; the same interface as the transformers `Engine`."""

    kind = "llama.cpp"

    def __init__(self, model: GGUFModel, config: ServingConfig | None = None) -> None:
        self._init_worker(model, config)
        self._swap = threading.Lock()  # the watcher thread hands over, the worker takes over
        self._slots = [_Slot(seq) for seq in range(model.slots)]
        self._batch = ll.llama_batch_init(model.n_batch, 0, 1)
        # prompt tokens evaluated vs found already in a slot's cache (the prefix reuse)
        self.stats = {"prompt_tokens": 0, "prompt_tokens_reused": 0}
        self._thread = threading.Thread(target=self._run, name="llama-worker", daemon=True)
        self._thread.start()

    def describe(self) -> str:
        m = self._next or self._model
        return (f"llama.cpp, {m.path.name}, {m.threads} threads"
                + ("" if m.repacked else ", weights not repacked"))

    def swap_model(self, model: GGUFModel) -> None:
        """Serve `model` for new replies once the replies in flight have finished."""
        with self._swap:
            old, self._next = self._next, model
        if old is not None:  # a version promoted and replaced before it ever served
            old.close()

    def submit(self, messages: list[dict[str, str]],
               settings: GenerationSettings | None = None) -> Reply:
        settings, prompt = self._start(messages, settings)
        reply = Reply(settings, prompt.trimmed)
        self._queue.put(_Row(reply, prompt.input_ids))
        return reply

    def close(self) -> None:
        self._closed.set()
        self._thread.join(timeout=30)
        if not self._thread.is_alive():
            ll.llama_batch_free(self._batch)
            self._model.close()
            if self._next is not None:
                self._next.close()

    # ---- the worker ---------------------------------------------------------------------------
    def _run(self) -> None:
        active: list[_Row] = []
        while not self._closed.is_set():
            try:
                active = [r for r in active if not self._finish_if_cancelled(r)]
                active += self._admit(block=not active)
                if active:
                    self._step(active)
                    active = [r for r in active if not r.reply.done]
            except Exception as exc:  # fail the replies in flight, keep serving others
                log.exception("generation failed")
                for row in active:
                    self._finish(row, "error", f"generation failed: {exc}")
                active = []
                for slot in self._slots:
                    slot.cached, slot.row = [], None
                if self._model.memory:
                    ll.llama_memory_clear(self._model.memory, True)
        self._cancel_the_rest(active)

    def _admit(self, *, block: bool) -> list[_Row]:
        if self._next is not None and not block:
            return []  # let the running replies finish before the new version takes over
        rows: list[_Row] = []
        try:
            if block:
                rows.append(self._queue.get(timeout=0.2))
            if block and self._next is not None:  # idle: the new version takes over now
                with self._swap:
                    old, self._model, self._next = self._model, self._next, None
                old.close()
                self._slots = [_Slot(seq) for seq in range(self._model.slots)]
            free = [s for s in self._slots if s.row is None]
            while len(rows) < len(free):
                rows.append(self._queue.get_nowait())
        except queue.Empty:
            pass
        free = [s for s in self._slots if s.row is None]
        admitted = []
        for row in rows:
            row.reply.version = self._model.version
            if row.reply.cancelled:
                row.reply._finish("cancelled")
                continue
            try:
                slot = self._pick_slot(row.prompt, free)
                free.remove(slot)
                keep = min(_common_prefix(slot.cached, row.prompt), len(row.prompt) - 1)
                ll.llama_memory_seq_rm(self._model.memory, slot.seq, keep, -1)
                slot.cached = slot.cached[:keep]
                slot.row, row.slot = row, slot
                row.pending = row.prompt[keep:]
                self.stats["prompt_tokens"] += len(row.prompt)
                self.stats["prompt_tokens_reused"] += keep
                row.sampler = _sampler(self._model, row.reply.settings, row.prompt)
                admitted.append(row)
            except Exception as exc:  # this reply fails, the others go on
                log.exception("could not start a reply")
                self._finish(row, "error", f"generation failed: {exc}")
        return admitted

    def _pick_slot(self, prompt: list[int], free: list[_Slot]) -> _Slot:
        """The free slot holding the longest start of this prompt, else the least recent."""
        shared = {s.seq: _common_prefix(s.cached, prompt) for s in free}
        best = max(free, key=lambda s: (shared[s.seq], -s.last_used))
        if shared[best.seq] == 0:
            best = min(free, key=lambda s: (len(s.cached) > 0, s.last_used))
        return best

    def _step(self, rows: list[_Row]) -> None:
        """One llama_decode: a token of every running reply, then prompt chunks."""
        m, batch = self._model, self._batch
        decoding = [r for r in rows if r.generated > 0]
        prefilling = [r for r in rows if r.generated == 0]
        plan: list[tuple[_Row, list[int], bool]] = []
        budget = m.n_batch
        for row in decoding + prefilling:
            if budget <= 0:
                break
            chunk = row.pending[:budget]
            budget -= len(chunk)
            plan.append((row, chunk, len(chunk) == len(row.pending)))
        # In sequence-id order: llama.cpp splits a batch whose sequences come out of order into
        # several passes over the weights (measured: 53 instead of 31 ms a step for 8 rows).
        plan.sort(key=lambda item: item[0].slot.seq)
        n = 0
        outputs: list[tuple[_Row, int]] = []
        for row, chunk, last in plan:
            start = len(row.slot.cached)
            for j, token in enumerate(chunk):
                batch.token[n] = token
                batch.pos[n] = start + j
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = row.slot.seq
                batch.logits[n] = last and j == len(chunk) - 1
                n += 1
            if last:
                outputs.append((row, n - 1))
        batch.n_tokens = n
        status = ll.llama_decode(m.ctx, batch)
        if status != 0:
            raise RuntimeError(f"llama_decode returned {status}")
        for row, chunk, _ in plan:
            row.slot.cached += chunk
            row.pending = row.pending[len(chunk):]
        for row, index in outputs:
            self._emit(row, ll.llama_sampler_sample(row.sampler, m.ctx, index))

    def _emit(self, row: _Row, token: int) -> None:
        m, reply = self._model, row.reply
        if m.is_end(token):
            self._finish(row, "stop")
            return
        row.generated += 1
        reply.n_tokens = row.generated
        row.text += row.decoder.decode(m.piece(token))
        reply._set_text(row.text)
        if (row.generated >= reply.settings.max_new_tokens
                or len(row.prompt) + row.generated >= m.context_window):
            self._finish(row, "length")
            return
        row.pending = [token]

    def _finish_if_cancelled(self, row: _Row) -> bool:
        if row.reply.cancelled:
            self._finish(row, "cancelled")
            return True
        return False

    def _finish(self, row: _Row, reason: str, error: str | None = None) -> None:
        tail = row.decoder.decode(b"", final=True)
        if tail and reason != "error":
            row.text += tail
            row.reply._set_text(row.text)
        if row.sampler is not None:
            ll.llama_sampler_free(row.sampler)
            row.sampler = None
        if row.slot is not None:
            row.slot.row, row.slot.last_used = None, time.monotonic()
            row.slot = None
        if not row.reply.done:
            row.reply._finish(reason, error)
