"""Server test helpers: a tiny random model with a real chat tokenizer, a server process on a free port."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Optional

import torch

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_CORPUS = ["The quick brown fox jumps over the lazy dog.", "What is the capital of Veltrax? Its capital is Orin.",
           "Hello there, how are you today? I am fine, thank you.", "user assistant system",
           "Planets, moons and stars: the sky at night over the northern islands."] * 20
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def save_chat_model(dirpath: str, seed: int = 0) -> str:
    """A 2-layer random llama with a byte-level BPE tokenizer (vocab 300) and a ChatML chat template, saved as a
    Hugging Face directory that flexc, transformers and PEFT all load."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast
    from tests.utils import TINY
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(_CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS,
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHATML
    out = os.path.join(str(dirpath), "chat-model")
    fast.save_pretrained(out)
    cfg = dict(TINY["llama"], num_hidden_layers=2, vocab_size=320, eos_token_id=fast.eos_token_id,
               bos_token_id=None, pad_token_id=fast.pad_token_id)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg), dtype=torch.float32)
    model.save_pretrained(out)
    return out


def write_chat_jsonl(path: str, n: int = 8) -> str:
    """A chat-format training file of ``n`` short conversations."""
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"What is fact {i}?"},
                                             {"role": "assistant", "content": f"Fact {i} is about the moon."}]})
                    + "\n")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``flexc serve`` in a child process on 127.0.0.1 (restartable on the same data directory)."""

    def __init__(self, args: list[str], log_path: str):
        self.args = args
        self.log_path = log_path
        self.port = 0
        self.proc: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 240.0) -> None:
        import httpx
        self.port = free_port()
        log = open(self.log_path, "a")
        env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
        self.proc = subprocess.Popen([sys.executable, "-m", "flexc.cli", "serve", *self.args, "--port",
                                      str(self.port), "--threads", "1"], stdout=log, stderr=subprocess.STDOUT,
                                     cwd=ROOT, env=env)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; log: {self.log_path}")
            try:
                if httpx.get(self.url + "/health", timeout=1.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"server not up after {timeout} s; log: {self.log_path}")

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs (what a crash or an OOM kill does)."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()
