"""How far llama.cpp's batched decode scales on this CPU, by weight format.

    python -m bench.batch_formats [--formats Q8_0,Q4_0,Q4_K_M,IQ4_NL,F16,BF16,F32] [--out DIR]

The embedded model is written once as F32 GGUF (from its shipped file), quantized by llama.cpp
itself (`llama_model_quantize`) into each format, and timed with `bench.serve.decode_ceiling`:
one `llama_decode` of one token for each of 8 sequences against one token of one sequence. The
throughput ratio is the most 8 concurrent chats can get over one on this machine, whatever the
engine around llama.cpp does. Writes `batch_formats.json`; prints a table.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import tempfile
import time
from pathlib import Path

FTYPES = {"Q4_0": 2, "Q8_0": 7, "F16": 1, "BF16": 32, "Q4_K_M": 15, "Q6_K": 18, "IQ4_NL": 25}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--formats", default="Q8_0,Q4_0,Q4_K_M,IQ4_NL,F16,BF16,F32")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)

    import llama_cpp as ll

    from bench.serve import decode_ceiling
    from serving.gguf_export import requantize
    from serving.llamacpp import _init_backend
    from serving.model import embedded_gguf_path
    from serving.registry import Registry

    _init_backend()  # llama.cpp's log is quieted (its quantizer prints every tensor)
    tokenizer = Registry().tokenizer()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        f32 = requantize(embedded_gguf_path(), Path(tmp) / "F32.gguf", "F32")
        for name in args.formats.split(","):
            path = f32
            if name != "F32":
                path = Path(tmp) / f"{name}.gguf"
                params = ll.llama_model_quantize_default_params()
                params.ftype, params.nthread = FTYPES[name], 2
                if ll.llama_model_quantize(str(f32).encode(), str(path).encode(),
                                           ctypes.byref(params)) != 0:
                    raise SystemExit(f"llama.cpp could not quantize to {name}")
            figures = decode_ceiling(path, tokenizer, "auto")
            rows.append({"format": name, "mb": round(path.stat().st_size / 1e6), **figures})
            print(f"{name:<8} {rows[-1]['mb']:>5} MB  1 row {figures['one_row_ms']:5.1f} ms  "
                  f"8 rows {figures['8_rows_ms']:5.1f} ms  8 streams can get "
                  f"{figures['throughput_ratio']:.2f}x one", flush=True)
    report = {"measured_at": time.strftime("%Y-%m-%d %H:%M"), "formats": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "batch_formats.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
